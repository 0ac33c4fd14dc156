defmodule DSPex.NativePool.StreamingDemo do
  @moduledoc false
  # The end of `mix dspex_native_pool.demo` (issue 12): one answer streamed and printed as it
  # arrives, from the project's streaming LM server (priv/python/lm_server.py, started here on
  # a free port), and one ReAct agent whose tool is an Elixir function reading an ETS table.
  # Each runs in its own session, with its own LM, on the pool the demo started.

  alias DSPex.PythonBridge.NativePool

  @lookup %{
    name: "lookup",
    description: "Looks up a product's stock in the warehouse table.",
    args: %{sku: "string"}
  }

  def run do
    say("")
    streamed_answer()
    say("")
    agent_with_an_elixir_tool()
  end

  defp streamed_answer do
    {port, port_no} = start_lm_server()

    try do
      session = "demo-stream"

      lm = %{
        provider: "openai",
        model: "test",
        api_base: "http://127.0.0.1:#{port_no}/v1",
        api_key: "x",
        cache: false
      }

      {:ok, _} = NativePool.execute_in_session(session, :configure_lm, lm)

      {:ok, _} =
        NativePool.execute_in_session(session, :create_program, %{
          id: "explain",
          program_type: "chain_of_thought",
          signature: %{inputs: [%{name: "question"}], outputs: [%{name: "answer"}]}
        })

      say("Streaming an answer (execute_stream/4, local streaming LM server):")

      NativePool.execute_stream(session, :execute_program, %{
        program_id: "explain",
        inputs: %{question: "why do BEAM processes make streaming easy?"}
      })
      |> Enum.reduce(nil, fn
        {:chunk, field, text}, field ->
          IO.write(text)
          field

        {:chunk, field, text}, _previous ->
          IO.write("\n  #{field}: " <> String.trim_leading(text))
          field

        {:done, result}, _ ->
          IO.write("\n")
          say("  done: #{map_size(result["outputs"])} output fields, the same text as the chunks")

        {:error, reason}, _ ->
          IO.write("\n")
          say("  stream failed: #{inspect(reason)}")
      end)

      NativePool.end_session(session)
    after
      Port.close(port)
    end
  end

  defp agent_with_an_elixir_tool do
    session = "demo-agent"
    stock = :ets.new(:demo_stock, [:public, read_concurrency: true])
    :ets.insert(stock, [{"sku-42", 17}, {"sku-7", 0}])

    # A dummy LM scripted to call lookup(sku-42), then finish, then answer: the agent's steps
    # are fixed, the tool's answer comes from the ETS table above.
    answers = [
      %{
        next_thought: "I need the stock",
        next_tool_name: "lookup",
        next_tool_args: %{sku: "sku-42"}
      },
      %{next_thought: "I have it", next_tool_name: "finish", next_tool_args: %{}},
      %{answer: "17 units of sku-42 are in stock"}
    ]

    {:ok, _} =
      NativePool.execute_in_session(session, :configure_lm, %{provider: "dummy", answers: answers})

    {:ok, _} =
      NativePool.execute_in_session(session, :create_program, %{
        id: "clerk",
        program_type: "react",
        signature: %{inputs: [%{name: "question"}], outputs: [%{name: "answer"}]},
        tools: [@lookup]
      })

    lookup = fn %{"sku" => sku} ->
      say("  [Elixir] lookup(#{inspect(sku)}) in #{inspect(self())}, reading ETS")

      case :ets.lookup(stock, sku) do
        [{^sku, units}] -> %{sku: sku, units: units}
        [] -> "unknown sku #{sku}"
      end
    end

    say("A ReAct agent whose tool is an Elixir function:")

    case NativePool.execute_in_session(
           session,
           :execute_program,
           %{program_id: "clerk", inputs: %{question: "How many sku-42 are in stock?"}},
           tools: %{"lookup" => lookup}
         ) do
      {:ok, %{"outputs" => outputs}} ->
        say("  observation: #{inspect(outputs["trajectory"]["observation_0"])}")
        say("  answer: #{outputs["answer"]}")

      {:error, reason} ->
        say("  agent failed: #{inspect(reason)}")
    end

    NativePool.end_session(session)
  end

  defp start_lm_server do
    python = DSPex.NativePool.Server.default_python()
    script = Path.join(:code.priv_dir(:dspex_native_pool), "python/lm_server.py")
    args = [script, "--port", "0", "--latency", "0.1", "--chunk-delay", "0.03"]

    port =
      Port.open({:spawn_executable, python}, [
        :binary,
        {:line, 1024},
        args: args ++ ["--exit-on-stdin-eof"]
      ])

    receive do
      {^port, {:data, {:eol, line}}} -> {port, line |> String.trim() |> String.to_integer()}
    after
      30_000 -> raise "lm_server.py did not print its port"
    end
  end

  defp say(line), do: Mix.shell().info(line)
end
