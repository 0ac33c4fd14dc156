defmodule DSPex.NativePool.ReplyPathTest do
  # The reply path of issue 13: a worker's stdout sits in ERTS's poll set, armed for the caller
  # waiting for its only request, which reads the reply in its own process (`read/3`); the
  # pool's owner reads everything else. Its edge cases, against real test workers.
  use DSPex.NativePool.PoolCase, async: true

  @v2 [{"TEST_WORKER_PROTOCOL", "2"}, {"TEST_WORKER_CONCURRENCY", "8"}]

  setup do
    dir = Path.join(System.tmp_dir!(), "dspex_reply_path_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf!(dir) end)
    %{gate: Path.join(dir, "gate")}
  end

  # Runs a request in a process of its own; it reports its result and what was left in its
  # mailbox afterwards (a notification meant for it must never outlive its call).
  defp call_in_process(command, args, opts) do
    parent = self()

    spawn(fn ->
      result = NativePool.execute_anonymous(command, args, opts)
      {:messages, left} = Process.info(self(), :messages)
      send(parent, {:result, self(), result, left})
    end)
  end

  defp readable_for?(pid) do
    {:messages, messages} = Process.info(pid, :messages)
    Enum.any?(messages, &match?({ref, {:"$dspex_readable", _, _}} when is_reference(ref), &1))
  end

  describe "a reply read by its caller" do
    test "a frame split across many reads reaches its caller whole" do
      opts = start_pool(pool_size: 1)

      assert {:ok, %{"data" => data, "nonce" => 7}} =
               NativePool.execute_anonymous(:split, %{pieces: 24, bytes: 300, nonce: 7}, opts)

      assert data == String.duplicate("y", 300)
      assert {:messages, []} = Process.info(self(), :messages)
    end

    test "a frame over the scheduler's budget, split across reads, is read on and delivered" do
      opts = start_pool(pool_size: 1)
      size = 200_000

      assert {:ok, %{"data" => data, "nonce" => 8}} =
               NativePool.execute_anonymous(:split, %{pieces: 9, bytes: size, nonce: 8}, opts)

      assert byte_size(data) == size
      # The worker stays: nothing was lost or left in the pipe.
      [pid] = status(opts).worker_pids
      assert {:ok, %{"pid" => ^pid}} = NativePool.execute_anonymous(:ping, %{}, opts)
      assert {:messages, []} = Process.info(self(), :messages)
    end

    test "a checkout's calls each read their own reply, one after the other" do
      opts = start_pool(pool_size: 1)
      {:ok, checkout} = NativePool.checkout(:anonymous, opts)

      for n <- 1..20 do
        assert {:ok, %{"data" => _, "nonce" => ^n}} =
                 NativePool.call(checkout, :split, %{pieces: 3, bytes: 10, nonce: n})
      end

      NativePool.checkin(checkout)
      assert {:messages, []} = Process.info(self(), :messages)
    end
  end

  describe "edge cases of a caller waiting on the poller" do
    test "a worker killed while its caller waits on the poller fails the call, nothing left behind",
         %{gate: gate} do
      opts = start_pool(pool_size: 1)
      [os_pid] = status(opts).worker_pids
      caller = call_in_process(:gate, %{path: gate}, opts ++ [retries: 0])
      eventually(fn -> status(opts).busy == 1 end)

      System.cmd("kill", ["-9", Integer.to_string(os_pid)])

      assert_receive {:result, ^caller, {:error, {:worker_exited, %{signal: 9}}}, []}, 5_000
      eventually(fn -> status(opts).ready == 1 end)
      assert {:ok, %{"pid" => new_pid}} = NativePool.execute_anonymous(:ping, %{}, opts)
      assert new_pid != os_pid
    end

    test "a timeout that fires while the reply waits unread ends the call with the timeout",
         %{gate: gate} do
      opts = start_pool(pool_size: 1)
      caller = call_in_process(:gate, %{path: gate}, opts ++ [timeout: 1_000, retries: 0])
      eventually(fn -> status(opts).busy == 1 end)

      # The caller cannot run: the reply becomes readable (ERTS tells the caller), then the
      # request times out while the reply is still unread.
      :erlang.suspend_process(caller)
      File.write!(gate, "")
      eventually(fn -> readable_for?(caller) end)
      eventually(fn -> status(opts).counters.timeouts == 1 end)
      :erlang.resume_process(caller)

      assert_receive {:result, ^caller, {:error, {:timeout, _}}, []}, 5_000
      assert {:ok, %{"pid" => _}} = NativePool.execute_anonymous(:ping, %{}, opts)
    end

    test "a protocol-2 worker: the timed-out request is cancelled, the worker stays",
         %{gate: gate} do
      opts = start_pool(pool_size: 1, env: @v2)
      [os_pid] = status(opts).worker_pids
      caller = call_in_process(:gate, %{path: gate}, opts ++ [timeout: 1_000, retries: 0])
      eventually(fn -> status(opts).in_flight == 1 end)

      :erlang.suspend_process(caller)
      eventually(fn -> status(opts).counters.timeouts == 1 end)
      File.write!(gate, "")
      :erlang.resume_process(caller)

      assert_receive {:result, ^caller, {:error, {:timeout, _}}, []}, 5_000
      assert {:ok, %{"pid" => ^os_pid}} = NativePool.execute_anonymous(:ping, %{}, opts)
    end

    test "a caller killed while the worker's stdout is armed for it: the next caller is served",
         %{gate: gate} do
      for env <- [[], @v2] do
        opts = start_pool(pool_size: 1, env: env)
        File.rm(gate)
        caller = call_in_process(:gate, %{path: gate}, opts)
        eventually(fn -> status(opts).busy + status(opts).in_flight > 0 end)

        Process.exit(caller, :kill)
        File.write!(gate, "")

        assert {:ok, %{"nonce" => 3}} = NativePool.execute_anonymous(:ping, %{nonce: 3}, opts)
        eventually(fn -> status(opts).open_leases == 0 end)
      end
    end

    test "requests multiplexed on one protocol-2 worker each get their own reply" do
      opts = start_pool(pool_size: 1, env: @v2)

      results =
        1..40
        |> Task.async_stream(
          fn n ->
            NativePool.execute_anonymous(:split, %{pieces: 2, bytes: n, nonce: n}, opts)
          end,
          max_concurrency: 8
        )
        |> Enum.map(fn {:ok, reply} -> reply end)

      for {reply, n} <- Enum.with_index(results, 1) do
        assert {:ok, %{"nonce" => ^n, "data" => data}} = reply
        assert byte_size(data) == n
      end
    end
  end

  describe "replies no caller reads" do
    test "are read by the pool's reader, not held up by a busy pool server", %{gate: gate} do
      opts = start_pool(pool_size: 1, env: @v2)
      server = GenServer.whereis(opts[:pool])
      # Two requests in flight on one worker: neither caller reads for the other.
      callers = for _ <- 1..2, do: call_in_process(:gate, %{path: gate}, opts)
      eventually(fn -> status(opts).in_flight == 2 end)

      :sys.suspend(server)
      File.write!(gate, "")

      for caller <- callers do
        assert_receive {:result, ^caller, {:ok, %{"opened" => true}}, []}, 5_000
      end

      :sys.resume(server)
    end

    test "a health check in the pool's server on a lazy pool reads the new worker's handshake" do
      opts = start_pool(pool_size: 1, lazy: true)
      assert status(opts).ready == 0
      # `:health_check` runs in the server; the handshake it waits for is read meanwhile.
      assert {:ok, :healthy} = GenServer.call(opts[:pool], :health_check, 10_000)
    end
  end
end
