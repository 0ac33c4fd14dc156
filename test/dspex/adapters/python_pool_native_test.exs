defmodule DSPex.Adapters.PythonPoolNativeTest do
  # One pool of real DSPy workers (offline "dummy" LM) for the whole module: workers take ~0.5 s
  # each to start. Not async: tests share the pool and kill its workers.
  use DSPex.NativePool.PoolCase, async: false

  alias DSPex.Adapters.PythonPoolNative, as: Adapter

  @moduletag :dspy
  @pool_size 4
  @qa %{
    inputs: [%{name: :question, description: "a question"}],
    outputs: [%{name: :answer, description: "a short answer"}]
  }

  setup_all do
    pool = :"adapter_pool_#{System.unique_integer([:positive])}"

    # Workers log their start-up; setup_all has no per-test log capture.
    ExUnit.CaptureLog.capture_log(fn ->
      start_supervised!(
        # No overflow workers: "every worker" is then exactly @pool_size checkouts.
        {NativePool,
         name: pool, pool_size: @pool_size, max_overflow: 0, lazy: false, shutdown_grace: 200}
      )
    end)

    :ok = Adapter.configure_lm(%{provider: "dummy", pool: pool})
    %{pool: pool}
  end

  setup %{pool: pool} do
    session = "session_#{System.unique_integer([:positive])}"
    on_exit(fn -> Adapter.end_session(session) end)
    %{session: session, opts: %{pool: pool, session_id: session}}
  end

  # The offline LM answers every output field with "<field>: dummy answer for <first input>".
  defp answer_for(question), do: "answer: dummy answer for #{question}"

  defp create!(opts, config) do
    {:ok, id} = Adapter.create_program(Map.merge(opts, config))
    id
  end

  # Checks out every permanent worker at once (so each is a different one), runs `fun` on each
  # checkout and checks them in.
  defp on_every_worker(pool, fun) do
    checkouts =
      for _ <- 1..@pool_size do
        {:ok, checkout} = NativePool.checkout(:anonymous, pool: pool, pool_timeout: 30_000)
        checkout
      end

    try do
      Enum.map(checkouts, fun)
    after
      Enum.each(checkouts, &NativePool.checkin/1)
    end
  end

  defp worker_stats(checkout) do
    {:ok, stats} = NativePool.call(checkout, :get_stats, %{})
    stats
  end

  defp session_worker_pid(opts) do
    {:ok, %{session_stats: %{"pid" => pid}}} = Adapter.get_stats(opts)
    pid
  end

  defp kill!(os_pid), do: {_, 0} = System.cmd("kill", ["-KILL", to_string(os_pid)])

  defp pool_noticed_exit(os_pid, pool) do
    eventually(fn -> os_pid not in status(pool: pool).worker_pids end)
  end

  describe "programs" do
    test "predict, chain_of_thought and react: create, execute, list, info, delete", %{
      opts: opts
    } do
      assert {:ok, "qa"} = Adapter.create_program(Map.merge(opts, %{id: "qa", signature: @qa}))
      cot = create!(opts, %{signature: @qa, program_type: "chain_of_thought"})
      react = create!(opts, %{signature: @qa, program_type: "react", tools: ["calculator"]})
      assert "pool_" <> _ = cot

      assert {:ok, %{"program_id" => "qa", "outputs" => outputs}} =
               Adapter.execute_program("qa", %{question: "why?"}, opts)

      assert outputs == %{"answer" => answer_for("why?")}

      assert {:ok, %{"outputs" => %{"reasoning" => reasoning, "answer" => answer}}} =
               Adapter.execute_program(cot, %{question: "how?"}, opts)

      assert reasoning == "reasoning: dummy answer for how?"
      assert answer == answer_for("how?")

      assert {:ok, %{"outputs" => %{"answer" => answer, "trajectory" => trajectory}}} =
               Adapter.execute_program(react, %{question: "what?"}, opts)

      assert answer == answer_for("what?")
      assert trajectory["tool_name_0"] == "finish"

      assert {:ok, ids} = Adapter.list_programs(opts)
      assert Enum.sort(ids) == Enum.sort(["qa", cot, react])

      assert {:ok, info} = Adapter.get_program_info(cot, opts)
      assert %{"id" => ^cot, :id => ^cot, "program_type" => "chain_of_thought"} = info
      assert info.session_id == opts.session_id
      assert info["execution_count"] == 1

      assert [%{"name" => "question", "description" => "a question"}] =
               info["signature"]["inputs"]

      assert :ok = Adapter.delete_program("qa", opts)
      assert {:ok, ids} = Adapter.list_programs(opts)
      assert Enum.sort(ids) == Enum.sort([cot, react])
      assert {:error, "Program not found: qa"} = Adapter.execute_program("qa", %{}, opts)
    end

    test "errors keep V2's shapes", %{opts: opts} do
      create!(opts, %{id: "qa", signature: @qa})

      # Unknown programs: Python's message.
      assert {:error, "Program not found: nope"} = Adapter.execute_program("nope", %{}, opts)
      assert {:error, "Program not found: nope"} = Adapter.get_program_info("nope", opts)
      assert {:error, "Program not found: nope"} = Adapter.delete_program("nope", opts)

      assert {:error, "Missing required inputs for qa: question"} =
               Adapter.execute_program("qa", %{}, opts)

      # Bad specs are refused and leave nothing behind.
      assert {:error, "signature.outputs must name at least one field"} =
               Adapter.create_program(Map.put(opts, :signature, %{inputs: [], outputs: []}))

      assert {:error, "signature must be an object with inputs and outputs"} =
               Adapter.create_program(Map.put(opts, :signature, "question -> answer"))

      assert {:error, "signature.inputs: invalid field name" <> _} =
               Adapter.create_program(
                 Map.put(opts, :signature, %{inputs: [%{name: "a b"}], outputs: [%{name: "x"}]})
               )

      assert {:error, "Unknown program_type: 'bogus'" <> _} =
               Adapter.create_program(Map.merge(opts, %{signature: @qa, program_type: "bogus"}))

      assert {:error, "Program already exists: qa"} =
               Adapter.create_program(Map.merge(opts, %{id: "qa", signature: @qa}))

      assert {:ok, ["qa"]} = Adapter.list_programs(opts)

      # An explicit but empty session id is refused before anything is sent.
      for bad <- [nil, ""] do
        bad_opts = %{opts | session_id: bad}
        no_session = {:error, "session_id is required in pool-worker mode"}
        assert Adapter.create_program(Map.put(bad_opts, :signature, @qa)) == no_session
        assert Adapter.execute_program("qa", %{question: "q"}, bad_opts) == no_session
        assert Adapter.list_programs(bad_opts) == no_session
      end

      refute Enum.any?(Adapter.get_session_info(), &(&1.session_id in ["", nil]))

      # Arguments JSON cannot hold: the pool's reason, nothing sent.
      assert {:error, {:invalid_args, _}} =
               Adapter.execute_program("qa", %{question: self()}, opts)

      # No such pool: V2's "Checkout failed" string, not a crash.
      assert {:error, "Checkout failed: " <> _} =
               Adapter.list_programs(%{opts | pool: :no_such_pool})

      assert {:error, {:checkout_failed, _}} = Adapter.health_check(pool: :no_such_pool)
    end

    test "without a session_id, programs live in the shared \"anonymous\" session, as in V2", %{
      opts: opts,
      pool: pool
    } do
      anonymous = %{pool: pool}
      on_exit(fn -> Adapter.end_session("anonymous") end)
      id = create!(anonymous, %{signature: @qa})

      assert {:ok, %{"outputs" => %{"answer" => _}}} =
               Adapter.execute_program(id, %{question: "q"}, anonymous)

      assert {:ok, ids} = Adapter.list_programs(anonymous)
      assert id in ids
      assert {:ok, %{session_id: "anonymous"}} = Adapter.get_program_info(id, anonymous)

      # Invisible to named sessions.
      assert {:ok, []} = Adapter.list_programs(opts)
      assert {:error, "Program not found: " <> _} = Adapter.execute_program(id, %{}, opts)
      assert :ok = Adapter.delete_program(id, anonymous)
    end

    test "session_adapter binds the session and the pool", %{session: session, pool: pool} do
      adapter = Adapter.session_adapter(session, pool: pool)
      assert adapter.session_id == session
      {:ok, id} = adapter.create_program.(%{signature: @qa})

      assert {:ok, %{"outputs" => %{"answer" => answer}}} =
               adapter.execute_program.(id, %{question: "bound"}, nil)

      assert answer == answer_for("bound")
      assert {:ok, [^id]} = adapter.list_programs.()
      assert {:ok, %{session_id: ^session}} = adapter.get_program_info.(id)
      assert {:ok, %{session_stats: %{"session" => %{"programs" => 1}}}} = adapter.get_stats.()
      assert :ok = adapter.health_check.()
      assert :ok = adapter.delete_program.(id)
      assert {:ok, []} = adapter.list_programs.()
      assert :ok = adapter.end_session.()
    end
  end

  describe "V2's API" do
    test "V2's pool-name routes: with_pool_name/1, session_adapter/2, configure_lm/2", %{
      session: session,
      pool: pool
    } do
      pool_name = NativePool.get_pool_name_for(pool)
      assert pool_name == :"#{pool}_pool"
      adapter = Adapter.with_pool_name(pool_name)

      assert :ok = adapter.configure_lm.(%{provider: "dummy"})
      assert :ok = Adapter.configure_lm(%{provider: "dummy"}, %{pool_name: pool_name})
      assert :ok = adapter.health_check.()
      assert {:ok, %{pool_status: %{pool_size: @pool_size}}} = adapter.get_stats.()

      {:ok, id} = adapter.create_program.(%{signature: @qa, session_id: session})

      assert {:ok, %{"outputs" => %{"answer" => answer}}} =
               adapter.execute_program.(id, %{question: "named"}, %{session_id: session})

      assert answer == answer_for("named")

      bound = adapter.session_adapter.(session)
      assert bound.session_id == session
      assert {:ok, [^id]} = bound.list_programs.()
      assert {:ok, %{session_id: ^session}} = bound.get_program_info.(id)
      assert {:ok, [^id]} = Adapter.session_adapter(session, pool_name).list_programs.()
      assert {:ok, [^id]} = Adapter.session_adapter(session, pool).list_programs.()
      assert :ok = bound.delete_program.(id)
      assert {:ok, []} = adapter.list_programs.()
    end

    test "every public function of PythonPoolV2 exists with every arity" do
      v2 = [
        create_program: 1,
        execute_program: 2,
        execute_program: 3,
        list_programs: 0,
        list_programs: 1,
        delete_program: 1,
        delete_program: 2,
        get_program_info: 1,
        get_program_info: 2,
        health_check: 0,
        health_check: 1,
        get_stats: 0,
        get_stats: 1,
        configure_lm: 1,
        configure_lm: 2,
        supports_test_layer?: 1,
        get_test_capabilities: 0,
        start_session: 1,
        start_session: 2,
        end_session: 1,
        get_session_info: 0,
        session_adapter: 1,
        session_adapter: 2,
        with_pool_name: 1
      ]

      missing = for {f, a} <- v2, not function_exported?(Adapter, f, a), do: {f, a}
      assert missing == []
    end
  end

  describe "sessions" do
    test "100 concurrent sessions, 3 programs each executed 10 times, see only their own programs",
         %{pool: pool} do
      before = status(pool: pool).counters

      failures =
        1..100
        |> Task.async_stream(&run_session(pool, &1), max_concurrency: 100, timeout: 60_000)
        |> Enum.flat_map(fn {:ok, failures} -> failures end)

      assert failures == []
      status = status(pool: pool)
      # No request failed, no worker was lost.
      assert status.counters.errors == before.errors
      assert status.counters.recycled == before.recycled
      assert status.counters.requests - before.requests >= 100 * (3 + 30 + 1)
    end

    test "a session's programs and LM survive the death of the worker that holds them", %{
      opts: opts
    } do
      id = create!(opts, %{signature: @qa, program_type: "chain_of_thought"})

      :ok =
        Adapter.configure_lm(
          Map.merge(opts, %{provider: "dummy", answers: [%{answer: "from the session's LM"}]})
        )

      holder = session_worker_pid(opts)
      # Killed while idle; the request below usually reaches it before the pool has seen it die,
      # and the adapter's retry runs it on another worker, re-created from the session's record.
      kill!(holder)

      assert {:ok, %{"outputs" => %{"answer" => "from the session's LM"}}} =
               Adapter.execute_program(id, %{question: "still there?"}, opts)

      assert {:ok, [^id]} = Adapter.list_programs(opts)
      assert session_worker_pid(opts) != holder

      # Other sessions keep the global LM.
      other = %{opts | session_id: opts.session_id <> "_other"}
      on_exit(fn -> Adapter.end_session(other.session_id) end)
      other_id = create!(other, %{signature: @qa})

      assert {:ok, %{"outputs" => %{"answer" => answer}}} =
               Adapter.execute_program(other_id, %{question: "global"}, other)

      assert answer == answer_for("global")
    end

    test "a session whose worker is busy is re-created on a free one; end_session frees both", %{
      opts: opts,
      pool: pool,
      session: session
    } do
      {:ok, ^session} = Adapter.start_session(session, pool: pool)
      assert Enum.any?(Adapter.get_session_info(), &(&1.session_id == session))
      id = create!(opts, %{signature: @qa})
      home = session_worker_pid(opts)

      # Hold the session's worker; its next call runs on another, which gets the programs.
      {:ok, held} = NativePool.checkout(:anonymous, pool: pool, pool_timeout: 30_000)
      {held, others} = hold_worker(pool, home, held, [])
      Enum.each(others, &NativePool.checkin/1)

      assert {:ok, %{"outputs" => %{"answer" => _}}} =
               Adapter.execute_program(id, %{question: "moved"}, opts)

      NativePool.checkin(held)

      holders =
        on_every_worker(pool, fn c ->
          {:ok, %{"programs" => programs}} =
            NativePool.call(c, :list_programs, %{session_id: session})

          programs != []
        end)

      assert Enum.count(holders, & &1) == 2

      assert :ok = Adapter.end_session(session)
      refute Enum.any?(Adapter.get_session_info(), &(&1.session_id == session))

      eventually(fn ->
        on_every_worker(pool, fn c ->
          NativePool.call(c, :list_programs, %{session_id: session})
        end)
        |> Enum.all?(&match?({:ok, %{"programs" => []}}, &1))
      end)
    end
  end

  describe "configure_lm, stats and health" do
    test "a configure_lm without session reaches every worker, present and future", %{
      opts: opts,
      pool: pool
    } do
      on_exit(fn -> Adapter.configure_lm(%{provider: "dummy", pool: pool}) end)
      assert :ok = Adapter.configure_lm(%{provider: "dummy", model: "everywhere", pool: pool})
      everywhere = %{"provider" => "dummy", "model" => "everywhere"}

      pids =
        on_every_worker(pool, fn c ->
          stats = worker_stats(c)
          assert stats["lm"] == everywhere
          stats["pid"]
        end)

      # A failed configure_lm changes nothing, anywhere.
      assert {:error, "Unknown provider: nope" <> _} =
               Adapter.configure_lm(%{provider: "nope", model: "m", pool: pool})

      assert {:error, "model is required"} =
               Adapter.configure_lm(%{provider: "openai", pool: pool})

      # A worker started later gets it too.
      [victim | _] = pids
      kill!(victim)
      pool_noticed_exit(victim, pool)

      stats = on_every_worker(pool, &worker_stats/1)
      assert Enum.all?(stats, &(&1["lm"] == everywhere))
      assert Enum.any?(stats, &(&1["pid"] not in pids))

      id = create!(opts, %{signature: @qa})

      assert {:ok, %{"outputs" => %{"answer" => _}}} =
               Adapter.execute_program(id, %{question: "q"}, opts)
    end

    test "get_stats, health_check, test layer", %{opts: opts, pool: pool} do
      assert :ok = Adapter.health_check(pool: pool)

      assert {:ok, stats} = Adapter.get_stats(%{pool: pool})

      assert %{
               adapter_type: :python_pool_v2,
               implementation: :dspex_native_pool,
               layer: :production,
               session_stats: %{}
             } = stats

      assert %{pool_size: @pool_size, ready: _, busy: _, sessions: _} = stats.pool_status

      create!(opts, %{signature: @qa})
      assert {:ok, %{session_stats: session_stats}} = Adapter.get_stats(opts)

      assert %{"session" => %{"programs" => 1, "session_id" => session}, "pid" => pid} =
               session_stats

      assert session == opts.session_id
      assert pid in status(pool: pool).worker_pids

      assert Adapter.supports_test_layer?(:production)
      refute Adapter.supports_test_layer?(:layer_1)
      assert %{python_execution: true, session_isolation: true} = Adapter.get_test_capabilities()
    end
  end

  # Checks out workers until `home` is among them; returns {home's checkout, the others}.
  defp hold_worker(pool, home, checkout, others) do
    if worker_stats(checkout)["pid"] == home do
      {checkout, others}
    else
      {:ok, next} = NativePool.checkout(:anonymous, pool: pool, pool_timeout: 30_000)
      hold_worker(pool, home, next, [checkout | others])
    end
  end

  # One session of the concurrency test; returns a list of failures.
  defp run_session(pool, i) do
    opts = %{pool: pool, session_id: "concurrent_#{i}", pool_timeout: 30_000}

    # "shared" exists in every session: isolation means each session runs its own.
    ids = [
      create!(opts, %{id: "shared", signature: @qa}),
      create!(opts, %{signature: @qa, program_type: "chain_of_thought"}),
      create!(opts, %{signature: @qa})
    ]

    executions =
      for id <- ids, n <- 1..10 do
        question = "#{i}/#{id}/#{n}"
        expected = answer_for(question)

        case Adapter.execute_program(id, %{question: question}, opts) do
          {:ok, %{"program_id" => ^id, "outputs" => %{"answer" => ^expected}}} -> []
          other -> [{opts.session_id, id, n, other}]
        end
      end

    listed =
      case Adapter.list_programs(opts) do
        {:ok, listed} when length(listed) == 3 -> Enum.sort(listed) -- Enum.sort(ids)
        other -> [other]
      end

    Adapter.end_session(opts.session_id)
    List.flatten(executions) ++ Enum.map(listed, &{opts.session_id, :list_programs, &1})
  end
end
