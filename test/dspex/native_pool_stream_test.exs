defmodule DSPex.NativePoolStreamTest do
  # Issue 12 on the real DSPy bridge: execute_stream/4 over the project's streaming LM server,
  # and ReAct agents whose tools are Elixir functions (a dummy LM scripted to call them).
  use DSPex.NativePool.PoolCase, async: true

  @moduletag :dspy
  @moduletag timeout: 180_000

  # Its answer takes the slow LM server (1 s between chunks) tens of seconds to stream: a
  # request that ends early was cancelled.
  @long String.duplicate("a long question ", 8)

  @lookup %{
    name: "lookup",
    description: "Looks a key up in the app's table.",
    args: %{key: "string"}
  }

  defp start_lm_server(chunk_delay) do
    python = DSPex.NativePool.Server.default_python()
    script = Path.expand("../../priv/python/lm_server.py", __DIR__)

    args =
      [script, "--port", "0", "--latency", "0.05", "--chunk-delay", chunk_delay] ++
        ["--exit-on-stdin-eof"]

    port = Port.open({:spawn_executable, python}, [:binary, {:line, 1024}, args: args])
    on_exit(fn -> if Port.info(port), do: Port.close(port) end)

    receive do
      {^port, {:data, {:eol, line}}} -> line |> String.trim() |> String.to_integer()
    after
      30_000 -> flunk("lm_server.py did not print its port")
    end
  end

  defp bridge_pool(opts \\ []) do
    start_pool(
      [
        pool_size: 1,
        script: Path.join(:code.priv_dir(:dspex_native_pool), "python/dspy_bridge.py"),
        start_method: :fork_server,
        start_timeout: 120_000
      ] ++ opts
    )
  end

  defp http_lm(session, port_no, opts) do
    {:ok, _} =
      NativePool.execute_in_session(
        session,
        :configure_lm,
        %{
          provider: "openai",
          model: "test",
          api_base: "http://127.0.0.1:#{port_no}/v1",
          api_key: "x",
          cache: false
        },
        opts
      )
  end

  defp program(session, id, type, outputs, opts, extra \\ %{}) do
    spec =
      Map.merge(
        %{
          id: id,
          program_type: type,
          signature: %{inputs: [%{name: "question"}], outputs: Enum.map(outputs, &%{name: &1})}
        },
        extra
      )

    {:ok, _} = NativePool.execute_in_session(session, :create_program, spec, opts)
  end

  # A dummy LM scripted to call lookup(key) once, then finish, then answer.
  defp agent_lm(session, key, answer, opts) do
    answers = [
      %{next_thought: "look it up", next_tool_name: "lookup", next_tool_args: %{key: key}},
      %{next_thought: "done", next_tool_name: "finish", next_tool_args: %{}},
      %{answer: answer}
    ]

    {:ok, _} =
      NativePool.execute_in_session(
        session,
        :configure_lm,
        %{provider: "dummy", answers: answers},
        opts
      )

    program(session, "agent", "react", ["answer"], opts, %{tools: [@lookup]})
  end

  defp ask(question), do: %{program_id: "p", inputs: %{question: question}}

  defp in_flight(opts) do
    {:ok, %{"in_flight" => n}} = NativePool.execute_anonymous(:ping, %{}, opts)
    n
  end

  describe "execute_stream/4" do
    test "chunks arrive in order, complete, before {:done, result}" do
      port_no = start_lm_server("0.005")
      opts = bridge_pool()
      http_lm("s", port_no, opts)
      program("s", "p", "chain_of_thought", ["answer", "summary"], opts)

      items =
        NativePool.execute_stream("s", :execute_program, ask("why is the sky blue"), opts)
        |> Enum.to_list()

      {chunks, [last]} = Enum.split(items, -1)
      assert {:done, %{"outputs" => outputs}} = last
      assert length(chunks) > 6
      assert Enum.all?(chunks, &match?({:chunk, _, _}, &1))

      fields = chunks |> Enum.map(&elem(&1, 1)) |> Enum.dedup()
      assert fields == ["reasoning", "answer", "summary"]

      for field <- fields do
        text = for({:chunk, ^field, t} <- chunks, do: t) |> Enum.join() |> String.trim()
        assert text == outputs[field]
      end

      assert outputs["answer"] == "answer: answer to why is the sky blue"
    end

    test "into: pid sends the elements as messages; the checkout form streams too" do
      port_no = start_lm_server("0.005")
      opts = bridge_pool()
      http_lm("s", port_no, opts)
      program("s", "p", "predict", ["answer"], opts)

      {:ok, ref} =
        NativePool.execute_stream("s", :execute_program, ask("q1"), [into: self()] ++ opts)

      assert_receive {^ref, {:chunk, "answer", _}}, 60_000

      assert_receive {^ref, {:done, %{"outputs" => %{"answer" => "answer: answer to q1"}}}},
                     60_000

      NativePool.with_checkout(
        {:session, "s"},
        fn checkout ->
          items =
            NativePool.execute_stream(checkout, :execute_program, ask("q2")) |> Enum.to_list()

          assert [{:chunk, "answer", _} | _] = items
          assert {:done, %{"outputs" => %{"answer" => "answer: answer to q2"}}} = List.last(items)
        end,
        opts
      )
    end

    test "halting the stream cancels the request; the worker serves the next one" do
      slow = start_lm_server("1.0")
      fast = start_lm_server("0.005")
      opts = bridge_pool()
      http_lm("slow", slow, opts)
      http_lm("fast", fast, opts)
      program("slow", "p", "predict", ["answer"], opts)
      program("fast", "p", "predict", ["answer"], opts)
      %{worker_pids: [pid]} = status(opts)

      assert [{:chunk, "answer", _}] =
               NativePool.execute_stream("slow", :execute_program, ask(@long), opts)
               |> Enum.take(1)

      # The stream's after-function waited for the worker's "cancelled": nothing runs, nothing
      # of the request is left in the mailbox.
      assert in_flight(opts) == 0
      refute_received {_, {:event, _, _}}
      refute_received {_, {:error, "cancelled"}}

      assert {:ok, %{"outputs" => %{"answer" => "answer: answer to next"}}} =
               NativePool.execute_in_session("fast", :execute_program, ask("next"), opts)

      assert %{worker_pids: [^pid], counters: %{recycled: 0}} = status(opts)
    end

    test "a consumer that dies mid-stream cancels the request; the worker stays" do
      slow = start_lm_server("1.0")
      opts = bridge_pool()
      http_lm("slow", slow, opts)
      program("slow", "p", "predict", ["answer"], opts)
      %{worker_pids: [pid]} = status(opts)
      test = self()

      consumer =
        spawn(fn ->
          NativePool.execute_stream("slow", :execute_program, ask(@long), opts)
          |> Enum.each(&send(test, {:item, &1}))
        end)

      assert_receive {:item, {:chunk, "answer", _}}, 60_000
      Process.exit(consumer, :kill)

      # The pool sees its caller go and cancels; the bridge's task ends.
      assert eventually(fn -> status(opts).counters.cancelled >= 1 and in_flight(opts) == 0 end)

      assert {:ok, %{"outputs" => %{"answer" => "answer: answer to again"}}} =
               NativePool.execute_in_session("slow", :execute_program, ask("again"), opts)

      assert %{worker_pids: [^pid], counters: %{recycled: 0}} = status(opts)
    end

    test "an into: receiver that exits mid-stream cancels the request" do
      slow = start_lm_server("1.0")
      opts = bridge_pool()
      http_lm("slow", slow, opts)
      program("slow", "p", "predict", ["answer"], opts)
      %{worker_pids: [pid]} = status(opts)
      test = self()

      receiver =
        spawn(fn ->
          {:ok, ref} =
            NativePool.execute_stream(
              "slow",
              :execute_program,
              ask(@long),
              [into: self()] ++ opts
            )

          receive do
            {^ref, {:chunk, _, _} = chunk} -> send(test, {:first, chunk})
          end
        end)

      ref = Process.monitor(receiver)
      assert_receive {:first, {:chunk, "answer", _}}, 60_000
      assert_receive {:DOWN, ^ref, :process, ^receiver, :normal}
      assert eventually(fn -> in_flight(opts) == 0 end)
      assert %{in_flight: 0, worker_pids: [^pid], counters: %{recycled: 0}} = status(opts)
    end
  end

  describe "Elixir tools" do
    test "a ReAct agent calls an Elixir tool reading an ETS table and uses its answer" do
      opts = bridge_pool()
      agent_lm("a", "k1", "the value is 42", opts)
      table = :ets.new(:lookup, [:public])
      :ets.insert(table, {"k1", 42})

      lookup = fn %{"key" => key} ->
        [{^key, value}] = :ets.lookup(table, key)
        %{value: value}
      end

      assert {:ok, %{"outputs" => outputs}} =
               NativePool.execute_in_session(
                 "a",
                 :execute_program,
                 %{program_id: "agent", inputs: %{question: "what is k1?"}},
                 [tools: %{"lookup" => lookup}] ++ opts
               )

      assert outputs["trajectory"]["observation_0"] == %{"value" => 42}
      assert outputs["answer"] == "the value is 42"
    end

    test "tools registered for a session answer its calls; a call's :tools override them" do
      opts = bridge_pool()
      agent_lm("reg", "k", "done", opts)
      :ok = NativePool.register_tools("reg", %{lookup: fn %{"key" => k} -> "registered #{k}" end})

      execute = fn extra ->
        {:ok, %{"outputs" => outputs}} =
          NativePool.execute_in_session(
            "reg",
            :execute_program,
            %{program_id: "agent", inputs: %{question: "q"}},
            extra ++ opts
          )

        outputs["trajectory"]["observation_0"]
      end

      assert execute.([]) == "registered k"
      assert execute.(tools: %{"lookup" => fn _ -> "per call" end}) == "per call"

      assert_raise ArgumentError, ~r/got: /, fn ->
        NativePool.register_tools("reg", %{"x" => 1})
      end

      # end_session/1 forgets them (and the session's programs).
      :ok = NativePool.end_session("reg")
      agent_lm("reg", "k", "done", opts)
      assert execute.([]) =~ "no Elixir function for tool \"lookup\""
    end

    test "the adapter's execute_program/3 takes :tools" do
      opts = bridge_pool()
      adapter = DSPex.Adapters.PythonPoolNative
      base = %{session_id: "ad", pool: opts[:pool]}

      answers = [
        %{next_thought: "t", next_tool_name: "lookup", next_tool_args: %{key: "k"}},
        %{next_thought: "done", next_tool_name: "finish", next_tool_args: %{}},
        %{answer: "ok"}
      ]

      :ok = adapter.configure_lm(Map.merge(base, %{provider: "dummy", answers: answers}))

      {:ok, "agent"} =
        adapter.create_program(
          Map.merge(base, %{
            id: "agent",
            program_type: "react",
            signature: %{inputs: [%{name: "question"}], outputs: [%{name: "answer"}]},
            tools: [@lookup]
          })
        )

      assert {:ok, %{"outputs" => outputs}} =
               adapter.execute_program(
                 "agent",
                 %{question: "q"},
                 Map.put(base, :tools, %{lookup: fn %{"key" => k} -> "#{k} from the adapter" end})
               )

      assert outputs["trajectory"]["observation_0"] == "k from the adapter"
    end

    test "a raising tool, a slow tool and a missing tool are error strings the agent sees" do
      opts = bridge_pool()
      test = self()

      run = fn session, tools, extra ->
        agent_lm(session, "k", "gave up", opts)

        {:ok, %{"outputs" => outputs}} =
          NativePool.execute_in_session(
            session,
            :execute_program,
            %{program_id: "agent", inputs: %{question: "q"}},
            [tools: tools] ++ extra ++ opts
          )

        assert outputs["answer"] == "gave up"
        observation = outputs["trajectory"]["observation_0"]
        assert observation =~ "Execution error in lookup"
        observation
      end

      raising = run.("r", %{"lookup" => fn _ -> raise "boom in the table" end}, [])
      assert raising =~ "RuntimeError"
      assert raising =~ "boom in the table"

      slow = fn _ ->
        send(test, {:tool_running, self()})
        Process.sleep(:infinity)
      end

      timed_out = run.("t", %{"lookup" => slow}, tool_timeout: 200)
      assert timed_out =~ "timed out after 200 ms"
      # The timed-out function was stopped.
      assert_received {:tool_running, tool}
      refute Process.alive?(tool)

      # A tool killed by an exit signal (its own, or a linked process's) is answered too,
      # instead of leaving the request to its timeout.
      killed = run.("x", %{"lookup" => fn _ -> Process.exit(self(), :kill) end}, timeout: 10_000)
      assert killed =~ "exited"

      assert run.("m", %{}, []) =~ "no Elixir function for tool \"lookup\""
      assert in_flight(opts) == 0
    end

    test "tool calls of two concurrent requests on one worker reach their own callers" do
      opts = bridge_pool()
      test = self()
      agent_lm("x", "key-x", "answer x", opts)
      agent_lm("y", "key-y", "answer y", opts)

      run = fn session ->
        Task.async(fn ->
          caller = self()

          # Both tools block until the test saw both running: both requests are in flight on
          # the one worker at the same time.
          lookup = fn %{"key" => key} ->
            send(test, {:in_tool, session, self()})
            receive do: (:go -> "#{session}'s function got #{key}, caller #{inspect(caller)}")
          end

          {caller,
           NativePool.execute_in_session(
             session,
             :execute_program,
             %{program_id: "agent", inputs: %{question: "q"}},
             [tools: %{"lookup" => lookup}] ++ opts
           )}
        end)
      end

      tasks = [run.("x"), run.("y")]
      assert_receive {:in_tool, "x", tool_x}, 60_000
      assert_receive {:in_tool, "y", tool_y}, 60_000
      assert %{in_flight: 2} = status(opts)
      send(tool_y, :go)
      send(tool_x, :go)

      for {task, session} <- Enum.zip(tasks, ["x", "y"]) do
        {caller, {:ok, %{"outputs" => outputs}}} = Task.await(task, 60_000)

        assert outputs["trajectory"]["observation_0"] ==
                 "#{session}'s function got key-#{session}, caller #{inspect(caller)}"

        assert outputs["answer"] == "answer #{session}"
      end

      assert %{worker_pids: [_]} = status(opts)
    end

    test "a caller that dies while its tool runs cancels the request" do
      opts = bridge_pool()
      agent_lm("d", "k", "never", opts)
      test = self()

      caller =
        spawn(fn ->
          NativePool.execute_in_session(
            "d",
            :execute_program,
            %{program_id: "agent", inputs: %{question: "q"}},
            tools: %{
              "lookup" => fn _ ->
                send(test, {:tool_running, self()})
                Process.sleep(:infinity)
              end
            },
            pool: opts[:pool]
          )
        end)

      assert_receive {:tool_running, tool}, 60_000
      ref = Process.monitor(tool)
      Process.exit(caller, :kill)
      assert_receive {:DOWN, ^ref, :process, ^tool, _}, 5_000
      assert eventually(fn -> status(opts).counters.cancelled >= 1 and in_flight(opts) == 0 end)
    end
  end
end
