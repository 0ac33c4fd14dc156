defmodule DSPexBench.Runner do
  @moduledoc false
  # Runs the scenarios of `mix dspex_native_pool.bench`, prints each section as it completes
  # and writes the markdown report.

  alias DSPexBench.{Codec, Env, Impls, Monitor, Placement, Report, Scenarios}

  @all [1, 2, 3, 4, 5, 6, 7, 8, 9]
  # Scenarios left out of the long-schedule pass by default (every other selected one is re-run
  # there with the --quick settings): 6, 8 and 9, as starting DSPy workers takes minutes and
  # runs the same NIFs as the others.
  @sched_skip [6, 8, 9]

  def config(opts) do
    quick = Keyword.get(opts, :quick, false)
    pick = fn q, f -> if quick, do: q, else: f end

    %{
      quick: quick,
      scenarios: ints(opts[:scenarios]) || @all,
      sizes: ints(opts[:sizes]) || pick.([2, 8], [1, 2, 4, 8]),
      concurrency: ints(opts[:concurrency]) || pick.([1, 16, 256], [1, 4, 16, 64, 256]),
      out: opts[:out] || "bench/RESULTS.md",
      cargo: not Keyword.get(opts, :no_cargo, false),
      wait_quiet: Keyword.get(opts, :wait_quiet, pick.(5, 120)),
      placements:
        if(opts[:placements], do: Placement.parse(opts[:placements]), else: Placement.all()),
      hog_max_s: Placement.hog_bound(quick),
      # What a child VM (pinned placement) gets so it uses the same settings.
      child_args: if(quick, do: ["--quick"], else: []),
      sched: opts[:sched],
      opts: opts,
      monitored: false,
      python: Env.python(),
      script: Env.test_worker(),
      s1_iters: pick.(2_000, 20_000),
      s1_rounds: pick.(8, 20),
      s1_warmup: pick.(200, 1_000),
      s2_ms: pick.(250, 1_000),
      s2_reps: pick.(2, 3),
      s2_warmup_ms: pick.(100, 200),
      s3_reps: pick.(1, 5),
      s4_ops: pick.(20_000, 200_000),
      s4_waiters: 1_000,
      s4_each: pick.(5, 50),
      s5_procs: 10_000,
      dspy_ns: pick.([1, 4], [1, 4, 8, 16]),
      dspy_seq_ns: pick.([], [1, 4, 8]),
      dspy_exec_size: pick.(4, 8),
      dspy_exec_ms: pick.(2_000, 5_000),
      s7_big_iters: pick.(10, 40),
      s8_kills: pick.(3, 10),
      # Scenario 9: sessions at once, LM latency (s), the largest N run one at a time.
      lm_ns: pick.([50, 200], [50, 200, 1_000]),
      lm_wide_ns: pick.([200], [1_000]),
      lm_latency_s: 0.5,
      lm_serial_max: 200
    }
  end

  defp ints(nil), do: nil

  defp ints(text) do
    text
    |> String.split(",", trim: true)
    |> Enum.map(&(&1 |> String.trim() |> String.to_integer()))
  end

  def run(opts) do
    cfg = config(opts)
    Logger.configure(level: :warning)
    codec = Codec.ensure_loaded()

    if opts[:child] do
      # A child VM of DSPexBench.Placement: one pass, its result to a file, nothing printed.
      Placement.child(opts[:child], opts[:child_out], cfg)
    else
      main(cfg, codec)
    end
  end

  defp main(cfg, codec) do
    t0 = System.monotonic_time(:millisecond)
    info = Env.info(cfg.python)

    IO.puts(
      "dspex_native_pool bench (#{if cfg.quick, do: "quick", else: "full"}): scenarios " <>
        "#{Enum.join(cfg.scenarios, ",")}, #{info.cpus} CPUs, OTP #{info.otp}, " <>
        "Elixir #{info.elixir}, #{info.python}\n"
    )

    if codec != :ok, do: IO.puts("  (#{elem(codec, 1)}: large payloads decode in Elixir)")
    calibration = Codec.calibrate()
    IO.puts(Report.codec(calibration) <> "\n")

    # Timed passes: no instrumentation runs in this VM meanwhile (no system_monitor, no probe
    # process, no CPU sampling; /proc is read only between passes).
    results =
      try do
        for n <- cfg.scenarios, into: %{} do
          IO.puts("== scenario #{n}: #{Report.title(n)}")
          quiet(cfg)
          c0 = Env.cpu_snapshot()
          w0 = System.monotonic_time(:millisecond)
          r = run_scenario(n, cfg)
          cpu = Env.cpu_foreign(c0, Env.cpu_snapshot(), System.monotonic_time(:millisecond) - w0)
          r = if is_map(r), do: Map.put(r, :cpu, cpu), else: %{data: r, cpu: cpu}
          IO.puts(Report.section_with_cpu(n, r, cfg))
          IO.puts("  (scenario #{n}: #{div(System.monotonic_time(:millisecond) - w0, 1000)} s)\n")
          {n, r}
        end
      after
        Impls.stop_all()
      end

    monitor = sched_pass(cfg)
    cfg = Map.put(cfg, :sched_scenarios, sched_scenarios(cfg))
    IO.puts(Report.schedulers(monitor, cfg.sched_scenarios))

    cargo =
      if cfg.cargo do
        IO.puts("== cargo bench (framing)")
        c = cargo_bench(cfg)
        IO.puts(Report.cargo(c))
        c
      end

    elapsed_s = (System.monotonic_time(:millisecond) - t0) / 1000
    report = Report.render(cfg, info, results, monitor, cargo, elapsed_s, calibration)
    File.mkdir_p!(Path.dirname(cfg.out))
    File.write!(cfg.out, report)
    IO.puts(Report.targets(results, monitor))
    IO.puts("wrote #{cfg.out} (#{:erlang.float_to_binary(elapsed_s, decimals: 0)} s)")
  end

  # Long schedules, in a pass of their own: the selected scenarios again with the --quick
  # settings (scenario 1 in the normal placement only) while the system monitor and the
  # high-priority probe run; their figures are dropped, only the monitor's report is kept.
  defp sched_scenarios(cfg) do
    case cfg.sched do
      "none" -> []
      nil -> Enum.reject(cfg.scenarios, &(&1 in @sched_skip))
      list -> ints(list)
    end
  end

  defp sched_pass(cfg) do
    case sched_scenarios(cfg) do
      [] ->
        %{}

      ns ->
        IO.puts("== long-schedule pass (scenarios #{Enum.join(ns, ",")}, --quick settings)")

        scfg = %{
          config(Keyword.take(cfg.opts, [:sizes, :concurrency]) ++ [quick: true])
          | placements: [:normal],
            monitored: true,
            wait_quiet: 0
        }

        :ok = Monitor.start()

        try do
          Enum.each(ns, fn n ->
            w0 = System.monotonic_time(:millisecond)
            run_scenario(n, scfg)
            IO.puts("  scenario #{n}: #{div(System.monotonic_time(:millisecond) - w0, 1000)} s")
          end)
        after
          Impls.stop_all()
        end

        Monitor.stop()
    end
  end

  defp quiet(%{wait_quiet: 0}), do: :ok

  defp quiet(cfg) do
    case Env.wait_quiet(cfg.wait_quiet) do
      {:busy, f} ->
        IO.puts(
          "  (other processes still use #{round(f * 100)}% of the machine after " <>
            "#{cfg.wait_quiet} s: running anyway)"
        )

      _ ->
        :ok
    end
  end

  defp run_scenario(n, cfg) do
    fun =
      case n do
        1 -> &Scenarios.s1_sequential/1
        2 -> &Scenarios.s2_throughput/1
        3 -> &Scenarios.s3_sleep/1
        4 -> &Scenarios.s4_checkout/1
        5 -> &Scenarios.s5_queue/1
        6 -> &Scenarios.s6_dspy/1
        7 -> &Scenarios.s7_payload/1
        8 -> &Scenarios.s8_start_method/1
        9 -> &DSPexBench.LMLoad.s9/1
      end

    try do
      fun.(cfg)
    rescue
      e ->
        msg = Exception.format(:error, e, __STACKTRACE__)
        IO.puts("scenario #{n} failed:\n#{msg}")
        %{failed: Exception.message(e)}
    catch
      kind, reason ->
        IO.puts("scenario #{n} failed: #{inspect({kind, reason})}")
        %{failed: inspect({kind, reason})}
    after
      Impls.stop_all()
    end
  end

  defp cargo_bench(cfg) do
    args =
      ["bench", "--quiet", "-p", "dspex_pool_core", "--bench", "framing", "--"] ++
        if(cfg.quick, do: ["--quick"], else: [])

    case System.cmd("cargo", args, stderr_to_stdout: true) do
      {out, 0} ->
        table =
          out
          |> String.split("\n")
          |> Enum.filter(&String.starts_with?(&1, "|"))
          |> Enum.join("\n")

        %{table: table, quick: cfg.quick}

      {out, status} ->
        %{failed: "cargo bench exited with #{status}: #{String.slice(out, -2000, 2000)}"}
    end
  end
end
