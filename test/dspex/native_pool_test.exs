defmodule DSPex.PythonBridge.NativePoolTest do
  use DSPex.NativePool.PoolCase, async: true

  describe "calls" do
    test "execute_anonymous and execute_in_session round-trip terms through a worker" do
      opts = start_pool()
      assert {:ok, %{"status" => "ok"}} = NativePool.execute_anonymous(:ping, %{}, opts)

      args = %{a: 1, list: [1, 2.5, nil, true, "é"], tuple: {1, :x}, nested: %{"k" => %{1 => 2}}}

      assert {:ok, echoed} = NativePool.execute_in_session("s1", "echo", args, opts)

      assert echoed == %{
               "a" => 1,
               "list" => [1, 2.5, nil, true, "é"],
               "tuple" => [1, "x"],
               "nested" => %{"k" => %{"1" => 2}},
               "session_id" => "s1"
             }
    end

    test "a command that fails in Python returns Python's message" do
      opts = start_pool()
      assert {:error, "boom"} = NativePool.execute_anonymous(:fail, %{message: "boom"}, opts)
      assert {:error, "Unknown command: nope"} = NativePool.execute_anonymous(:nope, %{}, opts)
    end

    test "8 concurrent sleeps on 8 workers run together, not one after another" do
      opts = start_pool(pool_size: 8)
      sleep = fn -> NativePool.execute_anonymous(:sleep, %{ms: 200}, opts) end

      {one, {:ok, _}} = :timer.tc(sleep)

      {eight, results} =
        :timer.tc(fn ->
          1..8 |> Enum.map(fn _ -> Task.async(sleep) end) |> Enum.map(&Task.await/1)
        end)

      assert Enum.all?(results, &match?({:ok, %{"slept" => 200}}, &1))
      # Serialised, eight would take 8x one call; concurrent, about 1x.
      assert eight < one * 2, "8 concurrent calls took #{eight} µs, one took #{one} µs"
    end
  end

  describe "bad input" do
    test "unencodable arguments are refused before any worker is touched" do
      opts = start_pool()
      before = status(opts).counters.requests

      for {args, fragment} <- [
            {%{pid: self()}, "args.pid is a pid"},
            {%{r: make_ref()}, "args.r is a reference"},
            {%{f: fn -> :ok end}, "args.f is a function"},
            {%{b: <<0xFF, 0xFE>>}, "args.b is a binary that is not valid UTF-8"},
            {%{l: [1 | 2]}, "args.l is an improper list"},
            {%{deep: [%{x: [self()]}]}, "args.deep[0].x[0] is a pid"},
            {%{s: URI.parse("http://x")}, "args.s is a struct (URI)"},
            {%{{:tuple, :key} => 1}, "map key that is not an atom, string or integer"}
          ] do
        assert {:error, {:invalid_args, message}} =
                 NativePool.execute_anonymous(:echo, args, opts)

        assert message =~ fragment
      end

      assert {:error, {:invalid_args, _}} = NativePool.execute_anonymous(:echo, :not_a_map, opts)
      assert status(opts).counters.requests == before
    end

    test "a request over max_frame_size is refused; a reply over it is a decode error" do
      opts = start_pool(pool_size: 1, max_frame_size: 4096)
      big = String.duplicate("x", 5000)

      assert {:error, {:invalid_args, msg}} = NativePool.execute_anonymous(:echo, %{s: big}, opts)
      assert msg =~ "max_frame_size"

      assert {:error, {:decode_error, msg}} =
               NativePool.execute_anonymous(:big, %{bytes: 5000}, opts)

      assert msg =~ "max_frame_size"
      assert {:ok, _} = NativePool.execute_anonymous(:ping, %{}, opts)
    end

    test "large arguments and replies round-trip (encoded off the normal schedulers)" do
      opts = start_pool(pool_size: 1)
      text = String.duplicate("é", 600_000)
      items = for i <- 1..5_000, do: %{i: i}

      assert {:ok, %{"t" => ^text, "items" => back}} =
               NativePool.execute_anonymous(:echo, %{t: text, items: items}, opts)

      assert length(back) == 5_000

      {:ok, checkout} = NativePool.checkout(:anonymous, opts)
      assert {:ok, %{"t" => ^text}} = NativePool.call(checkout, :echo, %{t: text})
      NativePool.checkin(checkout)
    end

    test "a worker that writes garbage to stdout is recycled with a decode error" do
      opts = start_pool(pool_size: 1)
      [pid] = status(opts).worker_pids

      assert {:error, {:decode_error, _}} =
               NativePool.execute_anonymous(:garbage_stdout, %{}, opts)

      assert {:ok, %{"pid" => new_pid}} = NativePool.execute_anonymous(:ping, %{}, opts)
      assert new_pid != pid
      assert {:error, {:decode_error, _}} = NativePool.execute_anonymous(:garbage_json, %{}, opts)
      assert status(opts).counters.recycled == 2
    end

    test "a reply with another id is :response_mismatch, one without success is :malformed_response" do
      opts = start_pool(pool_size: 1)
      assert {:error, :response_mismatch} = NativePool.execute_anonymous(:wrong_id, %{}, opts)

      assert {:error, :malformed_response} =
               NativePool.execute_anonymous(:no_success_key, %{}, opts)

      assert {:ok, _} = NativePool.execute_anonymous(:ping, %{}, opts)
      assert status(opts).counters.recycled == 2
    end

    test "Python's print goes to stderr and cannot corrupt the protocol" do
      opts = start_pool(pool_size: 1)
      [pid] = status(opts).worker_pids

      assert {:ok, %{"printed" => true}} =
               NativePool.execute_anonymous(:print_stdout, %{text: "hi"}, opts)

      assert {:ok, %{"pid" => ^pid}} = NativePool.execute_anonymous(:ping, %{}, opts)
    end
  end

  describe "timeouts and crashes" do
    test "a queue wait over :pool_timeout fails and leaves the queue" do
      opts = start_pool(pool_size: 1, max_overflow: 0)
      {:ok, held} = NativePool.checkout(:anonymous, opts)

      assert {:error, {:pool_timeout, _}} =
               NativePool.execute_anonymous(:ping, %{}, [pool_timeout: 50] ++ opts)

      assert status(opts).queued_callers == 0
      NativePool.checkin(held)
    end

    test "a request over :timeout recycles the worker; its late reply reaches nobody" do
      opts = start_pool(pool_size: 1)
      [pid] = status(opts).worker_pids

      assert {:error, {:timeout, _}} =
               NativePool.execute_anonymous(:sleep, %{ms: 2_000}, [timeout: 50] ++ opts)

      assert {:ok, %{"v" => "after"}} = NativePool.execute_anonymous(:echo, %{v: "after"}, opts)

      refute alive?(pid)
      refute_received _
      assert status(opts).counters.timeouts == 1
    end

    test "a worker that dies mid-request reports its exit status; the pool refills" do
      opts = start_pool(pool_size: 2)

      assert {:error, {:worker_exited, %{exit_status: 3}}} =
               NativePool.execute_anonymous(:exit, %{code: 3}, opts)

      assert {:error, {:worker_exited, %{signal: 9}}} =
               NativePool.execute_anonymous(:kill_self, %{}, opts)

      eventually(fn -> status(opts).ready == 2 end)
      assert length(status(opts).worker_pids) == 2
    end
  end

  describe "callers that exit" do
    test "a caller that exits while queued leaves the queue" do
      opts = start_pool(pool_size: 1, max_overflow: 0)
      {:ok, held} = NativePool.checkout(:anonymous, opts)

      waiter = spawn(fn -> NativePool.execute_anonymous(:ping, %{}, opts) end)
      eventually(fn -> status(opts).queued_callers == 1 end)
      Process.exit(waiter, :kill)
      eventually(fn -> status(opts).queued_callers == 0 end)

      NativePool.checkin(held)
      assert status(opts).ready == 1
    end

    test "a caller that exits holding a checkout gives the worker back" do
      opts = start_pool(pool_size: 1)
      parent = self()

      holder =
        spawn(fn ->
          {:ok, _checkout} = NativePool.checkout(:anonymous, opts)
          send(parent, :checked_out)
          Process.sleep(:infinity)
        end)

      assert_receive :checked_out
      assert status(opts).busy == 1
      [pid] = status(opts).worker_pids
      Process.exit(holder, :kill)
      eventually(fn -> status(opts).ready == 1 end)
      # The same worker: nothing was in flight, so nothing was recycled.
      assert status(opts).worker_pids == [pid]
    end

    test "a caller that exits with a request in flight gets its worker recycled" do
      opts = start_pool(pool_size: 1)
      [pid] = status(opts).worker_pids
      caller = spawn(fn -> NativePool.execute_anonymous(:sleep, %{ms: 5_000}, opts) end)
      eventually(fn -> status(opts).busy == 1 end)
      Process.exit(caller, :kill)
      eventually(fn -> status(opts).ready == 1 and status(opts).worker_pids != [pid] end)
      refute alive?(pid)
      assert status(opts).counters.recycled == 1
    end
  end

  describe "checkouts" do
    test "checkout, call, checkin; call after checkin is refused" do
      opts = start_pool(pool_size: 1)
      {:ok, checkout} = NativePool.checkout({:session, "cs"}, opts)
      assert {:ok, %{"session_id" => "cs", "x" => 1}} = NativePool.call(checkout, :echo, %{x: 1})
      assert {:ok, %{"pid" => pid}} = NativePool.call(checkout, :ping, %{})
      assert {:ok, %{"pid" => ^pid}} = NativePool.call(checkout, :ping, %{})
      :ok = NativePool.checkin(checkout)
      assert {:error, {:checkout_failed, _}} = NativePool.call(checkout, :ping, %{})
      :ok = NativePool.checkin(checkout)
      # Every reply was consumed by its call: nothing stray is left in the mailbox.
      refute_received _
    end

    test "a queued checkout is served when the worker comes back" do
      opts = start_pool(pool_size: 1, max_overflow: 0)
      {:ok, first} = NativePool.checkout(:anonymous, opts)
      parent = self()

      spawn_link(fn ->
        send(parent, {:second, NativePool.checkout(:anonymous, opts)})
      end)

      eventually(fn -> status(opts).queued_callers == 1 end)
      NativePool.checkin(first)
      assert_receive {:second, {:ok, _}}
    end

    test "with_checkout checks in even when the function raises" do
      opts = start_pool(pool_size: 1)

      assert_raise RuntimeError, fn ->
        NativePool.with_checkout(:anonymous, fn _ -> raise "inside" end, opts)
      end

      assert status(opts).ready == 1

      assert {:ok, _} =
               NativePool.with_checkout(:anonymous, &NativePool.call(&1, :ping, %{}), opts)
    end

    test "overflow workers start when every worker is held, and are counted" do
      opts = start_pool(pool_size: 1, max_overflow: 1)
      {:ok, a} = NativePool.checkout(:anonymous, opts)
      {:ok, b} = NativePool.checkout(:anonymous, opts)
      assert %{busy: 2, overflow: 1} = status(opts)
      NativePool.checkin(a)
      NativePool.checkin(b)
    end
  end

  describe "sessions" do
    test "a session finds its programs after the worker holding them is killed" do
      assert_recreated_after_kill(%{id: "p1"})
    end

    test "a program whose spec nests 200 levels deep is re-created too" do
      # The record used to be parsed with serde_json, which stops at 128 levels: such a
      # program was not recorded, and gone ("Program not found") once its worker died.
      assert_recreated_after_kill(%{
        id: "p1",
        signature: Enum.reduce(1..200, "leaf", fn _, acc -> [acc] end)
      })
    end

    # Creates program "p1" from `spec` in session "s", kills the worker that holds it, and
    # checks the session's next call finds it on another worker (one restore).
    defp assert_recreated_after_kill(spec) do
      opts = start_pool(pool_size: 2)

      {:ok, %{"program_id" => "p1"}} =
        NativePool.execute_in_session("s", :create_program, spec, opts)

      {:ok, %{"worker_pid" => holder}} =
        NativePool.execute_in_session("s", :execute_program, %{program_id: "p1"}, opts)

      System.cmd("kill", ["-9", to_string(holder)])
      eventually(fn -> not alive?(holder) end)

      assert {:ok, %{"worker_pid" => other}} =
               NativePool.execute_in_session("s", :execute_program, %{program_id: "p1"}, opts)

      assert other != holder
      assert status(opts).counters.restores == 1
    end
  end

  describe "status and health" do
    test "get_pool_status has V2's keys and real worker counts" do
      opts = start_pool(pool_size: 2, max_overflow: 3)
      status = status(opts)

      assert %{pool_size: 2, max_overflow: 3, active_sessions: n, sessions: l, uptime_ms: _} =
               status

      assert n == length(l)
      assert status.session_affinity == %{}

      assert %{ready: 2, busy: 0, starting: 0, overflow: 0, queued_callers: 0} = status
      assert length(status.worker_pids) == 2
      assert Enum.all?(status.worker_pids, &alive?/1)
    end

    test "a lazy pool starts workers on demand" do
      opts = start_pool(pool_size: 2, lazy: true)
      assert %{ready: 0, starting: 0, worker_pids: []} = status(opts)
      assert {:ok, _} = NativePool.execute_anonymous(:ping, %{}, opts)
      assert %{ready: 1, worker_pids: [_]} = status(opts)
    end

    test "health_check pings every free worker" do
      opts = start_pool(pool_size: 3)
      assert {:ok, :healthy} = NativePool.health_check(opts)

      # Three checkouts at once hold three different workers.
      checkouts = for _ <- 1..3, do: elem(NativePool.checkout(:anonymous, opts), 1)
      calls = for c <- checkouts, do: elem(NativePool.call(c, :stats, %{}), 1)["calls"]
      Enum.each(checkouts, &NativePool.checkin/1)
      # Each: the handshake, start-up's warm-up ping, one health ping, and this `stats`.
      assert calls == [4, 4, 4]
    end

    test "an eager pool's start-up ends with one ping to every worker through the callers' path" do
      opts = start_pool(pool_size: 3)
      # Counted before anyone called: one request per worker (handshakes are not requests).
      assert %{counters: %{requests: 3, errors: 0}, ready: 3, busy: 0} = status(opts)

      checkouts = for _ <- 1..3, do: elem(NativePool.checkout(:anonymous, opts), 1)
      calls = for c <- checkouts, do: elem(NativePool.call(c, :stats, %{}), 1)["calls"]
      Enum.each(checkouts, &NativePool.checkin/1)
      # Each worker: its handshake, start-up's ping, and this `stats`.
      assert calls == [3, 3, 3]

      # A lazy pool has no worker to warm up when start_link returns.
      lazy = start_pool(pool_size: 2, lazy: true)
      assert %{counters: %{requests: 0}, ready: 0} = status(lazy)
    end

    test "a lazy pool whose python cannot start reports why, and fails fast" do
      opts = start_pool(lazy: true, python: "/nonexistent/python3")
      assert {:error, {:unhealthy, {:checkout_failed, msg}}} = NativePool.health_check(opts)
      assert msg =~ "/nonexistent/python3" or msg =~ "No such file"
    end
  end
end
