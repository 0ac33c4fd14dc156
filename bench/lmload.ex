defmodule DSPexBench.LMLoad do
  @moduledoc false
  # Scenario 9 (issue 10): N concurrent sessions, each one execute_program of a Predict program
  # it created beforehand (untimed), whose LM call goes over HTTP to priv/python/lm_server.py answering after
  # L = 0.5 s, on pool_size 4. Three ways in the same run, against the same DSPy bridge:
  #
  #   :p2      NativePool, protocol 2 with the worker's announced concurrency (64 per worker)
  #   :serial  NativePool with `worker_concurrency: 1` (one request at a time per worker)
  #   :wide    NativePool, protocol 2 with the bridge announcing 256 (DSPY_BRIDGE_CONCURRENCY),
  #            run at cfg.lm_wide_ns only: is the wall time bound by the slots or by the CPU?
  #   :v2      the V2 pattern (DSPexBench.V2Pool): protocol 1, one request at a time per worker,
  #            a session's create + execute in one timed checkout (V2 has no session
  #            affinity, so the program must be on the worker that runs it; create costs ~1 ms
  #            next to the 500 ms LM call)
  #
  # Per row: wall time from the first session's start to the last one's reply, calls/s
  # (execute_program calls), p50/p99 of a session's latency, the LM
  # server's peak of concurrent requests, and the workers' memory right after the run (sum of
  # RSS, sum of PSS from smaps_rollup, plus the fork server's PSS for NativePool). The
  # one-at-a-time paths run only up to cfg.lm_serial_max sessions (their time grows as
  # N / 4 x L); larger N are extrapolated in the report, marked as such.

  alias DSPex.NativePool.LMServer
  alias DSPex.PythonBridge.NativePool
  alias DSPexBench.{Env, Impls, Monitor, Proto, Stats, V2Pool}

  @signature %{
    inputs: [%{name: "question", description: "a question"}],
    outputs: [%{name: "answer", description: "a short answer"}]
  }
  @pool_size 4

  def pool_size, do: @pool_size

  def s9(cfg) do
    case Env.dspy_python() do
      nil ->
        %{skipped: "no Python with dspy (priv/python/.venv or /tmp/probe-venv)"}

      python ->
        rows =
          for {mode, ns} <- [
                p2: cfg.lm_ns,
                wide: cfg.lm_wide_ns,
                serial: Enum.filter(cfg.lm_ns, &(&1 <= cfg.lm_serial_max)),
                v2: Enum.filter(cfg.lm_ns, &(&1 <= cfg.lm_serial_max))
              ],
              ns != [],
              row <- run_mode(mode, ns, python, cfg) do
            row
          end

        %{rows: rows, latency_s: cfg.lm_latency_s, ns: cfg.lm_ns, pool_size: @pool_size}
    end
  end

  defp run_mode(mode, ns, python, cfg) do
    Monitor.phase({:s9, mode, :start})
    log("  #{mode}: starting #{@pool_size} DSPy workers")
    h = start(mode, python)

    try do
      # Warm-up, dropped: a worker's first LM call imports LiteLLM (the fork server does not).
      with_server(h, python, cfg, &row(h, mode, 4 * @pool_size, &1))

      for n <- ns do
        Monitor.phase({:s9, mode, n})
        log("  #{mode}: #{n} sessions")
        with_server(h, python, cfg, &row(h, mode, n, &1))
      end
    after
      Impls.stop(h)
    end
  end

  # A fresh LM server per row, so its peak counts that row only.
  defp with_server(h, python, cfg, fun) do
    {:ok, server} = LMServer.start(latency: cfg.lm_latency_s, python: python)

    try do
      :ok = configure(h, LMServer.lm_config(server) |> Map.put(:cache, false))
      fun.(server)
    after
      LMServer.stop(server)
    end
  end

  defp start(:v2, python), do: Impls.start(:v2, @pool_size, python, Env.dspy_script())

  defp start(mode, python) do
    extra = [start_timeout: 180_000, start_method: :fork_server]

    extra =
      case mode do
        :serial -> [worker_concurrency: 1] ++ extra
        :wide -> [env: [{"DSPY_BRIDGE_CONCURRENCY", "256"}]] ++ extra
        :p2 -> extra
      end

    Impls.start(:native, @pool_size, python, Env.dspy_script(), extra)
  end

  # configure_lm without a session is global in each worker: NativePool sends it to every
  # worker; the V2 pattern has to hold all its workers at once to reach each one.
  defp configure({:native, name, _}, lm) do
    {:ok, _} = NativePool.execute_anonymous(:configure_lm, lm, pool: name, timeout: 60_000)
    :ok
  end

  defp configure({:v2, pool}, lm) do
    parent = self()

    holders =
      for _ <- 1..@pool_size do
        spawn_link(fn ->
          result =
            v2_checkout(pool, 60_000, fn port ->
              r = Proto.round_trip(port, "configure_lm", lm, 60_000)
              send(parent, {:held, self()})
              receive(do: (:go -> r))
            end)

          send(parent, {:configured, self(), result})
        end)
      end

    for _ <- holders, do: receive(do: ({:held, _} -> :ok))
    for h <- holders, do: send(h, :go)

    for h <- holders do
      receive do
        {:configured, ^h, {:ok, _}} -> :ok
      end
    end

    :ok
  end

  defp row(h, mode, n, server) do
    run = System.unique_integer([:positive])
    sessions = for i <- 1..n, do: "s9_#{mode}_#{run}_#{i}"
    parent = self()
    :ok = prepare(h, sessions)
    cpu0 = worker_cpu_s(h)
    t0 = Stats.now()

    tasks =
      Enum.map(sessions, fn sid ->
        spawn_link(fn ->
          s0 = Stats.now()
          r = session(h, sid)
          send(parent, {:s9_done, self(), Stats.now(), Stats.native_to_us(Stats.now() - s0), r})
        end)
      end)

    done =
      for _ <- tasks do
        receive do
          {:s9_done, _, t_end, us, r} -> {t_end, us, r}
        end
      end

    t_last = done |> Enum.map(&elem(&1, 0)) |> Enum.max()
    wall_s = Stats.native_to_us(t_last - t0) / 1_000_000
    errors = Enum.reject(done, &match?({_, _, {:ok, _}}, &1))
    lat = done |> Enum.map(&elem(&1, 1)) |> Stats.summarize()
    cpu_s = worker_cpu_s(h) - cpu0
    mem = memory(h)
    stats = with({:ok, s} <- LMServer.stats(server), do: s, else: (_ -> %{}))
    cleanup(h, sessions)

    %{
      mode: mode,
      n: n,
      wall_s: wall_s,
      calls_per_s: n / wall_s,
      worker_cpu_s: cpu_s,
      lat_us: lat,
      errors: length(errors),
      first_error: with([{_, _, e} | _] <- errors, do: e, else: (_ -> nil)),
      served: stats["served"],
      peak_in_flight: stats["peak_in_flight"]
    }
    |> Map.merge(mem)
  end

  # Untimed, NativePool only: each session creates its program (on its home worker). The V2
  # pattern has no home worker, so it creates the program in the timed checkout that runs it.
  defp prepare({:native, name, _}, sessions) do
    sessions
    |> Task.async_stream(
      fn sid ->
        {:ok, _} =
          NativePool.execute_in_session(
            sid,
            :create_program,
            %{id: "p", signature: @signature, program_type: "predict"},
            pool: name,
            timeout: 300_000
          )
      end,
      max_concurrency: 64,
      timeout: :infinity
    )
    |> Stream.run()
  end

  defp prepare({:v2, _}, _sessions), do: :ok

  defp session({:native, name, _}, sid) do
    NativePool.execute_in_session(
      sid,
      :execute_program,
      %{program_id: "p", inputs: %{question: "question of #{sid}"}},
      pool: name,
      timeout: 300_000
    )
  end

  defp session({:v2, pool}, sid) do
    v2_checkout(pool, 300_000, fn port ->
      with {:ok, _} <-
             Proto.round_trip(
               port,
               "create_program",
               %{session_id: sid, id: "p", signature: @signature, program_type: "predict"},
               300_000
             ) do
        Proto.round_trip(
          port,
          "execute_program",
          %{session_id: sid, program_id: "p", inputs: %{question: "question of #{sid}"}},
          300_000
        )
      end
    end)
  catch
    :exit, reason -> {:error, reason}
  end

  # V2Pool.checkout!/4 with the connect-back of V2Pool.execute_anonymous/4.
  defp v2_checkout(pool, timeout, fun) do
    V2Pool.checkout!(
      pool,
      :anonymous,
      fn {pool_pid, _}, port ->
        result = fun.(port)

        try do
          Port.connect(port, pool_pid)
          Process.unlink(port)
          {result, :ok}
        rescue
          _ -> {result, :close}
        end
      end,
      timeout
    )
  end

  defp worker_pids({:native, name, _}), do: NativePool.get_pool_status(pool: name).worker_pids

  defp worker_pids({:v2, pool}) do
    :sys.get_state(pool).ports
    |> Enum.map(&Port.info(&1, :os_pid))
    |> Enum.flat_map(fn
      {:os_pid, pid} -> [pid]
      _ -> []
    end)
  end

  # utime + stime of the workers (/proc/PID/stat fields 14 and 15, in clock ticks of 1/100 s).
  defp worker_cpu_s(h) do
    h
    |> worker_pids()
    |> Enum.map(fn pid ->
      with {:ok, text} <- File.read("/proc/#{pid}/stat"),
           [_, rest] <- String.split(text, ") ", parts: 2),
           fields <- String.split(rest, " ") do
        (String.to_integer(Enum.at(fields, 11)) + String.to_integer(Enum.at(fields, 12))) / 100
      else
        _ -> 0
      end
    end)
    |> Enum.sum()
  end

  defp memory({:native, _, _} = h) do
    pids = worker_pids(h)
    server = pids |> hd() |> Env.ppid()

    %{
      workers: length(pids),
      rss_kib: sum(Enum.map(pids, &Env.rss_kib/1)),
      pss_kib: sum(Enum.map(pids, &Env.pss_kib/1)),
      fork_server_pss_kib: Env.pss_kib(server)
    }
  end

  defp memory({:v2, _} = h) do
    pids = worker_pids(h)

    %{
      workers: length(pids),
      rss_kib: sum(Enum.map(pids, &Env.rss_kib/1)),
      pss_kib: sum(Enum.map(pids, &Env.pss_kib/1)),
      fork_server_pss_kib: 0
    }
  end

  defp sum(list), do: list |> Enum.reject(&is_nil/1) |> Enum.sum()

  # Untimed: the sessions' programs are freed, so the next row starts from the same state.
  defp cleanup({:native, name, _}, sessions) do
    _ = name
    Enum.each(sessions, &NativePool.end_session/1)
  end

  defp cleanup({:v2, _}, _sessions), do: :ok

  defp log(line), do: IO.puts(line)
end
