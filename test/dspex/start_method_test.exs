defmodule DSPex.PythonBridge.StartMethodTest do
  # Not async: counts OS processes and kills VMs.
  use DSPex.NativePool.PoolCase, async: false

  # A tiny worker that the fork server can import once and run per worker (top-level
  # `main(argv)`, called only under `__main__`), with commands that look at its own process.
  @worker ~S'''
  import json, os, signal, subprocess, sys, time

  def frame(fd, obj):
      body = json.dumps(obj).encode()
      os.write(fd, len(body).to_bytes(4, "big") + body)

  def read_exact(n):
      buf = b""
      while len(buf) < n:
          chunk = os.read(0, n - len(buf))
          if not chunk:
              os._exit(0)
          buf += chunk
      return buf

  def fds():
      out = {}
      for fd in os.listdir("/proc/self/fd"):
          try:
              out[fd] = os.readlink(f"/proc/self/fd/{fd}")
          except OSError:
              pass
      return out

  def main(argv):
      at_start = fds()
      wid = argv[argv.index("--worker-id") + 1]
      out = os.dup(1)
      os.dup2(2, 1)
      children = []
      while True:
          req = json.loads(read_exact(int.from_bytes(read_exact(4), "big")))
          cmd, args = req["command"], req.get("args", {})
          res = None
          if cmd == "ping":
              res = {"pid": os.getpid(), "ppid": os.getppid(), "worker_id": wid,
                     "env": os.environ.get("START_METHOD_TEST"), "forked": __name__ != "__main__",
                     "pgid": os.getpgid(0)}
          elif cmd == "random":
              import random
              res = {"random": random.random()}
          elif cmd == "fds":
              res = {"at_start": at_start, "now": fds()}
          elif cmd == "grandchild":
              child = subprocess.Popen(["sleep", "1000"])
              children.append(child)
              res = {"pid": child.pid}
          elif cmd == "exit":
              os._exit(args.get("code", 0))
          elif cmd == "sleep":
              time.sleep(args["ms"] / 1000)
              res = {}
          elif cmd == "flood":
              line = ("x" * args["size"] + "\n").encode()
              block = line * 100
              for _ in range(args["lines"] // 100):
                  os.write(2, block)
              res = {}
          elif cmd == "long_line":
              os.write(2, b"y" * args["size"])
              os.write(2, b"\nafter the long line\n")
              res = {}
          frame(out, {"id": req["id"], "success": True, "result": res})

  if __name__ == "__main__":
      main(sys.argv[1:])
  '''

  defmodule Handler do
    @moduledoc false
    def log(%{level: level, msg: msg, meta: meta}, %{config: %{pid: pid}}) do
      text =
        case msg do
          {:string, s} -> IO.chardata_to_string(s)
          {:report, r} -> inspect(r)
          {format, args} -> :io_lib.format(format, args) |> IO.chardata_to_string()
        end

      send(pid, {:logged, level, text, meta})
    end
  end

  setup_all do
    path =
      Path.join(System.tmp_dir!(), "start_method_worker_#{System.unique_integer([:positive])}.py")

    File.write!(path, @worker)
    on_exit(fn -> File.rm(path) end)
    %{script: path}
  end

  defp start(ctx, opts) do
    start_pool([script: ctx.script, env: [{"START_METHOD_TEST", "yes"}]] ++ opts)
  end

  defp ping(opts), do: {:ok, _} = NativePool.execute_anonymous(:ping, %{}, opts)

  # The fork servers the VM runs for `script`.
  defp fork_servers(script) do
    beam = String.to_integer(System.pid())

    for entry <- File.ls!("/proc"),
        Regex.match?(~r/^\d+$/, entry),
        pid = String.to_integer(entry),
        match?({:ok, _}, File.read("/proc/#{pid}/stat")),
        (try do
           ppid(pid) == beam and cmdline(pid) =~ "fork_server.py --script #{script}"
         rescue
           _ -> false
         end),
        do: pid
  end

  defp cmdline(os_pid), do: File.read!("/proc/#{os_pid}/cmdline") |> String.replace("\0", " ")

  defp beam_fds do
    for fd <- File.ls!("/proc/self/fd"),
        {:ok, target} <- [File.read_link("/proc/self/fd/#{fd}")],
        into: MapSet.new(),
        do: target
  end

  for method <- [:fork_server, :spawn] do
    describe "start_method: #{method}" do
      @describetag method: method

      test "workers are children of the fork server, not of the VM, and hold none of its fds",
           %{method: method} = ctx do
        opts = start(ctx, start_method: method, pool_size: 2)
        beam = String.to_integer(System.pid())
        beam_fds = beam_fds()

        for pid <- status(opts).worker_pids do
          {:ok, %{"ppid" => zygote, "pgid" => ^pid, "forked" => forked}} =
            call_on(opts, pid, :ping)

          assert forked == (method == :fork_server)
          assert zygote != beam
          assert ppid(zygote) == beam
          assert cmdline(zygote) =~ "fork_server.py"

          {:ok, %{"at_start" => at_start}} = call_on(opts, pid, :fds)
          # 0-2 are the worker's own pipes; then only the directory listdir opened, and in a
          # forked worker the pidfd through which it watches the VM.
          extra = at_start |> Map.drop(["0", "1", "2"]) |> Map.values()
          allowed = if forked, do: ["/proc/", "anon_inode:[pidfd]"], else: ["/proc/"]
          assert Enum.all?(extra, &String.starts_with?(&1, allowed)), inspect(at_start)

          for {fd, target} <- Map.take(at_start, ["0", "1", "2"]),
              do: assert(target =~ "pipe:", fd)

          # No descriptor of the VM (epoll, eventfd, sockets, its pipes) reached the worker.
          refute Enum.any?(extra -- ["anon_inode:[pidfd]"], &MapSet.member?(beam_fds, &1))
        end
      end

      test "a grandchild dies when its worker exits, and at pool stop", %{method: method} = ctx do
        opts = start(ctx, start_method: method, pool_size: 1)
        {:ok, %{"pid" => g1}} = NativePool.execute_anonymous(:grandchild, %{}, opts)
        assert alive?(g1)

        {:error, {:worker_exited, %{exit_status: 7}}} =
          NativePool.execute_anonymous(:exit, %{code: 7}, opts)

        eventually(fn -> not alive?(g1) end)

        {:ok, %{"pid" => g2}} = NativePool.execute_anonymous(:grandchild, %{}, opts)
        assert alive?(g2)
        [worker] = status(opts).worker_pids
        server = ppid(worker)
        :ok = stop_supervised(opts[:pool])
        eventually(fn -> not alive?(g2) end)
        # The pool's fork server goes with it.
        eventually(fn -> not alive?(server) end)
      end

      test "exit statuses and signals reach the caller", %{method: method} = ctx do
        opts = start(ctx, start_method: method, pool_size: 1)
        [pid] = status(opts).worker_pids
        task = Task.async(fn -> NativePool.execute_anonymous(:sleep, %{ms: 60_000}, opts) end)
        eventually(fn -> status(opts).busy == 1 end)
        System.cmd("kill", ["-9", to_string(pid)])
        assert {:error, {:worker_exited, %{signal: 9}}} = Task.await(task)

        assert {:error, {:worker_exited, %{exit_status: 3}}} =
                 NativePool.execute_anonymous(:exit, %{code: 3}, opts)
      end

      test "worker id and env reach every worker, replacements too", %{method: method} = ctx do
        opts = start(ctx, start_method: method, pool_size: 2)
        ids = for pid <- status(opts).worker_pids, do: call_on(opts, pid, :ping)

        assert [{:ok, %{"env" => "yes"}}, {:ok, %{"env" => "yes"}}] = ids
        worker_ids = for {:ok, %{"worker_id" => id}} <- ids, do: id
        assert length(Enum.uniq(worker_ids)) == 2

        [pid, survivor] = status(opts).worker_pids
        System.cmd("kill", ["-9", to_string(pid)])

        new =
          eventually(fn ->
            st = status(opts)

            case st.worker_pids -- [pid, survivor] do
              [new] when st.ready == 2 -> new
              _ -> nil
            end
          end)

        {:ok, %{"worker_id" => survivor_id}} = call_on(opts, survivor, :ping)
        assert {:ok, %{"env" => "yes", "worker_id" => new_id}} = call_on(opts, new, :ping)
        assert new_id not in worker_ids and new_id != survivor_id
      end
    end
  end

  test "forked workers do not share their random state", ctx do
    opts = start(ctx, start_method: :fork_server, pool_size: 2)
    [a, b] = status(opts).worker_pids
    {:ok, %{"random" => ra}} = call_on(opts, a, :random)
    {:ok, %{"random" => rb}} = call_on(opts, b, :random)
    assert ra != rb
  end

  @tag :dspy
  @tag timeout: 180_000
  test "the DSPy bridge runs on a thread-free fork server by default; sessions and LM survive a worker" do
    bridge = :code.priv_dir(:dspex_native_pool) |> Path.join("python/dspy_bridge.py")
    opts = start_pool(script: bridge, pool_size: 2, start_timeout: 120_000)
    pids = status(opts).worker_pids
    [server] = pids |> Enum.map(&ppid/1) |> Enum.uniq()
    assert cmdline(server) =~ "fork_server.py"
    assert cmdline(server) =~ "--mode fork"
    # fork() copies one thread: the server must hold no other when it forks.
    assert File.ls!("/proc/#{server}/task") == [Integer.to_string(server)]

    call = &NativePool.execute_in_session("s1", &1, &2, [timeout: 60_000] ++ opts)
    {:ok, _} = NativePool.execute_anonymous(:configure_lm, %{provider: "dummy"}, opts)

    {:ok, _} =
      call.(:create_program, %{
        id: "p",
        signature: %{inputs: [%{name: "question"}], outputs: [%{name: "answer"}]},
        program_type: "predict"
      })

    {:ok, %{"worker_id" => _}} = NativePool.execute_anonymous(:ping, %{}, opts)
    {:ok, _} = call.(:execute_program, %{program_id: "p", inputs: %{question: "q1"}})

    for pid <- pids, do: System.cmd("kill", ["-9", to_string(pid)])

    eventually(
      fn ->
        st = status(opts)
        st.ready == 2 and Enum.all?(pids, &(&1 not in st.worker_pids))
      end,
      60_000
    )

    # New forks: the session is re-created and the LM replayed on them.
    assert {:ok, _} = call.(:execute_program, %{program_id: "p", inputs: %{question: "q2"}})
    assert Enum.all?(status(opts).worker_pids, &(ppid(&1) == server))
  end

  test "a fork server crash does not take live workers down; the next worker gets a new one",
       ctx do
    opts = start(ctx, start_method: :fork_server, pool_size: 2)
    [a, b] = status(opts).worker_pids
    zygote = ppid(a)
    System.cmd("kill", ["-9", to_string(zygote)])
    eventually(fn -> not alive?(zygote) end)

    # Both workers live on and answer.
    for pid <- [a, b], do: assert({:ok, %{"pid" => ^pid}} = call_on(opts, pid, :ping))

    # A new fork server starts at once (not when a worker is next needed).
    restarted =
      eventually(
        fn -> Enum.find(fork_servers(ctx.script), &(&1 != zygote)) end,
        30_000
      )

    # A worker that dies now is seen through its pidfd (no status: its parent is gone) and
    # replaced through a restarted fork server.
    {:ok, %{"pid" => g}} = call_on(opts, a, :grandchild)
    System.cmd("kill", ["-9", to_string(a)])

    c =
      eventually(fn ->
        st = status(opts)

        case st.worker_pids -- [a, b] do
          [c] when st.ready == 2 -> c
          _ -> nil
        end
      end)

    eventually(fn -> not alive?(g) end)
    assert ppid(c) == restarted
    assert {:ok, %{"forked" => true}} = call_on(opts, c, :ping)
    assert {:ok, _} = call_on(opts, b, :ping)
  end

  test "a script that cannot be forked from falls back to spawn, saying so" do
    test = self()
    handler = :"fallback_handler_#{System.unique_integer([:positive])}"

    :ok =
      :logger.add_handler(handler, __MODULE__.Handler, %{
        config: %{pid: test},
        level: :all
      })

    on_exit(fn -> :logger.remove_handler(handler) end)
    opts = start_pool(start_method: :fork_server, pool_size: 1)
    ping(opts)
    assert_receive {:logged, :warning, text, _}, 5_000
    assert text =~ "does not support the fork server"
    assert text =~ "starting its workers with :spawn"
  end

  test "start_method is validated" do
    assert_raise ArgumentError, ~r/:start_method to be :fork_server or :spawn, got: :clone/, fn ->
      NativePool.start_link(start_method: :clone)
    end
  end

  describe "stderr back-pressure" do
    test "a flood keeps the owner's mailbox bounded, drops lines with a count, spares other pools",
         ctx do
      test = self()
      handler = :"flood_handler_#{System.unique_integer([:positive])}"

      :ok =
        :logger.add_handler(handler, __MODULE__.Handler, %{
          config: %{pid: test},
          level: :all
        })

      on_exit(fn -> :logger.remove_handler(handler) end)
      flood = start(ctx, pool_size: 1)
      other = start(ctx, pool_size: 1)
      owner = Process.whereis(flood[:pool])

      sampler =
        Task.async(fn ->
          sample = fn sample, max ->
            receive do
              :stop -> max
            after
              1 ->
                {:message_queue_len, n} = Process.info(owner, :message_queue_len)
                sample.(sample, max(n, max))
            end
          end

          sample.(sample, 0)
        end)

      flooding =
        Task.async(fn ->
          NativePool.execute_anonymous(:flood, %{lines: 300_000, size: 200}, flood)
        end)

      # The other pool keeps answering while the flood runs.
      for _ <- 1..200, do: ping(other)
      assert {:ok, _} = Task.await(flooding, 60_000)
      send(sampler.pid, :stop)
      max_queue = Task.await(sampler)
      assert max_queue <= 3, "the owner's mailbox reached #{max_queue}"

      assert_receive {:logged, :warning, "WARNING dspex_native_pool: dropped " <> rest, _}, 5_000
      assert rest =~ "stderr lines of this worker"
    end

    test "a line without end is cut, with a marker, and the next line still arrives", ctx do
      test = self()
      handler = :"long_handler_#{System.unique_integer([:positive])}"

      :ok =
        :logger.add_handler(handler, __MODULE__.Handler, %{
          config: %{pid: test},
          level: :all
        })

      on_exit(fn -> :logger.remove_handler(handler) end)
      opts = start(ctx, pool_size: 1)
      {:ok, _} = NativePool.execute_anonymous(:long_line, %{size: 50_000_000}, opts)
      assert_receive {:logged, :info, "yyyy" <> _ = line, _}, 10_000
      assert line =~ ~r/ \[\.\.\. \d+ bytes truncated\]$/
      assert byte_size(line) < 9_000
      assert_receive {:logged, :info, "after the long line", _}, 10_000
    end
  end

  @tag timeout: 120_000
  test "a VM killed with SIGKILL leaves no fork server, worker or grandchild behind", ctx do
    ebin = :code.lib_dir(:dspex_native_pool) |> Path.join("ebin")

    script = """
    alias DSPex.PythonBridge.NativePool
    {:ok, _} = NativePool.start_link(pool_size: 2, lazy: false, start_method: :fork_server, script: #{inspect(ctx.script)})
    pids = NativePool.get_pool_status().worker_pids
    grandchildren = for _ <- pids, do: elem(NativePool.execute_anonymous(:grandchild, %{}), 1)["pid"]
    IO.puts("READY \#{System.pid()} " <> Enum.join(pids ++ grandchildren, ","))
    Process.sleep(:infinity)
    """

    port =
      Port.open({:spawn_executable, System.find_executable("elixir")}, [
        :binary,
        :exit_status,
        {:line, 4096},
        args: ["-pa", ebin, "-e", script]
      ])

    {beam, procs} = await_ready(port)
    zygotes = procs |> Enum.take(2) |> Enum.map(&ppid/1) |> Enum.uniq()
    assert [zygote] = zygotes
    assert Integer.to_string(ppid(zygote)) == beam
    all = [zygote | procs]
    assert Enum.all?(all, &alive?/1)

    System.cmd("kill", ["-9", beam])
    assert_receive {^port, {:exit_status, _}}, 10_000
    eventually(fn -> Enum.all?(all, &(not alive?(&1))) end)
  end

  # Runs `command` on the worker with OS pid `pid` (checking workers out until it comes).
  defp call_on(opts, pid, command) do
    held = hold_until(opts, pid, [])

    try do
      [{checkout, _} | _] = held
      NativePool.call(checkout, command, %{}, [])
    after
      for {c, _} <- held, do: NativePool.checkin(c)
    end
  end

  defp hold_until(opts, pid, held) do
    {:ok, checkout} = NativePool.checkout(:anonymous, opts)
    {:ok, %{"pid" => got}} = NativePool.call(checkout, :ping, %{}, [])

    if got == pid do
      [{checkout, got} | held]
    else
      if length(held) > 8, do: flunk("worker #{pid} not found")
      hold_until(opts, pid, held ++ [{checkout, got}])
    end
  end
end
