defmodule DSPex.NativePoolDspyConcurrencyTest do
  # The real DSPy bridge (protocol 2) against the project's OpenAI-compatible LM server: one
  # worker runs several sessions' requests at once, each under its own LM and programs.
  use DSPex.NativePool.PoolCase, async: true

  @moduletag :dspy
  @moduletag timeout: 180_000

  defp start_lm_server do
    python = DSPex.NativePool.Server.default_python()
    script = Path.expand("../../priv/python/lm_server.py", __DIR__)

    port =
      Port.open({:spawn_executable, python}, [
        :binary,
        {:line, 1024},
        args: [
          script,
          "--port",
          "0",
          "--latency",
          "0.4",
          "--jitter",
          "0.05",
          "--exit-on-stdin-eof"
        ]
      ])

    receive do
      {^port, {:data, {:eol, line}}} -> {port, line |> String.trim() |> String.to_integer()}
    after
      30_000 -> flunk("lm_server.py did not print its port")
    end
  end

  defp lm_stats(port_no) do
    {:ok, _} = Application.ensure_all_started(:inets)
    url = ~c"http://127.0.0.1:#{port_no}/v1/stats"
    {:ok, {{_, 200, _}, _, body}} = :httpc.request(:get, {url, []}, [], body_format: :binary)
    {:ok, stats} = Native.json_decode(body)
    stats
  end

  test "a session's concurrent requests each see their own LM and programs" do
    {port, port_no} = start_lm_server()
    on_exit(fn -> if Port.info(port), do: Port.close(port) end)

    opts =
      start_pool(
        pool_size: 1,
        script: Path.join(:code.priv_dir(:dspex_native_pool), "python/dspy_bridge.py"),
        start_method: :fork_server,
        start_timeout: 120_000
      )

    call = fn session, command, args ->
      NativePool.execute_in_session(session, command, args, [timeout: 60_000] ++ opts)
    end

    # Session "http" talks to the LM server; session "offline" to the dummy LM; both name
    # their program "p", with different output fields.
    {:ok, _} =
      call.("http", :configure_lm, %{
        provider: "openai",
        model: "test",
        api_base: "http://127.0.0.1:#{port_no}/v1",
        api_key: "x"
      })

    {:ok, _} = call.("offline", :configure_lm, %{provider: "dummy", latency_ms: 400})

    for {session, field} <- [{"http", "answer"}, {"offline", "reply"}] do
      {:ok, _} =
        call.(session, :create_program, %{
          id: "p",
          signature: %{inputs: [%{name: "question"}], outputs: [%{name: field}]},
          program_type: "predict"
        })
    end

    # Questions never asked before: DSPy's on-disk cache must not answer them.
    run = System.os_time()
    jobs = for i <- 1..4, session <- ["http", "offline"], do: {session, "q#{i}-#{session}-#{run}"}

    results =
      jobs
      |> Enum.map(fn {session, q} ->
        Task.async(fn ->
          {session, q,
           call.(session, :execute_program, %{program_id: "p", inputs: %{question: q}})}
        end)
      end)
      |> Enum.map(&Task.await(&1, 120_000))

    for {session, q, result} <- results do
      assert {:ok, %{"outputs" => outputs}} = result

      case session do
        "http" -> assert outputs == %{"answer" => "answer: answer to #{q}"}
        "offline" -> assert outputs == %{"reply" => "reply: dummy answer for #{q}"}
      end
    end

    # The one worker had the "http" session's LM calls in flight at the same time.
    assert %{"served" => 4, "peak_in_flight" => peak} = lm_stats(port_no)
    assert peak >= 2
    assert %{worker_pids: [_], counters: %{recycled: 0}} = status(opts)
  end

  test "the bridge without protocol 2 is driven one request at a time" do
    opts =
      start_pool(
        pool_size: 1,
        script: Path.join(:code.priv_dir(:dspex_native_pool), "python/dspy_bridge.py"),
        start_method: :fork_server,
        start_timeout: 120_000,
        env: [{"DSPY_BRIDGE_PROTOCOL", "1"}]
      )

    assert %{capacity: 1} = status(opts)
    {:ok, _} = NativePool.execute_anonymous(:configure_lm, %{provider: "dummy"}, opts)

    {:ok, _} =
      NativePool.execute_in_session(
        "s",
        :create_program,
        %{id: "p", signature: %{inputs: [%{name: "question"}], outputs: [%{name: "answer"}]}},
        opts
      )

    results =
      for i <- 1..3 do
        Task.async(fn ->
          NativePool.execute_in_session(
            "s",
            :execute_program,
            %{program_id: "p", inputs: %{question: "v1-#{i}"}},
            [timeout: 60_000] ++ opts
          )
        end)
      end
      |> Enum.map(&Task.await(&1, 120_000))

    for {result, i} <- Enum.with_index(results, 1) do
      assert {:ok, %{"outputs" => %{"answer" => answer}}} = result
      assert answer == "answer: dummy answer for v1-#{i}"
    end
  end
end
