defmodule Mix.Tasks.DspexNativePool.Demo do
  @shortdoc "Runs many concurrent DSPy sessions through the native pool"
  @moduledoc """
  The main job, end to end: a pool of DSPy workers starts, many sessions run concurrently
  (each creates programs and executes them), one worker is killed midway, and a table shows
  what happened.

      mix dspex_native_pool.demo [--sessions 48] [--programs 2] [--executions 5] [--pool-size 4]
                                 [--latency-ms 500] [--offline]

  Offline by default: the LM is the project's OpenAI-compatible HTTP server
  (`priv/python/lm_server.py`, started by the demo and stopped at its end), answering every call
  after `--latency-ms` ± 40% (300-700 ms by default, like a hosted model), so every call takes
  the real path DSPy -> LiteLLM -> HTTP and each worker has many of them in flight at once.
  With an API key in the environment the demo uses the real provider instead:
  `OPENAI_API_KEY` (model `openai/gpt-4o-mini`) or `GEMINI_API_KEY` (`gemini/gemini-2.0-flash`);
  `--offline` ignores the keys.
  """
  use Mix.Task

  alias DSPex.NativePool.LMServer
  alias DSPex.PythonBridge.NativePool

  @switches [
    sessions: :integer,
    programs: :integer,
    executions: :integer,
    pool_size: :integer,
    latency_ms: :integer,
    offline: :boolean
  ]

  @impl true
  def run(args) do
    {opts, _} = OptionParser.parse!(args, strict: @switches)
    Mix.Task.run("app.start")
    # The demo reports the killed worker itself; keep the pool's own warnings out of the table.
    Logger.configure(level: :error)

    sessions = Keyword.get(opts, :sessions, 48)
    programs = Keyword.get(opts, :programs, 2)
    executions = Keyword.get(opts, :executions, 5)
    pool_size = Keyword.get(opts, :pool_size, 4)
    {lm, lm_server} = lm_setup(opts)

    say("Starting #{pool_size} DSPy workers (#{lm_label(lm)})...")
    {start_us, {:ok, _}} = :timer.tc(fn -> start_pool(pool_size) end)

    say(
      "  ready in #{ms(start_us)} ms: OS pids #{inspect(NativePool.get_pool_status().worker_pids)}"
    )

    {:ok, _} =
      NativePool.execute_anonymous(:configure_lm, Map.delete(lm, :latency_s), timeout: 60_000)

    say("LM configured once, for every worker present and future.")

    total = sessions * programs * (1 + executions)

    say(
      "Running #{sessions} sessions concurrently: #{programs} programs each, #{executions} executions per program (#{total} calls)..."
    )

    parent = self()
    killer = spawn_link(fn -> kill_one_worker_midway(parent, div(total, 2)) end)
    counter = :counters.new(1, [])
    sampler = spawn_link(fn -> sample_in_flight(0) end)

    {elapsed_us, results} =
      :timer.tc(fn ->
        1..sessions
        |> Task.async_stream(&run_session(&1, programs, executions, counter, killer),
          max_concurrency: sessions,
          timeout: :infinity
        )
        |> Enum.flat_map(fn {:ok, calls} -> calls end)
      end)

    killed = receive(do: ({:killed, pid} -> pid), after: (0 -> nil))
    peak = peak_in_flight(sampler)
    await_full_pool(pool_size, 60_000)
    report(results, elapsed_us, sessions, killed, concurrency_rows(peak, pool_size, lm_server))
    if lm_server, do: LMServer.stop(lm_server)
    # Issue 12: a streamed answer and an agent with an Elixir tool.
    DSPex.NativePool.StreamingDemo.run()
  end

  # The LM: a real provider when a key is set (and not --offline), else the local HTTP server.
  defp lm_setup(opts) do
    case lm_config(opts[:offline]) do
      %{provider: "local"} ->
        latency = Keyword.get(opts, :latency_ms, 500) / 1000
        {:ok, server} = LMServer.start(latency: latency, jitter: latency * 0.4)
        # No disk cache: every run asks the server, as a first run against a provider does.
        lm = server |> LMServer.lm_config() |> Map.merge(%{cache: false, latency_s: latency})
        {lm, server}

      lm ->
        {lm, nil}
    end
  end

  # Samples the pool's requests in flight (all workers) until asked for the peak.
  defp sample_in_flight(peak) do
    receive do
      {:peak, from} -> send(from, {:peak, peak})
    after
      20 ->
        in_flight =
          try do
            NativePool.get_pool_status().in_flight
          rescue
            _ -> 0
          end

        sample_in_flight(max(peak, in_flight))
    end
  end

  defp peak_in_flight(sampler) do
    send(sampler, {:peak, self()})
    receive(do: ({:peak, peak} -> peak))
  end

  defp concurrency_rows(peak, pool_size, server) do
    lm_rows =
      with %LMServer{} <- server, {:ok, stats} <- LMServer.stats(server) do
        [
          {"LM requests served (HTTP)", stats["served"]},
          {"LM requests at once (server peak)", stats["peak_in_flight"]}
        ]
      else
        _ -> []
      end

    [
      {"requests in flight at once (pool peak, sampled)", peak},
      {"  per worker (peak / #{pool_size} workers)", Float.round(peak / pool_size, 1)}
    ] ++ lm_rows
  end

  defp start_pool(pool_size) do
    NativePool.start_link(pool_size: pool_size, max_overflow: 0, lazy: false)
  end

  # The killed worker's replacement starts in the background; show the pool back at full size.
  defp await_full_pool(size, ms) do
    if NativePool.get_pool_status().ready < size and ms > 0 do
      Process.sleep(20)
      await_full_pool(size, ms - 20)
    end
  end

  defp run_session(i, programs, executions, counter, killer) do
    session = "demo-session-#{i}"

    creates =
      for p <- 1..programs do
        spec = %{
          id: "qa_#{p}",
          program_type: if(rem(p, 2) == 0, do: "chain_of_thought", else: "predict"),
          signature: %{
            inputs: [%{name: "question", description: "a question"}],
            outputs: [%{name: "answer", description: "a short answer"}]
          }
        }

        timed(counter, killer, fn ->
          NativePool.execute_in_session(session, :create_program, spec, retries: 1)
        end)
      end

    runs =
      for e <- 1..executions, p <- 1..programs do
        inputs = %{question: "Session #{i}, question #{e}: what is #{e} + #{p}?"}

        timed(counter, killer, fn ->
          # Safe to repeat: a call that was on the killed worker runs again on another one.
          NativePool.execute_in_session(
            session,
            :execute_program,
            %{program_id: "qa_#{p}", inputs: inputs},
            timeout: 60_000,
            retries: 1
          )
        end)
      end

    NativePool.end_session(session)
    creates ++ runs
  end

  defp timed(counter, killer, fun) do
    {us, result} = :timer.tc(fun)
    :counters.add(counter, 1, 1)
    send(killer, {:progress, :counters.get(counter, 1)})
    {us, result}
  end

  # Kills the worker that served the most recent calls once half the calls are done.
  defp kill_one_worker_midway(parent, at) do
    receive do
      {:progress, n} when n >= at ->
        [pid | _] = NativePool.get_pool_status().worker_pids
        System.cmd("kill", ["-9", to_string(pid)])
        send(parent, {:killed, pid})
        drain()

      {:progress, _} ->
        kill_one_worker_midway(parent, at)
    end
  end

  defp drain do
    receive do
      _ -> drain()
    end
  end

  defp report(results, elapsed_us, sessions, killed, extra_rows) do
    latencies = results |> Enum.map(&elem(&1, 0)) |> Enum.sort()
    errors = Enum.reject(results, &match?({_, {:ok, _}}, &1))
    calls = length(results)
    status = NativePool.get_pool_status()

    say("")
    if killed, do: say("Killed worker OS pid #{killed} with SIGKILL halfway through.")

    rows =
      [
        {"sessions", sessions},
        {"calls", calls},
        {"errors", length(errors)},
        {"calls/s", Float.round(calls / (elapsed_us / 1_000_000), 1)},
        {"p50 latency (ms)", ms(percentile(latencies, 0.50))},
        {"p99 latency (ms)", ms(percentile(latencies, 0.99))},
        {"wall time (s)", Float.round(elapsed_us / 1_000_000, 2)},
        {"sessions re-created on another worker", status.counters.restores},
        {"workers replaced", status.counters.recycled},
        {"workers ready now", "#{status.ready}/#{status.pool_size}"}
      ] ++ extra_rows

    width = rows |> Enum.map(&String.length(elem(&1, 0))) |> Enum.max()
    say(String.duplicate("-", width + 14))
    for {k, v} <- rows, do: say("#{String.pad_trailing(k, width)}  #{v}")
    say(String.duplicate("-", width + 14))

    for {_, error} <- Enum.take(errors, 5), do: say("error: #{inspect(error)}")
    if errors != [], do: exit({:shutdown, 1})
  end

  defp percentile([], _), do: 0

  defp percentile(sorted, p),
    do: Enum.at(sorted, min(length(sorted) - 1, floor(length(sorted) * p)))

  defp ms(us), do: Float.round(us / 1000, 2)

  defp lm_config(true), do: %{provider: "local"}

  defp lm_config(_) do
    cond do
      key = System.get_env("OPENAI_API_KEY") ->
        %{provider: "openai", model: "gpt-4o-mini", api_key: key, max_tokens: 200}

      key = System.get_env("GEMINI_API_KEY") ->
        %{provider: "gemini", model: "gemini-2.0-flash", api_key: key, max_tokens: 200}

      true ->
        lm_config(true)
    end
  end

  defp lm_label(%{latency_s: s, api_base: base}),
    do:
      "offline: local OpenAI-compatible LM server at #{base}, #{round(s * 1000)} ms ± 40% a call"

  defp lm_label(%{provider: p, model: m}), do: "#{p}/#{m}"

  defp say(line), do: Mix.shell().info(line)
end
