defmodule DSPex.ReplyPathAttackTest do
  # An adversarial run against the first version of the reply path (d915a24: a worker's
  # stdout polled by ERTS with enif_select, read by the one caller waiting on it, else by the
  # pool's GenServer), with real Python workers. The first seven tests failed on d915a24
  # (the reads the GenServer alone did, a select after SELECT_STOP, a second notification,
  # interleaved writes); the others pin edge cases that held.
  use DSPex.NativePool.PoolCase, async: false

  import ExUnit.CaptureLog

  @v2 [{"TEST_WORKER_PROTOCOL", "2"}, {"TEST_WORKER_CONCURRENCY", "8"}]

  defp resource(opts), do: :persistent_term.get({NativePool, opts[:pool]}).resource
  defp owner(opts), do: Process.whereis(opts[:pool])
  # The process that reads what no caller reads (a process of its own since the attack run).
  defp reader_of(opts), do: :sys.get_state(opts[:pool]).reader
  defp worker_pid(opts), do: opts |> status() |> Map.fetch!(:worker_pids) |> hd()
  defp threads(os_pid), do: length(Path.wildcard("/proc/#{os_pid}/task/*"))

  defp beam_fds do
    for fd <- File.ls!("/proc/self/fd"), do: {fd, File.read_link("/proc/self/fd/#{fd}")}
  end

  defp readable_left do
    {:messages, messages} = Process.info(self(), :messages)
    for {_ref, {:"$dspex_readable", _, _}} = m <- messages, do: m
  end

  # Suspends the pool's GenServer (a busy one, deterministically), resumed when the test
  # process ends, so the GenServer can stop its pool within its shutdown time.
  defp suspend(pid) do
    :sys.suspend(pid)
    resume_at_exit(fn -> :sys.resume(pid) end)
  end

  # Suspends the pool's reader process; resumed when the test process ends.
  defp suspend_reader(pid) do
    :erlang.suspend_process(pid)
    resume_at_exit(fn -> :erlang.resume_process(pid) end)
  end

  defp resume_at_exit(resume) do
    test = self()

    spawn(fn ->
      ref = Process.monitor(test)

      receive do
        {:DOWN, ^ref, _, _, _} ->
          try do
            resume.()
          catch
            # Already gone with its pool.
            _, _ -> :ok
          end
      end
    end)
  end

  # Whether a thread of the worker is blocked writing to a full pipe.
  defp writer_blocked?(os_pid) do
    Path.wildcard("/proc/#{os_pid}/task/*/wchan")
    |> Enum.any?(fn f ->
      case File.read(f) do
        {:ok, wchan} -> wchan =~ "pipe_write"
        _ -> false
      end
    end)
  end

  describe "replies that only the pool's GenServer reads" do
    test "health_check through the pool's GenServer answers on a lazy pool (its process must read a starting worker's handshake while it waits for the checkout)" do
      opts = start_pool(pool_size: 1, lazy: true)
      # d915a24: {:error, {:unhealthy, {:pool_timeout, ...}}} after 5 s: the GenServer waits
      # in checkout/2 for the worker whose handshake only it can read.
      assert {:ok, :healthy} = GenServer.call(opts[:pool], :health_check, 30_000)
    end

    test "replies of a shared protocol-2 worker reach their callers while the pool's GenServer is suspended (busy)" do
      opts = start_pool(pool_size: 1, max_overflow: 0, env: @v2)
      suspend(owner(opts))
      first = Task.async(fn -> NativePool.execute_anonymous(:sleep, %{ms: 300}, opts) end)
      eventually(fn -> status(opts).in_flight == 1 end)
      # Two requests in flight on one worker: only the GenServer reads its stdout.
      second = NativePool.execute_anonymous(:sleep, %{ms: 1}, [timeout: 3_000] ++ opts)
      assert {:ok, %{"slept" => 1}} = second
      assert {:ok, %{"slept" => 300}} = Task.await(first, 10_000)
    end

    test "a shared protocol-2 worker that answers its heartbeat pings is not recycled as unresponsive while the pool's GenServer is busy" do
      opts = start_pool(pool_size: 1, max_overflow: 0, env: @v2, heartbeat_timeout: 300)
      suspend(owner(opts))
      first = Task.async(fn -> NativePool.execute_anonymous(:sleep, %{ms: 1_000}, opts) end)
      eventually(fn -> status(opts).in_flight == 1 end)
      # d915a24: both get {:worker_unresponsive, ...} after 300 ms: the pongs sit unread.
      assert {:ok, %{"slept" => 900}} = NativePool.execute_anonymous(:sleep, %{ms: 900}, opts)
      assert {:ok, %{"slept" => 1_000}} = Task.await(first, 10_000)
    end
  end

  @tag :dspy
  test "with the real DSPy bridge (protocol 2 by default), concurrent requests on one worker are answered while the pool's GenServer is suspended (busy)" do
    opts =
      start_pool(
        pool_size: 1,
        max_overflow: 0,
        script: Path.join(:code.priv_dir(:dspex_native_pool), "python/dspy_bridge.py"),
        start_method: :fork_server,
        start_timeout: 120_000
      )

    call = fn command, args ->
      NativePool.execute_in_session("attack", command, args, [timeout: 60_000] ++ opts)
    end

    {:ok, _} = call.(:configure_lm, %{provider: "dummy", latency_ms: 300})

    {:ok, _} =
      call.(:create_program, %{
        id: "p",
        signature: %{inputs: [%{name: "question"}], outputs: [%{name: "answer"}]},
        program_type: "predict"
      })

    suspend(owner(opts))
    run = System.os_time()

    ask = fn i ->
      call.(:execute_program, %{program_id: "p", inputs: %{question: "q#{i}-#{run}"}})
    end

    first = Task.async(fn -> ask.(1) end)
    eventually(fn -> status(opts).in_flight == 1 end)
    second = Task.async(fn -> ask.(2) end)
    # d915a24: both wait for the GenServer (here: until their 60 s timeout).
    assert {:ok, {:ok, %{"outputs" => _}}} = Task.yield(second, 10_000)
    assert {:ok, {:ok, %{"outputs" => _}}} = Task.yield(first, 10_000)
  end

  describe "the arm/retarget invariants" do
    # A worker whose stderr outlives it (a grandchild in its own session holds it): its task
    # then waits up to 500 ms for stderr after SELECT_STOP closed stdout, before `Exited`.
    defp stderr_holding_worker do
      path = Path.join(System.tmp_dir!(), "dspex_hold_stderr_worker.py")

      File.write!(path, """
      import runpy, subprocess, sys
      subprocess.Popen(["sleep", "3"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       start_new_session=True)
      sys.argv[0] = #{inspect(test_worker())}
      runpy.run_path(sys.argv[0], run_name="__main__")
      """)

      path
    end

    # The links (pipe:[inode]) of the BEAM's ends of a worker's stdin, stdout and stderr.
    defp pipes(os_pid) do
      mine =
        for fd <- File.ls!("/proc/#{os_pid}/fd"), do: File.read_link("/proc/#{os_pid}/fd/#{fd}")

      for {_fd, {:ok, "pipe:" <> _ = link}} <- beam_fds(),
          {:ok, link} in mine,
          uniq: true,
          do: link
    end

    test "a worker's stdout is not selected again after SELECT_STOP closed it (no 'Bad input fd' from ERTS, no foreign fd in the poll set)" do
      opts = start_pool(pool_size: 1, max_overflow: 0, script: stderr_holding_worker(), env: @v2)

      pipes = pipes(worker_pid(opts))
      assert length(pipes) == 3

      log =
        capture_log(fn ->
          killed = Task.async(fn -> NativePool.execute_anonymous(:kill_self, %{}, opts) end)
          # stdout closed by the stop callback; stdin and stderr still open: the worker's task
          # waits for stderr, its `Exited` is not stepped yet.
          eventually(fn ->
            open = for {_fd, {:ok, link}} <- beam_fds(), into: MapSet.new(), do: link
            Enum.count(pipes, &(&1 in open)) == 2
          end)

          # A request lands on the (dead, not yet reported) protocol-2 worker: its Write
          # retargets the worker's reader, which arms the closed descriptor.
          other = NativePool.execute_anonymous(:echo, %{}, [timeout: 5_000] ++ opts)
          assert {:error, {:worker_exited, _}} = Task.await(killed)
          assert {:error, {:worker_exited, _}} = other
          assert {:ok, _} = NativePool.execute_anonymous(:echo, %{}, opts)
        end)

      refute log =~ "Bad input fd"
    end

    test "a caller re-armed while its notification is pending gets no notification after its call is over" do
      opts = start_pool(pool_size: 1, max_overflow: 0, env: @v2)
      res = resource(opts)
      pid = worker_pid(opts)
      base = threads(pid)

      # A: a tool request, alone on the worker, so the worker's stdout is armed for A.
      ref = make_ref()
      :ok = Native.execute(res, ref, :anonymous, "tool", %{name: "t"}, 5_000, 30_000, true)
      assert_receive {^ref, {:"$dspex_readable", worker, lease}}, 5_000
      assert :wait = Native.read(res, worker, lease)
      assert_receive {^ref, {:event, ^lease, %{"event" => "tool_call", "call_id" => 1}}}

      # B joins (two requests in flight: armed for the GenServer, which is suspended), and
      # B's reply is written (its thread ended): the GenServer has a notification pending.
      reader = reader_of(opts)
      suspend_reader(reader)
      test = self()

      b =
        spawn(fn ->
          :ok =
            Native.execute(res, make_ref(), :anonymous, "sleep", %{ms: 1}, 5_000, 30_000, true)

          send(test, :b_sent)
          Process.sleep(:infinity)
        end)

      assert_receive :b_sent
      eventually(fn -> threads(pid) == base + 1 end)
      # ERTS told the (suspended) GenServer that B's reply is readable.
      eventually(fn ->
        {:messages, messages} = Process.info(reader, :messages)
        Enum.any?(messages, &match?({:"$dspex_readable", ^worker}, &1))
      end)

      # B dies: its request is cancelled, A is alone again and the pipe (B's unread reply)
      # is armed for A, which is told at once (notification N1, kept pending here).
      Process.exit(b, :kill)
      assert_receive {^ref, {:"$dspex_readable", ^worker, ^lease}}, 5_000

      # The GenServer reads on its stale notification (B's late reply) and re-arms for A.
      :erlang.resume_process(reader)
      eventually(fn -> Process.info(reader, :message_queue_len) == {:message_queue_len, 0} end)

      # A's tool is answered; the worker writes A's reply (its thread ended).
      :ok = Native.control(res, lease, %{control: "tool_result", call_id: 1, ok: true, result: 1})
      eventually(fn -> threads(pid) == base end)

      # A reads on N1 and gets its reply: the call is over.
      assert {:ok, %{"tool_results" => [_]}} = Native.read(res, worker, lease)
      # A may have been told twice (re-armed while N1 was on its way): the second notice is
      # in the mailbox by now, when the call is over (NativePool drops it then), and no
      # notice can come later: the stdout is armed for the reader again.
      flush = fn flush ->
        receive do
          {^ref, {:"$dspex_readable", _, _}} -> flush.(flush)
        after
          0 -> :ok
        end
      end

      flush.(flush)
      refute_receive {^ref, _}, 500
    end
  end

  describe "concurrent requests to one protocol-2 worker (pre-dates d915a24)" do
    test "a request the stdin pipe cannot take at once is not interleaved with the next request's bytes (Conn::write)" do
      opts = start_pool(pool_size: 1, max_overflow: 0, env: @v2)
      pid = worker_pid(opts)
      # Only the reader reads a shared worker's stdout: suspended, it lets the worker's
      # reading thread block writing a 1 MB reply, so the worker reads no requests for now.
      reader = reader_of(opts)
      suspend_reader(reader)

      call = fn command, args ->
        NativePool.execute_anonymous(command, args, [timeout: 10_000] ++ opts)
      end

      # A stays in flight: B shares the worker.
      _a = Task.async(fn -> call.(:sleep, %{ms: 30_000}) end)
      eventually(fn -> status(opts).in_flight == 1 end)
      _b = Task.async(fn -> call.(:big, %{bytes: 1_000_000}) end)
      eventually(fn -> writer_blocked?(pid) end)

      # C fills the stdin pipe (64 KiB) and leaves the rest of its 2 MB to a Tokio task; D
      # finds the pipe full and leaves all of it to another task, which writes it as soon
      # as the pipe has room: between two pieces of C.
      c = Task.async(fn -> call.(:echo, %{p: String.duplicate("y", 2_000_000), nonce: "c"}) end)
      eventually(fn -> status(opts).in_flight == 3 end)
      d = Task.async(fn -> call.(:echo, %{nonce: "d"}) end)
      eventually(fn -> status(opts).in_flight == 4 end)
      :erlang.resume_process(reader)

      # d915a24: C gets {:error, "invalid request: unexpected control character in string:
      # line 1 column 65533"} (D's frame inside C's), D times out (its frame was swallowed).
      assert {:ok, %{"nonce" => "c"}} = Task.await(c, 30_000)
      assert {:ok, %{"nonce" => "d"}} = Task.await(d, 30_000)
    end
  end

  describe "edge cases that hold" do
    test "replies at and around 16 KiB, and a 2 MiB reply split over many reads, reach the right caller (alone and shared)" do
      for env <- [[], @v2] do
        opts = start_pool(pool_size: 1, max_overflow: 0, env: env)
        # The reply's body is ~44 bytes plus `bytes`: one of these is exactly 16 KiB.
        sizes = Enum.to_list((16_384 - 70)..(16_384 - 20)) ++ [2_000_000, 16_385, 100]

        for bytes <- sizes do
          nonce = "#{bytes}"

          assert {:ok, %{"data" => data, "nonce" => ^nonce}} =
                   NativePool.execute_anonymous(:big, %{bytes: bytes, nonce: nonce}, opts)

          assert byte_size(data) == bytes
        end

        results =
          sizes
          |> Enum.map(fn bytes ->
            Task.async(fn ->
              nonce = "#{bytes}"
              reply = NativePool.execute_anonymous(:big, %{bytes: bytes, nonce: nonce}, opts)
              {bytes, reply, Process.info(self(), :messages)}
            end)
          end)
          |> Enum.map(&Task.await(&1, 30_000))

        for {bytes, reply, messages} <- results do
          nonce = "#{bytes}"
          assert {:ok, %{"data" => data, "nonce" => ^nonce}} = reply
          assert byte_size(data) == bytes
          assert messages == {:messages, []}
        end
      end
    end

    test "no message is left in callers' mailboxes after replies, events, native timeouts, retries and worker deaths" do
      for env <- [[], @v2] do
        opts = start_pool(pool_size: 2, max_overflow: 1, env: env)

        calls = [
          {:echo, %{}, []},
          {:big, %{bytes: 40_000}, []},
          {:sleep, %{ms: 5}, [timeout: 1]},
          {:big, %{bytes: 300_000}, [timeout: 2]},
          {:kill_self, %{}, [retries: 1]},
          {:reply_twice, %{}, []},
          {:garbage_stdout, %{}, [timeout: 300]},
          {:fail, %{}, []}
        ]

        1..8
        |> Enum.map(fn t ->
          Task.async(fn ->
            for i <- 1..24, do: apply(NativePool, :execute_anonymous, call(calls, i + t, opts))
            Process.info(self(), :messages)
          end)
        end)
        |> Enum.each(&assert(Task.await(&1, 60_000) == {:messages, []}))

        assert readable_left() == []
      end
    end

    defp call(calls, i, opts) do
      {command, args, extra} = Enum.at(calls, rem(i, length(calls)))
      [command, args, extra ++ opts]
    end

    test "a caller killed while the worker's stdout is armed for it: the worker serves the next caller" do
      for env <- [[], @v2] do
        opts = start_pool(pool_size: 1, max_overflow: 0, env: env)
        test = self()

        caller =
          spawn(fn ->
            send(test, :sent)
            NativePool.execute_anonymous(:sleep, %{ms: 200}, opts)
          end)

        assert_receive :sent
        eventually(fn -> status(opts).in_flight == 1 end)
        Process.exit(caller, :kill)
        assert {:ok, %{"nonce" => "n"}} = NativePool.execute_anonymous(:echo, %{nonce: "n"}, opts)
        assert readable_left() == []
      end
    end

    test "pool stop with requests in flight on a shared worker: each caller gets its reply" do
      opts = start_pool(pool_size: 1, max_overflow: 0, env: @v2, shutdown_grace: 5_000)

      tasks =
        for i <- 1..4,
            do: Task.async(fn -> NativePool.execute_anonymous(:sleep, %{ms: 100 + i}, opts) end)

      eventually(fn -> status(opts).in_flight == 4 end)
      stop_supervised!(opts[:pool])

      for {task, i} <- Enum.with_index(tasks, 1) do
        slept = 100 + i
        assert {:ok, %{"slept" => ^slept}} = Task.await(task, 10_000)
      end
    end

    test "the BEAM's descriptors stay steady over 200 worker recycles (the stop callback closes each stdout)" do
      opts = start_pool(pool_size: 2, max_overflow: 0)
      assert {:ok, _} = NativePool.execute_anonymous(:ping, %{}, opts)
      before = length(beam_fds())

      for i <- 1..200 do
        command = Enum.at([:kill_self, :exit, :garbage_stdout], rem(i, 3))
        assert {:error, _} = NativePool.execute_anonymous(command, %{}, [timeout: 5_000] ++ opts)
      end

      eventually(fn -> status(opts).ready == 2 end, 30_000)
      assert {:ok, _} = NativePool.execute_anonymous(:ping, %{}, opts)
      assert %{counters: %{recycled: 200}} = status(opts)
      # (Other tests' pools may still be closing theirs: a leak would be ~200 more.)
      assert length(beam_fds()) < before + 20
    end
  end
end
