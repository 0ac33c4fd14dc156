defmodule DSPexBench.Report do
  @moduledoc false
  # Markdown for the terminal and for bench/RESULTS.md.

  alias DSPexBench.{Codec, Fmt, Impls, Placement, Scenarios, Stats}

  @pools [:native, :v2, :v1, :poolboy]
  @baselines [:v2, :v1, :poolboy]

  def title(1), do: "sequential ping latency from one process"
  def title(2), do: "throughput and latency: pool_size x client concurrency"
  def title(3), do: "32 requests sleeping 50 ms in Python, concurrency 32, pool_size 8"
  def title(4), do: "checkout + checkin with no Python call"
  def title(5), do: "10,000 processes queued on a pool of 2"
  def title(6), do: "DSPy workers: start-up, RSS, Predict executions/s"
  def title(7), do: "term <-> JSON conversion and 1 MiB payloads (extra)"
  def title(8), do: "DSPy workers: fork server vs spawn (start, replacement, PSS)"
  def title(9), do: "N concurrent DSPy sessions on an HTTP LM answering after 0.5 s, pool_size 4"

  # ---- sections -----------------------------------------------------------------------------

  def section_with_cpu(n, r, cfg), do: section(n, r, cfg) <> cpu_line(r[:cpu])

  @doc "How busy the machine was outside the bench (neighbours, other test runs), and steal."
  def cpu_line(nil), do: ""

  def cpu_line(c) do
    warn =
      if c.foreign > 0.05 or c.steal > 0.05,
        do: " **(noisy: figures of this part are less reliable)**",
        else: ""

    "CPU during this part: the bench and its Python processes #{Fmt.pct(c.own)} of the machine, " <>
      "other processes #{Fmt.pct(c.foreign)}, stolen by the hypervisor #{Fmt.pct(c.steal)}#{warn}.\n"
  end

  def section(n, %{failed: why}, _cfg), do: "### #{n}. #{title(n)}\n\n**Failed:** #{why}\n"
  def section(n, %{skipped: why}, _cfg), do: "### #{n}. #{title(n)}\n\n**Skipped:** #{why}\n"

  def section(1, r, _cfg) do
    placements = s1_placements(r)

    matrix =
      Enum.map(Scenarios.s1_paths(), fn k ->
        [Impls.label(k)] ++
          Enum.flat_map(placements, fn p ->
            case r[p] do
              %{stats: stats, round_ratios: rr} ->
                s = stats[k]
                port = stats[:port]

                [
                  "#{Fmt.num(s.median)} (#{Fmt.ratio(rr[k])})",
                  "#{Fmt.num(s.p99)} (#{Fmt.ratio(Stats.ratio(s.p99, port.p99))})"
                ]

              _ ->
                ["–", "–"]
            end
          end)
      end)

    header =
      ["path"] ++
        Enum.flat_map(placements, fn p ->
          ["#{p}: median µs (x Port)", "#{p}: p99 µs (x Port)"]
        end)

    details = Enum.map_join(placements, "\n", fn p -> s1_table(p, r[p]) end)

    """
    ### 1. #{title(1)}

    `ping` on the test worker, pool_size 1, one process calling back to back; the paths in interleaved rounds, the order rotating from round to round (µs). Placements: #{Enum.map_join(placements, "; ", &"**#{&1}** = #{Placement.label(&1)}")}. The median ratio is the per-round ratio (each round's median against the bare Port's in the same round, then the median over rounds: the target uses it); the p99 ratio is over all calls.

    #{Fmt.table(header, matrix)}
    #{details}
    """
  end

  def section(2, %{data: sizes}, cfg) do
    per_size =
      Enum.map_join(sizes, "\n", fn %{size: size, cells: cells, raw: raw} = block ->
        raw_at = fn depth ->
          Enum.find_value(raw, &(&1["depth"] == depth && &1["throughput"]))
        end

        raw1 = raw_at.(1)
        raw32 = raw_at.(32)

        summary =
          Enum.map(cfg.concurrency, fn c ->
            nat = cells[{:native, c}]
            {b, best} = best_baseline(cells, c)

            [c, Fmt.kops(nat.throughput)] ++
              Enum.map(@baselines, &Fmt.kops(cells[{&1, c}].throughput)) ++
              [
                "#{Impls.label(b)}",
                Fmt.ratio(Stats.ratio(nat.throughput, best)),
                Fmt.ratio(Stats.ratio(nat.lat.p99, cells[{b, c}].lat.p99)),
                Fmt.kops(raw1),
                Fmt.kops(raw32),
                Fmt.pct(Stats.ratio(nat.throughput, raw32)),
                errors(cells, c)
              ]
          end)

        lat =
          Enum.map(cfg.concurrency, fn c ->
            [
              c
              | Enum.map(@pools, fn k ->
                  "#{Fmt.num(cells[{k, c}].lat.p50)} / #{Fmt.num(cells[{k, c}].lat.p99)}"
                end)
            ]
          end)

        """
        #### pool_size #{size}

        Throughput (requests/s, `ping`), closed loop: median of #{cfg.s2_reps} repetitions (the pools interleaved, the order rotating) of #{cfg.s2_ms} ms measured after #{cfg.s2_warmup_ms} ms warm-up; latency over all repetitions. The best baseline is the one with the highest throughput in the cell; "p99 Native / best" compares NativePool's p99 with that baseline's. Raw Python: one parent, #{size} workers, 1 or 32 requests in flight per worker.

        #{Fmt.table(["clients", "NativePool", "V2", "V1", "poolboy", "best baseline", "Native / best", "p99 Native / best", "raw depth 1", "raw depth 32", "Native / raw 32", "errors"], summary)}
        Latency p50 / p99 (µs):

        #{Fmt.table(["clients" | Enum.map(@pools, &Impls.label/1)], lat)}
        #{cpu_line(block[:cpu])}
        """
      end)

    """
    ### 2. #{title(2)}

    NativePool against the best baseline of each cell: throughput ratio, then p99 latency as NativePool's / the best baseline's (µs).

    #{s2_matrix(sizes, cfg)}
    #{per_size}
    """
  end

  def section(3, r, _cfg) do
    rows =
      Enum.map(@pools, fn k ->
        s = r[k]
        [Impls.label(k), s.wall_ms, Fmt.ratio(s.wall_ms / 200), s.lat.p50, s.lat.p99, s.lat.max]
      end)

    """
    ### 3. #{title(3)}

    Ideal: 4 waves of 8 = 200 ms. Wall time is the median over runs; latency per request (ms).

    #{Fmt.table(["pool", "wall ms", "vs ideal", "p50 ms", "p99 ms", "max ms"], rows)}
    """
  end

  def section(4, r, _cfg) do
    kinds = [:native, :v2, :poolboy]

    un =
      for k <- kinds, v <- [:plain, :receive] do
        s = r.uncontended[{k, v}]
        label = if v == :plain, do: "plain loop", else: "`receive` after each batch"
        [Impls.label(k), label, s.median, s.mean, s.p99, s.min]
      end

    co =
      Enum.map(kinds, fn k ->
        s = r.contended[k]

        [
          "#{Impls.label(k)}",
          "#{s.ops}/#{s.expected}",
          Fmt.kops(s.throughput),
          s.lat.p50,
          s.lat.p99,
          s.lat.max
        ]
      end)

    """
    ### 4. #{title(4)}

    pool_size #{r.size}. Uncontended: one process, batches of 1,000 checkout+checkin (µs per pair; median, p99 and min over batches; the mean is the amortised cost, including the batches in which the process's garbage collection frees the dropped checkouts, whose resources and monitors are destroyed then). The loop runs twice: plain (the target's figure), and entering an empty `receive ... after 0` after each batch, which lets the process handle its pending signals; a large difference means signals piled up in a process that never receives. V2 includes the two `Port.connect` of its checkout/checkin.

    #{Fmt.table(["pool", "loop", "median µs", "mean µs (amortised)", "p99 µs (batch)", "min µs (batch)"], un)}
    With #{r.waiters} processes checking out and in at once (latency includes the wait for a worker):

    #{Fmt.table(["pool", "done", "pairs/s", "p50 µs", "p99 µs", "max µs"], co)}
    """
  end

  def section(5, r, _cfg) do
    rows =
      Enum.map(@pools, fn k ->
        s = r[k]

        [
          Impls.label(k),
          "#{s.ok}/#{s.n}",
          s.submitted_ms,
          s.total_ms,
          Fmt.kops(s.n / (s.total_ms / 1000)),
          s.out_of_order,
          s.max_overtaken
        ]
      end)

    """
    ### 5. #{title(5)}

    Each process is spawned once the previous one is blocked waiting for its reply (so arrival order is known) and sends one `stats` request, whose reply names the worker and how many requests it had served: the order of service on each worker. "Out of order" counts requests a worker served after one that arrived later (0 for FIFO service); "max overtaken" is by how many arrivals. Scheduler figures for this scenario are in the scheduler table below.

    #{Fmt.table(["pool", "served ok", "all queued after ms", "all served after ms", "req/s", "out of order", "max overtaken"], rows)}
    """
  end

  def section(6, r, _cfg) do
    seq = Map.new(r.sequential, &{&1.n, &1.start_ms})

    starts =
      Enum.map(r.starts, fn s ->
        [
          s.n,
          s.workers,
          s.start_ms,
          seq[s.n],
          s.rss_kib.median && s.rss_kib.median / 1024,
          s.rss_kib.max && s.rss_kib.max / 1024
        ]
      end)

    e = r.execute

    """
    ### 6. #{title(6)}

    `start_link(lazy: false)` returns once every worker answered a ping. RSS is VmRSS of each worker (`get_pool_status().worker_pids`) right after start-up. "One after another" is the V2/NimblePool init pattern (each worker started and pinged in turn), measured in the same run where enabled.

    #{Fmt.table(["workers", "ready", "NativePool ms to ready", "one after another ms", "RSS/worker MiB (median)", "RSS max MiB"], starts)}
    Predict on the dummy LM, pool_size #{e.pool_size}, #{e.concurrency} clients (one session each), closed loop: **#{Fmt.num(e.throughput)} executions/s**, p50 #{Fmt.num(e.lat.p50)} µs, p99 #{Fmt.num(e.lat.p99)} µs, errors #{e.errors}#{if e.first_error, do: " (first: `#{inspect(e.first_error)}`)", else: ""}, session restores #{e.restores}.
    """
  end

  def section(8, r, _cfg) do
    by = Map.new(r.rows, &{{&1.method, &1.n}, &1})
    ns = r.rows |> Enum.map(& &1.n) |> Enum.uniq() |> Enum.sort()
    mib = fn kib -> kib && kib / 1024 end
    sa = r.standalone

    starts =
      for n <- ns do
        s = by[{:spawn, n}]
        f = by[{:fork_server, n}]

        [
          n,
          s && s.start_ms,
          f && f.start_ms,
          s && f && Stats.ratio(s.start_ms, f.start_ms) |> Fmt.ratio()
        ]
      end

    mem =
      for method <- [:spawn, :fork_server], n <- ns, row = by[{method, n}], row do
        [
          method,
          n,
          mib.(row.pss_worker.median),
          sa && sa.rss && row.pss_worker.median && Fmt.pct(row.pss_worker.median / sa.rss),
          mib.(row.server_pss),
          mib.(row.pss_total),
          row.replace_ms && row.replace_ms.median,
          row.replace_ms && row.replace_ms.max
        ]
      end

    """
    ### 8. #{title(8)}

    One pool per row, `lazy: false`: "ready" is `start_link` returning once every worker answered a ping (for the fork server, its own start and DSPy import included). Replacement: a worker is SIGKILLed and the clock stops when the pool again has every worker ready (the replacement answered its start-up ping). PSS from `/proc/PID/smaps_rollup`; standalone DSPy process (a spawned worker of a 1-worker pool): RSS #{Fmt.num(sa && mib.(sa.rss))} MiB, PSS #{Fmt.num(sa && mib.(sa.pss))} MiB.

    #{Fmt.table(["workers", "spawn ms to ready", "fork_server ms to ready", "speed-up"], starts)}
    #{Fmt.table(["method", "workers", "PSS/worker MiB (median)", "PSS/worker vs standalone RSS", "fork server PSS MiB", "total PSS MiB", "replacement ms (median)", "replacement ms (max)"], mem)}
    """
  end

  def section(9, r, _cfg) do
    label = %{
      p2: "NativePool, protocol 2 (64/worker)",
      serial: "NativePool, `worker_concurrency: 1`",
      wide: "NativePool, protocol 2 (256/worker)",
      v2: "V2 pattern (one at a time)"
    }

    measured =
      Enum.map(r.rows, fn x ->
        [
          label[x.mode],
          x.n,
          x.wall_s,
          x.calls_per_s,
          x.lat_us.p50 / 1000,
          x.lat_us.p99 / 1000,
          x.peak_in_flight,
          x.worker_cpu_s,
          x.rss_kib / 1024,
          (x.pss_kib + x.fork_server_pss_kib) / 1024,
          x.errors
        ]
      end)

    # One-at-a-time paths at N beyond what was run: wall time grows linearly at the
    # throughput measured at the largest N that was run.
    extrapolated =
      for mode <- [:serial, :v2],
          rows = Enum.filter(r.rows, &(&1.mode == mode)),
          rows != [],
          last = Enum.max_by(rows, & &1.n),
          n <- r.ns,
          n > last.n do
        [
          "#{label[mode]} **(extrapolated)**",
          n,
          n / last.calls_per_s,
          last.calls_per_s,
          "–",
          "–",
          "–",
          "–",
          "–",
          "–",
          "–"
        ]
      end

    errs =
      for x <- r.rows,
          x.first_error,
          do: "- #{label[x.mode]}, N=#{x.n}: first error `#{inspect(x.first_error)}`\n"

    """
    ### 9. #{title(9)}

    Each of N sessions, all started at once, runs one `execute_program` of a Predict program it created beforehand (untimed; the V2 pattern, which has no session affinity, creates it in the same checkout, ~1 ms) whose LM call goes DSPy -> LiteLLM -> HTTP to `priv/python/lm_server.py` (#{r.latency_s} s a request, no jitter, DSPy's cache off, a fresh server per row), on #{r.pool_size} `dspy_bridge.py` workers, after a dropped warm-up row of #{4 * r.pool_size} sessions (a worker's first LM call imports LiteLLM); all three paths in the same run. Wall time: first session started to last reply; calls/s: sessions (= `execute_program` calls) per second of it; latency: one session's call. LM peak: the most requests the LM server had at once; worker CPU: utime + stime of the workers during the row. Memory right after the run: VmRSS summed over the workers, and PSS (smaps_rollup) summed over the workers plus the fork server for NativePool (shared pages counted once). Rows marked extrapolated were not run: N / the calls/s measured at the largest N that was (the one-at-a-time bound is N / #{r.pool_size} x #{r.latency_s} s).

    #{Fmt.table(["path", "sessions", "wall s", "calls/s", "p50 ms", "p99 ms", "LM peak at once", "worker CPU s", "RSS sum MiB", "PSS total MiB", "errors"], measured ++ extrapolated)}
    #{errs}
    """
  end

  def section(7, r, _cfg) do
    conv =
      Enum.map(r.conversion, fn c ->
        [c.label, c.bytes, c.encode.median, c.encode.max, c.decode.median, c.decode.max]
      end)

    echo =
      Enum.map(r.echo, fn e ->
        [
          e.label,
          e.port.median,
          e.native.median,
          Fmt.ratio(Stats.ratio(e.native.median, e.port.median)),
          e.native.max
        ]
      end)

    """
    ### 7. #{title(7)}

    The pool's conversion NIFs called from Elixir, µs: `json_encode` is the term -> JSON encoding of `execute`'s arguments (which `execute` starts on the calling scheduler and moves to a dirty scheduler past a size budget); `json_decode` is the JSON -> term conversion of replies (done on the pool's threads). How the helper NIFs are scheduled (normal or dirty scheduler) is part of these figures: for small payloads they mostly measure it.

    #{Fmt.table(["payload", "JSON bytes", "encode median", "encode max", "decode median", "decode max"], conv)}
    `echo` of the same payloads through the test worker (µs; both directions carry ~1 MiB; the bare Port converts JSON in the calling process with the baselines' codec, jiffy at this size):

    #{Fmt.table(["payload", "bare Port median", "NativePool median", "ratio", "NativePool max"], echo)}
    """
  end

  defp s1_placements(r), do: Enum.filter(Placement.all(), &Map.has_key?(r, &1))

  defp s2_matrix(sizes, cfg) do
    rows =
      Enum.map(sizes, fn %{size: size, cells: cells} ->
        [
          size
          | Enum.map(cfg.concurrency, fn c ->
              nat = cells[{:native, c}]
              {b, best} = best_baseline(cells, c)
              bp99 = cells[{b, c}].lat.p99

              "#{Fmt.ratio(Stats.ratio(nat.throughput, best))} (p99 #{Fmt.num(nat.lat.p99)} / #{Fmt.num(bp99)})"
            end)
        ]
      end)

    Fmt.table(["pool_size \\ clients" | Enum.map(cfg.concurrency, &to_string/1)], rows)
  end

  defp s1_table(p, %{skipped: why}), do: "#### #{Placement.label(p)}\n\nSkipped: #{why}\n"
  defp s1_table(p, %{failed: why}), do: "#### #{Placement.label(p)}\n\n**Failed:** #{why}\n"

  defp s1_table(p, r) do
    port = r.stats[:port]

    rows =
      Enum.map(Scenarios.s1_paths(), fn k ->
        s = r.stats[k]

        [
          Impls.label(k),
          s.median,
          s.p10,
          s.p99,
          s.mean,
          Fmt.ratio(Stats.ratio(s.median, port.median)),
          Fmt.ratio(r.round_ratios[k]),
          Fmt.ratio(Stats.ratio(s.p99, port.p99))
        ]
      end)

    raw =
      if r.raw,
        do: [
          [
            "raw Python parent (no BEAM)",
            r.raw["median_us"],
            "",
            r.raw["p99_us"],
            r.raw["mean_us"],
            Fmt.ratio(Stats.ratio(r.raw["median_us"], port.median)),
            "",
            Fmt.ratio(Stats.ratio(r.raw["p99_us"], port.p99))
          ]
        ],
        else: []

    hogs =
      case r[:hogs] do
        %{n: n, alive_at_end: alive} ->
          "\n#{n} hog processes (one per CPU) spun throughout#{if alive, do: "", else: " (**one ended before the pass did**)"}.\n"

        _ ->
          ""
      end

    """
    #### #{Placement.label(p)} (#{r.iters} calls per path; #{r.schedulers} schedulers online, #{r.cpus} CPUs available to the VM)
    #{hogs}
    #{Fmt.table(["path", "median µs", "p10 µs", "p99 µs", "mean µs", "median vs bare Port", "per-round ratio (median)", "p99 vs bare Port"], rows ++ raw)}
    """
  end

  def cargo(nil), do: ""
  def cargo(%{failed: why}), do: "### Framing (cargo bench)\n\n**Failed:** #{why}\n"

  def cargo(%{table: table, quick: quick}) do
    """
    ### Framing and JSON (cargo bench --bench framing#{if quick, do: " -- --quick", else: ""})

    Median ns per operation (`native/dspex_pool_core/benches/framing.rs`); `ref:` rows are serde_json alone.

    #{table}
    """
  end

  # ---- schedulers ---------------------------------------------------------------------------

  def schedulers(monitor, scenarios) when monitor == %{} do
    how = if scenarios == [], do: "not run (`--sched none`)", else: "no events"
    "### Scheduler responsiveness\n\nLong-schedule pass: #{how}.\n"
  end

  def schedulers(monitor, scenarios) do
    rows =
      monitor
      |> Enum.group_by(fn {phase, _} -> group(phase) end)
      |> Enum.sort()
      |> Enum.map(fn {g, phases} ->
        events = Enum.flat_map(phases, fn {_, p} -> p.long end)
        worst = Enum.max_by(events, & &1.ms, fn -> nil end)
        late = phases |> Enum.map(fn {_, p} -> p.probe_max_late_us end) |> Enum.max()

        [
          g,
          length(events),
          if(worst, do: worst.ms, else: 0),
          if(worst, do: "`#{worst.who}` in #{loc(worst.in)} out #{loc(worst.out)}", else: "–"),
          Fmt.num(late / 1000)
        ]
      end)

    lib =
      monitor
      |> Enum.flat_map(fn {phase, p} -> Enum.map(p.long, &{phase, &1}) end)
      |> Enum.filter(fn {_, e} -> library?(e.in) or library?(e.out) end)
      |> Enum.sort_by(fn {_, e} -> -e.ms end)
      |> Enum.take(10)
      |> Enum.map(fn {phase, e} -> [inspect(phase), e.ms, "`#{e.who}`", loc(e.in), loc(e.out)] end)

    lib_table =
      if lib == [],
        do: "No long_schedule event was in the library's code.\n",
        else:
          "Events in the library's code (worst 10):\n\n" <>
            Fmt.table(["phase", "ms", "process", "in", "out"], lib)

    """
    ### Scheduler responsiveness

    Measured in a pass of its own after the timed ones (no instrumentation runs during a timed pass): scenarios #{Enum.join(scenarios, ", ")} again with the `--quick` settings (scenario 1 in the normal placement only), their figures dropped. `:erlang.system_monitor(pid, long_schedule: 1)` (1 ms is its finest threshold), grouped by scenario and path; and the worst wake-up lateness of a `:high`-priority probe sleeping 1 ms in a loop (ms; under full load this includes the OS running Python on both cores).

    #{Fmt.table(["phase", "long_schedule events", "max ms", "worst event", "probe max late ms"], rows)}
    #{lib_table}
    """
  end

  defp group(phase) when is_tuple(phase) do
    case Tuple.to_list(phase) do
      [:s7, :echo, kind | _] -> "s7 echo #{kind}"
      [:s1, kind, placement] -> "s1 #{kind} (#{placement})"
      [s, kind | _] -> "#{s} #{kind}"
      [s] -> "#{s}"
    end
  end

  defp group(phase), do: "#{phase}"

  defp loc({m, f, a}), do: "`#{inspect(m)}.#{f}/#{a}`"
  defp loc(other), do: "`#{inspect(other)}`"

  @doc "Long-schedule events whose location is the library (its Elixir modules or its NIFs)."
  def library_events(monitor) do
    monitor
    |> Enum.flat_map(fn {_, p} -> p.long end)
    |> Enum.filter(fn e -> library?(e.in) or library?(e.out) end)
  end

  defp library?({m, _, _}) do
    name = Atom.to_string(m)

    String.starts_with?(name, "Elixir.DSPex.NativePool") or
      String.starts_with?(name, "Elixir.DSPex.PythonBridge")
  end

  defp library?(_), do: false

  # ---- targets ----------------------------------------------------------------------------

  def targets(results, monitor) do
    rows =
      Enum.reject(
        [t_ping(results[1])] ++
          List.wrap(t_best(results[2])) ++
          [t_ceiling(results[2]), t_checkout(results[4]), t_sched(monitor)] ++
          t_lm(results[9]),
        &is_nil/1
      )

    """
    ### Targets (2 cores, each figure against a baseline of the same run)

    #{Fmt.table(["target", "measured", "verdict"], rows)}
    """
  end

  defp t_lm(%{rows: rows}) do
    p2 = rows |> Enum.filter(&(&1.mode == :p2)) |> Enum.max_by(& &1.n, fn -> nil end)
    serial = rows |> Enum.filter(&(&1.mode == :serial)) |> Enum.max_by(& &1.n, fn -> nil end)

    if p2 do
      mem = fn x -> (x.pss_kib + x.fork_server_pss_kib) / 1024 end

      [
        [
          "#{p2.n} concurrent sessions at L = 0.5 s, 4 workers: <= 3 s (1,000 sessions)",
          "#{Fmt.num(p2.wall_s)} s, #{p2.errors} errors",
          ok(p2.n >= 1_000 and p2.wall_s <= 3 and p2.errors == 0)
        ]
      ] ++
        if serial do
          [
            [
              "memory with #{p2.n} sessions in flight: 4 workers' worth (less than 5 one-at-a-time workers)",
              "PSS #{Fmt.num(mem.(p2))} MiB vs #{Fmt.num(mem.(serial))} MiB one at a time " <>
                "(#{serial.n} sessions), #{Fmt.ratio(mem.(p2) / mem.(serial))}",
              ok(mem.(p2) < 1.25 * mem.(serial))
            ]
          ]
        else
          []
        end
    else
      []
    end
  end

  defp t_lm(_), do: []

  defp ok(true), do: "**met**"
  defp ok(false), do: "**missed**"

  defp t_ping(r) when is_map(r) do
    runs =
      for p <- s1_placements(r), match?(%{stats: _}, r[p]) do
        %{stats: s, round_ratios: rr} = r[p]
        {p, s, rr.native}
      end

    if runs == [] do
      nil
    else
      [
        "sequential ping <= 1.15x bare Port in every placement",
        Enum.map_join(runs, "; ", fn {p, s, ratio} ->
          "#{p}: #{Fmt.num(s.native.median)} µs vs #{Fmt.num(s.port.median)} µs, " <>
            "per-round ratio #{Fmt.ratio(ratio)}, p99 #{Fmt.num(s.native.p99)} vs #{Fmt.num(s.port.p99)} µs"
        end),
        Enum.map_join(runs, ", ", fn {p, _, ratio} -> "#{p} #{ok(ratio <= 1.15)}" end)
      ]
    end
  end

  defp t_ping(_), do: nil

  defp t_best(%{data: sizes}) when is_list(sizes) do
    cells =
      for %{size: size, cells: cells} <- sizes,
          {{:native, c}, nat} <- cells do
        {b, best} = best_baseline(cells, c)

        %{
          size: size,
          c: c,
          r: nat.throughput / best,
          b: b,
          p99: nat.lat.p99 / cells[{b, c}].lat.p99
        }
      end
      |> Enum.sort_by(&{&1.size, &1.c})

    single = Enum.filter(cells, &(&1.c == 1))
    low = Enum.filter(cells, &(&1.r < 0.95))
    # "Under load": more clients than workers.
    loaded = Enum.filter(cells, &(&1.c > &1.size))
    worse_p99 = Enum.filter(loaded, &(&1.p99 > 1.0))

    list = fn misses, field ->
      Enum.map_join(misses, ", ", fn m ->
        "size #{m.size} x #{m.c} clients #{Fmt.ratio(Map.fetch!(m, field))} of #{m.b}"
      end)
    end

    worst = fn cs, field ->
      case cs do
        [] -> "–"
        _ -> cs |> Enum.map(&Map.fetch!(&1, field)) |> Enum.min() |> Fmt.ratio()
      end
    end

    single_miss = Enum.filter(single, &(&1.r < 1.0))

    [
      [
        "single-client throughput >= best baseline at every pool size",
        "#{length(single) - length(single_miss)}/#{length(single)} sizes; worst #{worst.(single, :r)}" <>
          if(single_miss == [], do: "", else: "; below: " <> list.(single_miss, :r)),
        ok(single != [] and single_miss == [])
      ],
      [
        "no throughput cell below 0.95x the best baseline",
        "#{length(cells) - length(low)}/#{length(cells)} cells; worst #{worst.(cells, :r)}" <>
          if(low == [], do: "", else: "; below: " <> list.(low, :r)),
        ok(low == [])
      ],
      [
        "p99 under load (clients > workers) no worse than the best baseline's",
        "#{length(loaded) - length(worse_p99)}/#{length(loaded)} cells" <>
          if(worse_p99 == [], do: "", else: "; worse (p99 ratio): " <> list.(worse_p99, :p99)),
        ok(worse_p99 == [])
      ]
    ]
  end

  defp t_best(_), do: nil

  defp t_ceiling(%{data: sizes}) when is_list(sizes) do
    cells =
      for %{size: size, cells: cells, raw: raw} <- sizes do
        top = cells |> Map.keys() |> Enum.map(&elem(&1, 1)) |> Enum.max()
        raw32 = Enum.find_value(raw, &(&1["depth"] == 32 && &1["throughput"]))
        {size, top, Stats.ratio(cells[{:native, top}].throughput, raw32)}
      end

    measured =
      Enum.map_join(cells, ", ", fn {s, c, r} -> "size #{s} (#{c} clients): #{Fmt.pct(r)}" end)

    [
      "saturation >= 85% of raw-Python pipelined ceiling",
      measured,
      ok(Enum.all?(cells, fn {_, _, r} -> r && r >= 0.85 end))
    ]
  end

  defp t_ceiling(_), do: nil

  defp t_checkout(%{uncontended: u}) do
    n = u[{:native, :plain}]
    nr = u[{:native, :receive}]
    v2 = u[{:v2, :plain}]
    pb = u[{:poolboy, :plain}]

    [
      "checkout+checkin <= 2 µs uncontended",
      "plain loop: median #{Fmt.num(n.median)} µs, amortised mean #{Fmt.num(n.mean)} µs " <>
        "(V2 #{Fmt.num(v2.median)} / #{Fmt.num(v2.mean)}, poolboy #{Fmt.num(pb.median)} / #{Fmt.num(pb.mean)}); " <>
        "with a `receive` per 1,000: #{Fmt.num(nr.median)} / #{Fmt.num(nr.mean)} µs",
      "median #{ok(n.median <= 2.0)}, amortised #{ok(n.mean <= 2.0)}"
    ]
  end

  defp t_checkout(_), do: nil

  defp t_sched(monitor) when monitor == %{}, do: nil

  defp t_sched(monitor) do
    lib = library_events(monitor)
    max_ms = fn events -> events |> Enum.map(& &1.ms) |> Enum.max(fn -> 0 end) end

    # Same-run context: events while the baseline pools carried the same traffic (scenarios
    # 1-5), wherever they were. On an oversubscribed machine the OS preempting a scheduler
    # thread shows as long_schedule too, whatever code it was running.
    base =
      monitor
      |> Enum.filter(fn {phase, _} -> traffic?(phase, [:port, :v2, :v1, :poolboy]) end)
      |> Enum.flat_map(fn {_, p} -> p.long end)

    native =
      monitor
      |> Enum.filter(fn {phase, _} -> traffic?(phase, [:native]) end)
      |> Enum.flat_map(fn {_, p} -> p.long end)

    [
      "no scheduler blocked > 1 ms by this library",
      "#{length(lib)} long_schedule events located in the library (max #{max_ms.(lib)} ms). " <>
        "Scenarios 1-5, any location: #{length(native)} while NativePool ran (max #{max_ms.(native)} ms), " <>
        "#{length(base)} while the baselines ran (max #{max_ms.(base)} ms)",
      ok(lib == [])
    ]
  end

  defp traffic?(phase, kinds) when is_tuple(phase) do
    case Tuple.to_list(phase) do
      [s, kind | _] when s in [:s1, :s2, :s3, :s4, :s5] -> kind in kinds
      _ -> false
    end
  end

  defp traffic?(_, _), do: false

  defp best_baseline(cells, c) do
    @baselines
    |> Enum.map(&{&1, cells[{&1, c}].throughput})
    |> Enum.max_by(&elem(&1, 1))
  end

  defp errors(cells, c) do
    case Enum.map(@pools, &cells[{&1, c}].errors) |> Enum.sum() do
      0 ->
        "0"

      n ->
        "#{n}: " <>
          (Enum.find_value(@pools, &cells[{&1, c}].first_error)
           |> inspect()
           |> String.slice(0, 80))
    end
  end

  defp monitor_scenarios(cfg), do: cfg[:sched_scenarios] || []

  # ---- the whole report -------------------------------------------------------------------

  @doc "The codec calibration line."
  def codec(c) do
    "The baselines' codec (#{Codec.describe()}): a ping reply decodes in #{Fmt.num(c.decode)} µs " <>
      "(jiffy alone #{Fmt.num(c.decode_jiffy)} µs, the pure-Elixir codec #{Fmt.num(c.decode_pure)} µs), " <>
      "a ping request encodes in #{Fmt.num(c.encode)} µs (jiffy #{Fmt.num(c.encode_jiffy)} µs); " <>
      "wall time in this run, median of 5 x 20,000. Jason, which DSPex used, takes ~0.55 µs and ~0.7 µs on a quiet machine of this kind."
  end

  def render(cfg, info, results, monitor, cargo, elapsed_s, calibration) do
    notes =
      case File.read("bench/NOTES.md") do
        {:ok, text} -> "\n## Analysis (bench/NOTES.md, written by hand)\n\n" <> text
        _ -> ""
      end

    sections =
      results
      |> Enum.sort()
      |> Enum.map_join("\n", fn {n, r} -> section_with_cpu(n, r, cfg) end)

    """
    # dspex_native_pool benchmark results

    Generated by `mix dspex_native_pool.bench#{if cfg.quick, do: " --quick", else: ""}` on #{info.date} in #{:erlang.float_to_binary(elapsed_s, decimals: 0)} s.

    | | |
    |---|---|
    | CPUs | #{info.cpus} (#{info.cpu_model}), #{info.schedulers} schedulers online |
    | OTP / Elixir | #{info.otp} / #{info.elixir} |
    | Python | #{info.python} (`#{info.python_path}`), orjson #{info.orjson || "absent"} |
    | Rust | #{info.rustc} |
    | Kernel | #{info.kernel} |
    | Commit | #{info.commit}#{if info.dirty, do: " (working tree has uncommitted changes)", else: ""} |
    | Worker | `test/support/test_worker.py` for scenarios 1-5 and 7, for every path |

    Paths: **NativePool** (this library); **bare Port** (a Port owned by the caller: the floor on the BEAM); **V2** (SessionPoolV2 + PoolWorkerV2 on a NimblePool-equivalent pool process that hands the Port to the caller, with the connect-back fix of CONTRACT §6.5); **V1** (SessionPool V1: every call is a `GenServer.call` to one manager that checks out and waits for the reply itself); **poolboy** (Debian's erlang-poolboy, GenServer workers each owning a Port); **raw Python** (`bench/raw_floor.py`: a Python parent doing framed JSON round trips to the same worker script over pipes, no BEAM). Baselines (bare Port included) encode and decode JSON in the calling process, on a normal scheduler, as DSPex did with Jason, with a codec at least as fast (`bench/codec.ex`). #{codec(calibration)}

    Method: no instrumentation runs during a timed pass (long schedules are measured in a pass of their own, see "Scheduler responsiveness"); the paths of a scenario run interleaved, the order rotating from round to round; scenario 1 runs in #{length(cfg.placements)} placements (#{Enum.map_join(cfg.placements, "; ", &"#{&1}: #{Placement.label(&1)}")}).

    #{targets(results, monitor)}
    ## Scenarios

    #{sections}
    #{schedulers(monitor, monitor_scenarios(cfg))}
    #{cargo(cargo)}
    #{notes}
    """
  end
end
