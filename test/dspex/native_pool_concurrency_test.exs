defmodule DSPex.NativePoolConcurrencyTest do
  # Protocol v2 end to end, with real Python workers: several requests in flight per worker,
  # cancel on timeout, the heartbeat, intermediate events and control frames; and a worker
  # that announces nothing, driven one request at a time as before.
  use DSPex.NativePool.PoolCase, async: true

  @v2 [{"TEST_WORKER_PROTOCOL", "2"}, {"TEST_WORKER_CONCURRENCY", "8"}]

  defp stats(opts) do
    {:ok, stats} = NativePool.execute_anonymous(:stats, %{}, opts)
    stats
  end

  defp concurrently(n, fun) do
    1..n
    |> Enum.map(fn i -> Task.async(fn -> fun.(i) end) end)
    |> Enum.map(&Task.await(&1, 30_000))
  end

  describe "a worker that announces protocol 2" do
    test "runs two requests at once (they overlap in the worker)" do
      opts = start_pool(pool_size: 1, env: @v2)
      assert %{capacity: 8, in_flight: 0} = status(opts)

      first = Task.async(fn -> NativePool.execute_anonymous(:sleep, %{ms: 1_500}, opts) end)
      eventually(fn -> status(opts).in_flight == 1 end)
      # The worker is busy, and still takes a second request at once.
      assert {:ok, %{"slept" => 10}} = NativePool.execute_anonymous(:sleep, %{ms: 10}, opts)
      assert {:ok, %{"slept" => 1_500}} = Task.await(first)
      # Both sleeps were in flight in the one worker at the same time.
      assert %{"peak_in_flight" => 2, "protocol" => 2} = stats(opts)
    end

    test ":worker_concurrency caps what the worker announces" do
      opts = start_pool(pool_size: 1, env: @v2, worker_concurrency: 1)
      assert %{capacity: 1} = status(opts)

      results = concurrently(3, fn _ -> NativePool.execute_anonymous(:sleep, %{ms: 50}, opts) end)

      assert Enum.all?(results, &match?({:ok, _}, &1))
      assert %{"peak_in_flight" => 1} = stats(opts)
    end

    test "a timed-out request is cancelled in Python, its late reply reaches nobody, the worker stays" do
      opts = start_pool(pool_size: 1, env: @v2)
      %{"pid" => pid} = stats(opts)

      assert {:error, {:timeout, _}} =
               NativePool.execute_anonymous(:sleep, %{ms: 5_000}, [timeout: 200] ++ opts)

      # The worker got the cancel (and answered the cancelled request, which the pool dropped).
      eventually(fn ->
        match?(%{"cancelled_ids" => [_], "in_flight" => 0}, stats(opts))
      end)

      assert %{"pid" => ^pid} = stats(opts)

      assert %{worker_pids: [^pid], counters: %{recycled: 0, cancelled: 1, timeouts: 1}} =
               status(opts)

      # Another request on the same worker still gets its own reply, and nothing else arrives.
      assert {:ok, %{"x" => 1}} = NativePool.execute_anonymous(:echo, %{x: 1}, opts)
      refute_received {_ref, _}
    end

    test "a caller that dies mid-request cancels it; the worker stays" do
      opts = start_pool(pool_size: 1, env: @v2)
      %{"pid" => pid} = stats(opts)

      {caller, monitor} =
        spawn_monitor(fn -> NativePool.execute_anonymous(:sleep, %{ms: 5_000}, opts) end)

      eventually(fn -> status(opts).in_flight == 1 end)
      Process.exit(caller, :kill)
      assert_receive {:DOWN, ^monitor, _, _, _}
      eventually(fn -> match?(%{"cancelled_ids" => [_], "in_flight" => 0}, stats(opts)) end)
      assert %{worker_pids: [^pid], counters: %{recycled: 0}} = status(opts)
    end

    test "a worker that stops answering is recycled by the heartbeat" do
      opts = start_pool(pool_size: 1, env: @v2, heartbeat_timeout: 300)
      %{"pid" => pid} = stats(opts)

      # go_silent never answers anything again, pings included.
      assert {:error, {:worker_unresponsive, detail}} =
               NativePool.execute_anonymous(:go_silent, %{}, [timeout: 60_000] ++ opts)

      assert detail =~ "300 ms"
      eventually(fn -> match?(%{ready: 1, worker_pids: [p]} when p != pid, status(opts)) end)
      assert status(opts).counters.recycled == 1
    end

    test "a request on a worker the heartbeat recycled is re-run where :retries allows" do
      opts = start_pool(pool_size: 1, env: @v2, heartbeat_timeout: 300)

      # Each run silences its worker: two runs, two recycled workers, then the error.
      assert {:error, {:worker_unresponsive, _}} =
               NativePool.execute_anonymous(
                 :go_silent,
                 %{},
                 [timeout: 60_000, retries: 1] ++ opts
               )

      assert status(opts).counters.recycled == 2
    end

    test "a quiet but alive worker is pinged, not recycled" do
      opts = start_pool(pool_size: 1, env: @v2, heartbeat_timeout: 1_000)
      %{"pid" => pid} = stats(opts)
      # 2.5 s of silence on the request: the pings it answers (every third of a second) keep it.
      assert {:ok, _} = NativePool.execute_anonymous(:sleep, %{ms: 2_500}, opts)
      assert %{worker_pids: [^pid], counters: %{recycled: 0}} = status(opts)
    end

    test "intermediate events reach the caller and control frames answer tool calls" do
      opts = start_pool(pool_size: 1, env: @v2)
      %{resource: resource} = :persistent_term.get({NativePool, opts[:pool]})
      ref = make_ref()
      :ok = Native.execute(resource, ref, :anonymous, "chunks", %{n: 2}, 5_000, 5_000, false)

      assert_receive {^ref, {:event, _lease, %{"event" => "chunk", "text" => "chunk 0 "}}}, 5_000
      assert_receive {^ref, {:event, _lease, %{"event" => "chunk", "text" => "chunk 1 "}}}, 5_000
      assert_receive {^ref, {:ok, %{"chunks" => 2}}}, 5_000

      # The plain API skips events and returns the reply.
      assert {:ok, %{"chunks" => 3}} = NativePool.execute_anonymous(:chunks, %{n: 3}, opts)

      ref = make_ref()
      :ok = Native.execute(resource, ref, :anonymous, "tool", %{name: "add"}, 5_000, 5_000, false)

      assert_receive {^ref,
                      {:event, lease, %{"event" => "tool_call", "call_id" => 1, "name" => "add"}}},
                     5_000

      assert {:error, {:invalid_args, _}} = Native.control(resource, lease, [1])

      assert :ok =
               Native.control(resource, lease, %{
                 control: "tool_result",
                 call_id: 1,
                 ok: true,
                 result: 42
               })

      assert_receive {^ref, {:ok, %{"tool_results" => [_]} = result}}, 5_000
      assert inspect(result) =~ "42"

      # The dirty variant (for a body too large to encode on a normal scheduler: `control/3`
      # then returns :dirty) does the same.
      ref = make_ref()
      :ok = Native.execute(resource, ref, :anonymous, "tool", %{name: "big"}, 5_000, 5_000, false)
      assert_receive {^ref, {:event, lease, %{"event" => "tool_call"}}}, 5_000

      big = %{
        control: "tool_result",
        call_id: 1,
        ok: true,
        result: String.duplicate("x", 100_000)
      }

      assert :ok = Native.control_dirty(resource, lease, big)
      assert_receive {^ref, {:ok, %{"tool_results" => [_]}}}, 5_000
      assert {:error, {:checkout_failed, _}} = Native.control(resource, lease, %{control: "x"})
    end

    test "control/3: structs written as in arguments, bodies nested past serde_json's 128" do
      opts = start_pool(pool_size: 1, env: @v2)
      %{resource: resource} = :persistent_term.get({NativePool, opts[:pool]})

      tool_call = fn ->
        ref = make_ref()

        :ok =
          Native.execute(resource, ref, :anonymous, "tool", %{name: "add"}, 5_000, 5_000, false)

        assert_receive {^ref, {:event, lease, %{"event" => "tool_call"}}}, 5_000
        {ref, lease}
      end

      {ref, lease} = tool_call.()
      body = %{control: "tool_result", call_id: 1, ok: true, result: %{at: ~D[2025-07-01]}}
      # The NIF stops at the struct; control/3 converts the body and sends it again.
      assert :structs = Native.control(resource, lease, body)
      assert :ok = NativePool.control(lease, body, opts)
      assert_receive {^ref, {:ok, %{"tool_results" => [_]} = result}}, 5_000
      assert inspect(result) =~ "2025-07-01"

      # 200 levels: the control frame is checked and written without a recursive parser.
      {ref, lease} = tool_call.()
      deep = Enum.reduce(1..200, "leaf", fn _, acc -> [acc] end)
      assert :ok = NativePool.control(lease, %{body | result: deep}, opts)
      assert_receive {^ref, {:ok, %{"tool_results" => [_]} = result}}, 5_000
      assert inspect(result, limit: :infinity) =~ "leaf"

      assert {:error, {:invalid_args, "expected a lease" <> _}} =
               NativePool.control(:nope, body, opts)

      assert {:error, {:checkout_failed, _}} = NativePool.control(lease, %{control: "x"}, opts)
    end
  end

  describe "a worker that announces nothing" do
    test "is driven one request at a time, as before" do
      opts = start_pool(pool_size: 1, max_overflow: 0, worker_concurrency: 8)
      assert %{capacity: 1} = status(opts)

      results = concurrently(3, fn _ -> NativePool.execute_anonymous(:sleep, %{ms: 50}, opts) end)

      assert Enum.all?(results, &match?({:ok, %{"slept" => 50}}, &1))
      assert %{"protocol" => 1} = st = stats(opts)
      assert st["peak_in_flight"] <= 1

      # A timeout still recycles it (no cancel frame is ever sent to it).
      %{"pid" => pid} = stats(opts)

      assert {:error, {:timeout, _}} =
               NativePool.execute_anonymous(:sleep, %{ms: 5_000}, [timeout: 100] ++ opts)

      eventually(fn -> match?(%{ready: 1, worker_pids: [p]} when p != pid, status(opts)) end)
      assert %{counters: %{recycled: 1, cancelled: 0}} = status(opts)
    end
  end

  describe "options" do
    test "bad :worker_concurrency and :heartbeat_timeout raise" do
      for {k, v} <- [worker_concurrency: 0, worker_concurrency: "8", heartbeat_timeout: 0] do
        assert_raise ArgumentError, ~r/got: /, fn ->
          NativePool.start_link([{k, v}, script: test_worker()])
        end
      end
    end
  end
end
