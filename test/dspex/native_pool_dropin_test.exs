defmodule DSPex.PythonBridge.NativePoolDropInTest do
  # What DSPex code and DSPex's tests do with SessionPoolV2 (issue 9), and the pool's owner,
  # shutdown and API edges (issue 8, items 2, 9, 10, 11).
  # Not async: sessions are global, and some tests count OS processes.
  use DSPex.NativePool.PoolCase, async: false

  import ExUnit.CaptureLog

  alias DSPex.NativePool.Server

  defp unique_name, do: :"dropin_#{System.unique_integer([:positive])}"

  defp base_opts(name, extra \\ []) do
    Keyword.merge([name: name, pool_size: 2, script: test_worker(), shutdown_grace: 200], extra)
  end

  defp pool_pids(name), do: NativePool.get_pool_status(name).worker_pids

  describe "names and processes" do
    test "start_link(name: X) registers X; X answers V2's calls; GenServer.stop frees it at once" do
      name = unique_name()
      {:ok, pid} = NativePool.start_link(base_opts(name))
      assert Process.whereis(name) == pid

      assert %{pool_size: 2, session_affinity: %{}, active_sessions: _} =
               GenServer.call(name, :get_status)

      pool_name = GenServer.call(name, :get_pool_name)
      assert pool_name == :"#{name}_pool"
      assert NativePool.get_pool_name_for(name) == pool_name
      assert {:ok, :healthy} = GenServer.call(name, :health_check)

      # Calls take the pool's name or V2's pool name, as :pool or :pool_name.
      assert {:ok, %{"pid" => _}} = NativePool.execute_anonymous(:ping, %{}, pool_name: pool_name)
      assert {:ok, _} = NativePool.execute_anonymous(:ping, %{}, pool_name: name)
      assert {:ok, _} = NativePool.execute_in_session("s", :ping, %{}, %{pool_name: pool_name})

      workers = pool_pids(name)
      assert length(workers) == 2
      :ok = GenServer.stop(name, :normal, 5_000)
      assert Process.whereis(name) == nil
      # Workers are gone once stop returns, and so is the pool for callers.
      assert Enum.all?(workers, &(not alive?(&1)))

      assert {:error, {:checkout_failed, _}} =
               NativePool.execute_anonymous(:ping, %{}, pool: name)

      # DSPex's test setups stop and start the same name on every test.
      {:ok, pid2} = NativePool.start_link(base_opts(name))
      assert Process.whereis(name) == pid2
      assert {:ok, _} = NativePool.execute_anonymous(:ping, %{}, pool_name: pool_name)
      :ok = GenServer.stop(name)
    end

    test "get_pool_status/1 and health_check/1 take a pool name; :pool_name reaches that pool" do
      a = unique_name()
      b = unique_name()
      start_supervised!({NativePool, base_opts(a, pool_size: 1)}, id: a)
      start_supervised!({NativePool, base_opts(b, pool_size: 1)}, id: b)

      assert %{pool_size: 1, worker_pids: [pid_a]} = NativePool.get_pool_status(a)
      assert %{worker_pids: [pid_b]} = NativePool.get_pool_status(NativePool.get_pool_name_for(b))
      assert {:ok, :healthy} = NativePool.health_check(a)
      assert {:error, {:unhealthy, {:checkout_failed, _}}} = NativePool.health_check(:nope)

      pool_b = NativePool.get_pool_name_for(b)

      assert {:ok, %{"pid" => ^pid_b}} =
               NativePool.execute_anonymous(:ping, %{}, pool_name: pool_b)

      # Options as a map, as V2's own adapter passed them.
      assert {:ok, %{"pid" => ^pid_a}} = NativePool.execute_anonymous(:ping, %{}, %{pool_name: a})

      assert {:ok, %{"pid" => ^pid_b}} =
               NativePool.execute_in_session("m", :ping, %{}, %{pool_name: pool_b, timeout: 5_000})
    end

    test "child_spec: id from the name, shutdown derived from :shutdown_grace" do
      assert %{id: NativePool, shutdown: 10_000, start: {NativePool, :start_link, [[]]}} =
               NativePool.child_spec([])

      assert %{id: :p, shutdown: 12_000} = NativePool.child_spec(name: :p, shutdown_grace: 5_000)
    end
  end

  describe "start options" do
    test "V2's options are accepted: :worker_module (ignored), :pool_lazy, :max_retries, :overflow" do
      name = unique_name()

      log =
        capture_log([level: :debug], fn ->
          start_supervised!(
            {NativePool,
             base_opts(name) ++
               [
                 worker_module: DSPex.PythonBridge.PoolWorkerV2,
                 pool_lazy: true,
                 max_retries: 2,
                 overflow: 1
               ]}
          )
        end)

      assert log =~ "ignoring :worker_module DSPex.PythonBridge.PoolWorkerV2"
      # Lazy: no worker started yet.
      assert %{ready: 0, max_overflow: 1, session_affinity: %{}} =
               NativePool.get_pool_status(name)

      # :max_retries became the pool's :retries: a request whose worker died runs again, twice.
      assert {:ok, _} = NativePool.execute_anonymous(:ping, %{}, pool: name)
      before = NativePool.get_pool_status(name).counters.requests

      assert {:error, {:worker_exited, _}} =
               NativePool.execute_anonymous(:exit, %{code: 3}, pool: name)

      assert NativePool.get_pool_status(name).counters.requests == before + 3

      # A call's own :retries (or :max_retries) wins.
      before = NativePool.get_pool_status(name).counters.requests

      assert {:error, {:worker_exited, _}} =
               NativePool.execute_anonymous(:exit, %{code: 3}, pool: name, max_retries: 0)

      assert NativePool.get_pool_status(name).counters.requests == before + 1
    end

    test "V2's defaults: eager start, overflow 2; keys V2 never knew still raise" do
      name = unique_name()
      start_supervised!({NativePool, base_opts(name)})
      assert %{ready: 2, max_overflow: 2} = NativePool.get_pool_status(name)

      assert_raise ArgumentError, ~r/unknown keys \[:worker_modul\]/, fn ->
        NativePool.start_link(worker_modul: X)
      end

      assert_raise ArgumentError, ~r/keyword list, got: %{}/, fn -> NativePool.start_link(%{}) end

      # Values past what the pool holds (32 bits) and environments the OS cannot take are bad
      # options too, refused before anything starts.
      for {key, value} <- [
            max_frame_size: Integer.pow(2, 64),
            heartbeat_timeout: Integer.pow(10, 30),
            start_timeout: Integer.pow(2, 32),
            overflow_idle_timeout: Integer.pow(10, 30),
            env: [{"A", <<255>>}],
            env: [{"A\0", "c"}],
            env: [{"A=B", "c"}],
            env: [{"", "c"}]
          ] do
        assert_raise ArgumentError, ~r/expected #{inspect(key)} .*got: /, fn ->
          NativePool.start_link([{key, value}, name: unique_name(), script: test_worker()])
        end
      end
    end

    test "an enhanced worker_module gets affinity stats in :session_affinity" do
      name = unique_name()

      start_supervised!(
        {NativePool, base_opts(name) ++ [worker_module: DSPex.PythonBridge.PoolWorkerV2Enhanced]}
      )

      assert %{session_affinity: %{mode: :prefer, restores: 0}} = NativePool.get_pool_status(name)
    end

    test "a pool larger than the file descriptors the VM may open is refused, saying so" do
      limit = Server.fd_limit()
      assert is_integer(limit)

      for size <- [100_000_000, div(limit, 4) + 1] do
        error =
          assert_raise ArgumentError, fn ->
            NativePool.start_link(name: unique_name(), pool_size: size, script: test_worker())
          end

        assert error.message =~ "RLIMIT_NOFILE"
        assert error.message =~ "is #{limit}"
        assert error.message =~ "got: pool_size: #{size}, max_overflow: 2"
      end

      assert_raise ArgumentError, ~r/got: pool_size: 1, max_overflow: #{limit}/, fn ->
        NativePool.start_link(pool_size: 1, max_overflow: limit, script: test_worker())
      end
    end
  end

  describe "sessions are global, as in V2" do
    test "tracking works with no pool running" do
      id = "global_#{System.unique_integer([:positive])}"
      assert :ok = NativePool.track_session(id)
      assert :ok = NativePool.update_session_activity(id)

      assert %{session_id: ^id, operations: 1} =
               Enum.find(NativePool.get_session_info(), &(&1.session_id == id))

      assert :ok = NativePool.end_session(id)
      refute Enum.any?(NativePool.get_session_info(), &(&1.session_id == id))

      assert {:error, {:invalid_session_id, _}} = NativePool.track_session(self())
    end

    test "sessions used through a pool are tracked; end_session frees their programs" do
      opts = start_pool(pool_size: 1)
      id = "t_#{System.unique_integer([:positive])}"
      :ok = NativePool.track_session(id)
      {:ok, _} = NativePool.execute_in_session(id, :create_program, %{id: "p"}, opts)
      assert %{operations: 1} = Enum.find(NativePool.get_session_info(), &(&1.session_id == id))
      assert Enum.any?(NativePool.get_pool_status(opts).sessions, &(&1.session_id == id))

      :ok = NativePool.end_session(id)
      refute Enum.any?(NativePool.get_session_info(), &(&1.session_id == id))

      assert {:error, "Program not found: p"} =
               NativePool.execute_in_session(id, :execute_program, %{program_id: "p"}, opts)
    end

    test "idle sessions are ended after :session_ttl, their programs freed" do
      opts = start_pool(pool_size: 1, session_ttl: 40)
      {:ok, _} = NativePool.execute_in_session("idle", :create_program, %{id: "p"}, opts)

      eventually(fn ->
        not Enum.any?(NativePool.get_session_info(), &(&1.session_id == "idle"))
      end)

      eventually(fn -> status(opts).native_sessions == 0 end)
      {:ok, %{"sessions" => sessions}} = NativePool.execute_anonymous(:stats, %{}, opts)
      assert sessions == %{}
    end
  end

  describe "the pool's owner" do
    test "a killed owner takes its workers and its name with it; callers get errors" do
      name = unique_name()
      Process.flag(:trap_exit, true)
      {:ok, pid} = NativePool.start_link(base_opts(name))
      workers = pool_pids(name)

      # Callers hammer the pool across the kill: each gets {:ok, _} or {:error, _}, none raises.
      parent = self()

      callers =
        for i <- 1..8 do
          spawn_link(fn ->
            results =
              for _ <- 1..200 do
                try do
                  case rem(i, 2) do
                    0 -> NativePool.execute_anonymous(:ping, %{}, pool: name)
                    1 -> NativePool.execute_in_session("k#{i}", :ping, %{}, pool: name)
                  end
                rescue
                  e -> {:raised, e}
                end
              end

            send(parent, {:results, self(), results})
          end)
        end

      Process.exit(pid, :kill)
      assert_receive {:EXIT, ^pid, :killed}

      for caller <- callers do
        assert_receive {:results, ^caller, results}, 30_000

        assert Enum.all?(results, &match?({tag, _} when tag in [:ok, :error], &1)),
               inspect(results)
      end

      eventually(fn -> Enum.all?(workers, &(not alive?(&1))) end)
      # No ghost: the pool is unpublished, calls get an error.
      eventually(fn -> match?({:error, _}, Server.fetch(name)) end)

      assert {:error, {:checkout_failed, _}} =
               NativePool.execute_anonymous(:ping, %{}, pool: name)

      assert_raise ArgumentError, ~r/is running/, fn -> NativePool.get_pool_status(name) end
    end

    test "killed four times under a supervisor: no ghost pool, no leftover workers" do
      name = unique_name()

      {:ok, sup} =
        Supervisor.start_link([{NativePool, base_opts(name)}],
          strategy: :one_for_one,
          max_restarts: 10
        )

      seen =
        for _ <- 1..4 do
          pid = Process.whereis(name)
          {:ok, old} = Server.fetch(name)
          workers = pool_pids(name)
          ref = Process.monitor(pid)
          Process.exit(pid, :kill)
          assert_receive {:DOWN, ^ref, _, _, :killed}
          # The supervisor restarted it: a new process, published once its init is done.
          eventually(fn -> Process.whereis(name) not in [nil, pid] end)

          eventually(fn ->
            match?({:ok, pool} when pool.resource != old.resource, Server.fetch(name))
          end)

          eventually(fn -> Enum.all?(workers, &(not alive?(&1))) end)
          workers
        end

      # The current pool serves; exactly its 2 workers live.
      assert {:ok, _} = NativePool.execute_anonymous(:ping, %{}, pool: name)
      current = pool_pids(name)
      assert length(current) == 2
      assert MapSet.disjoint?(MapSet.new(current), MapSet.new(List.flatten(seen)))

      Supervisor.stop(sup)
      assert Enum.all?(current, &(not alive?(&1)))
      assert {:error, _} = Server.fetch(name)
    end

    test "a parent that exits during an eager start-up stops it at once, workers included" do
      name = unique_name()
      test = self()

      parent =
        spawn(fn ->
          send(
            test,
            NativePool.start_link(
              base_opts(name) ++
                [
                  lazy: false,
                  env: [{"TEST_WORKER_START_DELAY_MS", "60000"}],
                  start_timeout: 120_000
                ]
            )
          )
        end)

      # Wait until the pool is starting its workers.
      server = eventually(fn -> Process.whereis(name) end)
      ref = Process.monitor(server)
      started = System.monotonic_time(:millisecond)
      Process.exit(parent, :shutdown)

      assert_receive {:DOWN, ^ref, _, _, :shutdown}, 10_000
      assert System.monotonic_time(:millisecond) - started < 10_000
      assert Process.whereis(name) == nil
      assert {:error, _} = Server.fetch(name)
    end

    test "a pool whose linked parent dies stops at once; the registry stops its workers" do
      name = unique_name()
      test = self()

      parent =
        spawn(fn ->
          {:ok, pid} = NativePool.start_link(base_opts(name))
          send(test, {:started, pid, pool_pids(name)})
          Process.sleep(:infinity)
        end)

      assert_receive {:started, pool, workers}, 30_000
      ref = Process.monitor(pool)
      Process.exit(parent, :shutdown)
      assert_receive {:DOWN, ^ref, _, _, :shutdown}
      eventually(fn -> match?({:error, _}, Server.fetch(name)) end)
      eventually(fn -> Enum.all?(workers, &(not alive?(&1))) end)
      # The name is free for the next test's pool.
      {:ok, _} = NativePool.start_link(base_opts(name))
      :ok = GenServer.stop(name)
    end

    test "a supervisor stopping a pool with a long :shutdown_grace waits for it" do
      name = unique_name()
      opts = base_opts(name, shutdown_grace: 5_000)
      {:ok, sup} = Supervisor.start_link([{NativePool, opts}], strategy: :one_for_one)
      assert [{^name, _, :worker, _}] = Supervisor.which_children(sup)
      workers = pool_pids(name)
      Supervisor.stop(sup)
      assert Enum.all?(workers, &(not alive?(&1)))
    end
  end

  describe "bad data returns errors, bad options raise, nothing is sent before" do
    setup do
      %{opts: start_pool(pool_size: 1)}
    end

    test "commands that are not an atom or a UTF-8 string", %{opts: opts} do
      for command <- [123, ~c"ping", {:a}, <<255>>, "", nil, self()] do
        assert {:error, {:invalid_command, detail}} =
                 NativePool.execute_anonymous(command, %{}, opts)

        assert detail =~ "got: #{inspect(command)}"

        assert {:error, {:invalid_command, _}} =
                 NativePool.execute_in_session("s", command, %{}, opts)

        NativePool.with_checkout(
          :anonymous,
          fn checkout ->
            assert {:error, {:invalid_command, _}} = NativePool.call(checkout, command, %{})
          end,
          opts
        )
      end

      # Unicode atoms and strings are commands like any other (the worker knows none of these).
      assert {:error, _} = NativePool.execute_anonymous(:pïng, %{}, opts)
      assert {:ok, _} = NativePool.execute_anonymous("ping", %{}, opts)
      refute_received _
    end

    test "session ids that are not a UTF-8 string, an atom or an integer", %{opts: opts} do
      for id <- [self(), <<255>>, "", :"", nil, {:a}, 1.5] do
        assert {:error, {:invalid_session_id, detail}} =
                 NativePool.execute_in_session(id, :ping, %{}, opts)

        assert detail =~ "got: #{inspect(id)}"
        assert {:error, {:invalid_session_id, _}} = NativePool.checkout({:session, id}, opts)
      end

      assert {:ok, _} = NativePool.execute_in_session(:atom_session, :ping, %{}, opts)
      assert {:ok, _} = NativePool.execute_in_session(42, :ping, %{}, opts)
      assert {:error, {:invalid_args, _}} = NativePool.execute_anonymous(:ping, [1, 2], opts)
      assert {:error, {:invalid_args, _}} = NativePool.execute_anonymous(:ping, :nope, opts)
      assert {:error, {:invalid_mode, _}} = NativePool.checkout(:nope, opts)
      refute_received _
    end

    test "timeouts: :infinity is valid; -1, 1.5, \"10\", 2^64-1 raise before sending", %{
      opts: opts
    } do
      # Start-up's own pings (one per worker) are counted too.
      before = status(opts).counters.requests

      assert {:ok, _} =
               NativePool.execute_anonymous(
                 :ping,
                 %{},
                 opts ++ [timeout: :infinity, pool_timeout: :infinity]
               )

      assert {:ok, _} =
               NativePool.execute_in_session("s", :ping, %{}, opts ++ [timeout: 4_294_967_295])

      {:ok, checkout} = NativePool.checkout(:anonymous, opts ++ [pool_timeout: :infinity])
      assert {:ok, _} = NativePool.call(checkout, :ping, %{}, timeout: :infinity)

      for bad <- [-1, 1.5, "10", Integer.pow(2, 64) - 1, :never] do
        for key <- [:timeout, :pool_timeout] do
          message =
            ~r/expected #{inspect(key)} to be a timeout .* got: #{Regex.escape(inspect(bad))}/

          assert_raise ArgumentError, message, fn ->
            NativePool.execute_anonymous(:ping, %{}, opts ++ [{key, bad}])
          end

          assert_raise ArgumentError, message, fn ->
            NativePool.execute_in_session("s", :ping, %{}, Map.new(opts ++ [{key, bad}]))
          end
        end

        assert_raise ArgumentError, ~r/got: /, fn ->
          NativePool.call(checkout, :ping, %{}, timeout: bad)
        end
      end

      NativePool.checkin(checkout)
      # Nothing was sent, so nothing arrives.
      refute_receive _, 100
      assert %{busy: 0, counters: %{requests: requests}} = status(opts)
      assert requests == before + 3
    end

    test "options that are not a keyword list or a map raise", %{opts: opts} do
      for bad <- [[1, 2], :pool, "opts", [{"pool", :x}]] do
        assert_raise ArgumentError, ~r/keyword list or a map, got: /, fn ->
          NativePool.execute_anonymous(:ping, %{}, bad)
        end

        assert_raise ArgumentError, ~r/got: /, fn ->
          NativePool.execute_in_session("s", :ping, %{}, bad)
        end
      end

      assert_raise ArgumentError, ~r/:pool to be a pool name \(an atom\), got: "x"/, fn ->
        NativePool.execute_anonymous(:ping, %{}, pool: "x")
      end

      assert_raise ArgumentError, ~r/:affinity to be :prefer or :strict, got: :x/, fn ->
        NativePool.execute_in_session("s", :ping, %{}, opts ++ [affinity: :x])
      end

      assert_raise ArgumentError, ~r/:retries to be a non-negative integer, got: -1/, fn ->
        NativePool.execute_anonymous(:ping, %{}, opts ++ [retries: -1])
      end

      refute_received _
    end
  end
end
