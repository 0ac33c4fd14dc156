defmodule DSPexBench.Scenarios do
  @moduledoc false
  # The scenarios of the benchmark issue. Each takes the run configuration and returns a map
  # of results (raw numbers, formatted later by DSPexBench.Report). Every pool and process a
  # scenario starts is stopped before it returns, also on failure.

  alias DSPex.NativePool.Native
  alias DSPex.PythonBridge.NativePool
  alias DSPexBench.{BarePort, Env, Impls, Load, Monitor, Stats}

  @pools [:native, :v2, :v1, :poolboy]

  # ---- 1. sequential ping latency -----------------------------------------------------

  @s1_paths [:port, :native, :v2, :poolboy]
  def s1_paths, do: @s1_paths

  # One pass per placement (cfg.placements), see DSPexBench.Placement: the OS placing threads
  # and processes as it likes (:normal); the whole VM pinned to one CPU before it starts, one
  # scheduler (:pinned, in a child VM); every CPU kept busy by hog processes (:busy). On a VM
  # a wake-up across CPUs costs tens of µs and flips with placement; a busy server is the
  # case that matters.
  def s1_sequential(cfg) do
    Map.new(cfg.placements, fn placement ->
      log("  placement #{placement}")
      {placement, DSPexBench.Placement.run(placement, cfg, 1, &s1_run(&1, placement))}
    end)
  end

  @doc "The pass a child VM runs for a placement (see DSPexBench.Placement)."
  def placement_pass(1), do: &s1_run/2

  @doc false
  def s1_run(cfg, placement) do
    raw =
      if cfg.monitored,
        do: %{},
        else: raw_floor(cfg, workers: [], seq_iters: cfg.s1_iters)

    port = BarePort.open(cfg.python, cfg.script)
    pools = @s1_paths -- [:port]
    handles = Map.new(pools, &{&1, Impls.start(&1, 1, cfg.python, cfg.script)})

    try do
      callers =
        [{:port, fn -> BarePort.call(port, "ping", %{}) end}] ++
          Enum.map(pools, fn k -> {k, fn -> Impls.call(handles[k], "ping", %{}) end} end)

      # Warm every path, then interleave rounds (the order rotating from round to round) so
      # drift and neighbours hit all of them alike.
      Enum.each(callers, fn {_, f} -> Enum.each(1..cfg.s1_warmup, fn _ -> f.() end) end)
      rounds = cfg.s1_rounds
      per_round = div(cfg.s1_iters, rounds)

      by_round =
        for round <- 1..rounds do
          callers
          |> rotate(round)
          |> Map.new(fn {k, f} ->
            Monitor.phase({:s1, k, placement})
            {k, time_each(f, per_round)}
          end)
        end

      stats =
        Map.new(callers, fn {k, _} ->
          {k, Stats.summarize(Enum.flat_map(by_round, & &1[k]))}
        end)

      # Each round's median against the bare Port's in the same round, then the median over
      # rounds: robust to the placement of threads changing during the run.
      round_ratios =
        Map.new(callers, fn {k, _} ->
          {k,
           by_round
           |> Enum.map(fn r -> Stats.median(r[k]) / Stats.median(r[:port]) end)
           |> Stats.median()}
        end)

      %{
        stats: stats,
        round_ratios: round_ratios,
        raw: raw[:sequential],
        iters: per_round * rounds,
        schedulers: System.schedulers_online(),
        cpus: :erlang.system_info(:logical_processors_available)
      }
    after
      BarePort.close(port)
      Enum.each(handles, fn {_, h} -> Impls.stop(h) end)
    end
  end

  @doc "`list` rotated left by `n` places: interleaved passes change who goes first."
  def rotate(list, n) do
    k = rem(n, max(length(list), 1))
    Enum.drop(list, k) ++ Enum.take(list, k)
  end

  defp time_each(f, n) do
    Enum.map(1..n, fn _ ->
      t0 = Stats.now()
      {:ok, _} = f.()
      Stats.native_to_us(Stats.now() - t0)
    end)
  end

  # ---- 2. throughput matrix ------------------------------------------------------------

  def s2_throughput(cfg) do
    for size <- cfg.sizes do
      # Each size takes a while: wait for the neighbours again (see Runner).
      if cfg.wait_quiet > 0, do: Env.wait_quiet(min(cfg.wait_quiet, 120))
      log("  pool_size #{size}: starting pools")
      c0 = Env.cpu_snapshot()
      w0 = System.monotonic_time(:millisecond)
      handles = Map.new(@pools, &{&1, Impls.start(&1, size, cfg.python, cfg.script)})

      try do
        # Repetitions interleave the pools (the order rotating), so drift and neighbours'
        # noise spread over all of them; a cell's throughput is the median of its repetitions.
        cells =
          for conc <- cfg.concurrency,
              rep <- 1..cfg.s2_reps,
              kind <- rotate(@pools, rep + conc) do
            Monitor.phase({:s2, kind, size, conc})
            h = handles[kind]

            r =
              Load.run(
                fn -> fn -> Impls.call(h, "ping", %{}) end end,
                conc,
                cfg.s2_ms,
                cfg.s2_warmup_ms
              )

            {{kind, conc}, rep, r}
          end
          |> Enum.group_by(&elem(&1, 0), &elem(&1, 2))
          |> Map.new(fn {key, reps} -> {key, Load.merge(reps)} end)

        Monitor.phase({:s2, :raw, size})

        raw =
          if cfg.monitored,
            do: %{pipelined: []},
            else: raw_floor(cfg, workers: [size], skip_sequential: true, duration: cfg.s2_ms)

        cpu = Env.cpu_foreign(c0, Env.cpu_snapshot(), System.monotonic_time(:millisecond) - w0)
        log("  pool_size #{size}: done")
        %{size: size, cells: cells, raw: raw[:pipelined], cpu: cpu}
      after
        Enum.each(handles, fn {_, h} -> Impls.stop(h) end)
      end
    end
  end

  # ---- 3. 32 x sleep 50 ms, concurrency 32, pool_size 8 --------------------------------

  def s3_sleep(cfg) do
    handles = Map.new(@pools, &{&1, Impls.start(&1, 8, cfg.python, cfg.script)})

    try do
      # Repetitions interleave the pools, the order rotating.
      runs =
        for rep <- 1..cfg.s3_reps, kind <- rotate(@pools, rep) do
          Monitor.phase({:s3, kind})
          {kind, sleep_run(handles[kind])}
        end

      runs
      |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))
      |> Map.new(fn {kind, runs} ->
        wall = Stats.median(Enum.map(runs, & &1.wall_ms))
        {kind, %{wall_ms: wall, lat: Stats.summarize(Enum.flat_map(runs, & &1.lats))}}
      end)
    after
      Enum.each(handles, fn {_, h} -> Impls.stop(h) end)
    end
  end

  defp sleep_run(h) do
    t0 = Stats.now()

    lats =
      1..32
      |> Enum.map(fn _ ->
        Task.async(fn ->
          t = Stats.now()
          {:ok, _} = Impls.call(h, "sleep", %{ms: 50})
          Stats.native_to_us(Stats.now() - t) / 1000
        end)
      end)
      |> Task.await_many(60_000)

    %{wall_ms: Stats.native_to_us(Stats.now() - t0) / 1000, lats: lats}
  end

  # ---- 4. checkout + checkin -----------------------------------------------------------

  @checkout_kinds [:native, :v2, :poolboy]

  def s4_checkout(cfg) do
    size = 2

    handles = Map.new(@checkout_kinds, &{&1, Impls.start(&1, size, cfg.python, cfg.script)})

    try do
      # Twice: a plain loop, and the same loop entering `receive` (with nothing to receive)
      # after each batch. A process that never receives does not handle its incoming signals
      # (such as those of monitors being removed), and a backlog of them makes every garbage
      # collection of that process slower.
      # Batches of the pools interleave, the order rotating from batch to batch.
      batch = 1_000

      Enum.each(handles, fn {_, h} ->
        Enum.each(1..batch, fn _ -> Impls.checkout_checkin(h) end)
      end)

      uncontended =
        for variant <- [:plain, :receive],
            round <- 1..div(cfg.s4_ops, batch),
            kind <- rotate(@checkout_kinds, round) do
          Monitor.phase({:s4, kind, :uncontended})
          {{kind, variant}, checkout_batch(handles[kind], batch, variant)}
        end
        |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))
        |> Map.new(fn {key, per_op} -> {key, Stats.summarize(per_op)} end)

      contended =
        for kind <- @checkout_kinds, into: %{} do
          Monitor.phase({:s4, kind, :contended})
          {kind, contended_checkouts(handles[kind], cfg.s4_waiters, cfg.s4_each)}
        end

      %{size: size, uncontended: uncontended, contended: contended, waiters: cfg.s4_waiters}
    after
      Enum.each(handles, fn {_, h} -> Impls.stop(h) end)
    end
  end

  # µs per checkout+checkin over a batch of `batch` pairs.
  defp checkout_batch(h, batch, variant) do
    t0 = Stats.now()
    for _ <- 1..batch, do: Impls.checkout_checkin(h)
    us = Stats.native_to_us(Stats.now() - t0) / batch

    if variant == :receive do
      receive do
        :dspex_bench_never -> :ok
      after
        0 -> :ok
      end
    end

    us
  end

  # `waiters` processes each do `each` checkout+checkin back to back, all at once.
  defp contended_checkouts(h, waiters, each) do
    parent = self()

    pids =
      for _ <- 1..waiters do
        spawn(fn ->
          receive do
            :go -> :ok
          end

          lats =
            for _ <- 1..each do
              t0 = Stats.now()
              Impls.checkout_checkin(h)
              Stats.now() - t0
            end

          send(parent, {:done, self(), lats})
        end)
      end

    t0 = Stats.now()
    Enum.each(pids, &send(&1, :go))

    lats =
      Enum.flat_map(pids, fn pid ->
        receive do
          {:done, ^pid, lats} -> lats
        after
          120_000 ->
            Process.exit(pid, :kill)
            []
        end
      end)

    elapsed_s = Stats.native_to_us(Stats.now() - t0) / 1_000_000

    %{
      ops: length(lats),
      expected: waiters * each,
      throughput: length(lats) / elapsed_s,
      lat: Stats.summarize(Enum.map(lats, &Stats.native_to_us/1))
    }
  end

  # ---- 5. 10,000 processes queued on a pool of 2 ----------------------------------------

  def s5_queue(cfg) do
    for kind <- @pools, into: %{} do
      h = Impls.start(kind, 2, cfg.python, cfg.script)

      try do
        Monitor.phase({:s5, kind})
        {kind, queue_run(h, cfg.s5_procs)}
      after
        Impls.stop(h)
      end
    end
  end

  defp queue_run(h, n) do
    parent = self()
    t0 = Stats.now()

    # Each process is spawned once the previous one waits in its `receive` (its request is
    # queued), so arrival order is 1..n. The worker's `stats` reply says which worker served
    # the request and how many requests that worker had served before: the order of service
    # on each worker, free of how the BEAM later schedules the callers.
    for i <- 1..n do
      pid =
        spawn(fn ->
          served =
            case Impls.call(h, "stats", %{}) do
              {:ok, %{"pid" => os_pid, "calls" => calls}} -> {os_pid, calls}
              _ -> :error
            end

          send(parent, {:served, i, served})
        end)

      wait_queued(pid, 1_000_000)
    end

    submitted_ms = Stats.native_to_us(Stats.now() - t0) / 1000
    served = collect_served(n, %{}, Stats.now() + System.convert_time_unit(120, :second, :native))
    total_ms = Stats.native_to_us(Stats.now() - t0) / 1000

    ok = Enum.count(served, fn {_, s} -> s != :error end)

    # Per worker, arrival ranks in service order: FIFO service makes each sequence increasing.
    # A descent is a request served after one that arrived later; its depth is by how many
    # arrivals it was overtaken.
    descents =
      served
      |> Enum.reject(fn {_, s} -> s == :error end)
      |> Enum.group_by(fn {_, {os_pid, _}} -> os_pid end, fn {i, {_, calls}} -> {calls, i} end)
      |> Enum.flat_map(fn {_, seq} ->
        seq
        |> Enum.sort()
        |> Enum.map(&elem(&1, 1))
        |> Enum.scan({0, 0}, fn i, {max_seen, _} -> {max(max_seen, i), max_seen - i} end)
        |> Enum.map(&elem(&1, 1))
        |> Enum.filter(&(&1 > 0))
      end)

    %{
      n: n,
      served: map_size(served),
      ok: ok,
      submitted_ms: submitted_ms,
      total_ms: total_ms,
      out_of_order: length(descents),
      max_overtaken: Enum.max(descents, fn -> 0 end)
    }
  end

  defp wait_queued(_pid, 0), do: :gave_up

  defp wait_queued(pid, tries) do
    case Process.info(pid, :status) do
      {:status, :waiting} ->
        :ok

      nil ->
        :ok

      _ ->
        :erlang.yield()
        wait_queued(pid, tries - 1)
    end
  end

  defp collect_served(n, acc, _deadline) when map_size(acc) == n, do: acc

  defp collect_served(n, acc, deadline) do
    wait = max(0, System.convert_time_unit(deadline - Stats.now(), :native, :millisecond))

    receive do
      {:served, i, served} -> collect_served(n, Map.put(acc, i, served), deadline)
    after
      wait -> acc
    end
  end

  # ---- 6. DSPy ------------------------------------------------------------------------------

  @signature %{
    inputs: [%{name: "question", description: "a question"}],
    outputs: [%{name: "answer", description: "the answer"}]
  }

  def s6_dspy(cfg) do
    python = Env.dspy_python()

    with {:python, p} when is_binary(p) <- {:python, python},
         :ok <- dspy_probe(p) do
      starts =
        for n <- cfg.dspy_ns do
          Monitor.phase({:s6, :start, n})
          log("  starting #{n} DSPy workers")
          t0 = Stats.now()
          h = Impls.start(:native, n, p, Env.dspy_script(), start_timeout: 180_000)
          start_ms = Stats.native_to_us(Stats.now() - t0) / 1000

          try do
            {:native, name, _} = h
            pids = NativePool.get_pool_status(pool: name).worker_pids
            rss = pids |> Enum.map(&Env.rss_kib/1) |> Enum.reject(&is_nil/1)
            %{n: n, start_ms: start_ms, rss_kib: Stats.summarize(rss), workers: length(pids)}
          after
            Impls.stop(h)
          end
        end

      sequential =
        for n <- cfg.dspy_seq_ns do
          Monitor.phase({:s6, :sequential_start, n})
          log("  starting #{n} DSPy workers one after another (V2 pattern)")
          t0 = Stats.now()

          {:ok, pool} =
            DSPexBench.V2Pool.start_link(size: n, python: p, script: Env.dspy_script())

          ms = Stats.native_to_us(Stats.now() - t0) / 1000
          DSPexBench.V2Pool.stop(pool)
          %{n: n, start_ms: ms}
        end

      execs = dspy_execute(cfg, p)
      %{starts: starts, sequential: sequential, execute: execs}
    else
      {:python, nil} -> %{skipped: "no Python with dspy (priv/python/.venv or /tmp/probe-venv)"}
      {:error, why} -> %{skipped: why}
    end
  end

  defp dspy_probe(python) do
    h = Impls.start(:native, 1, python, Env.dspy_script(), start_timeout: 180_000)
    {:native, name, _} = h
    opts = [pool: name, timeout: 60_000]

    try do
      with {:ok, _} <- NativePool.execute_anonymous(:configure_lm, %{provider: "dummy"}, opts),
           {:ok, _} <-
             NativePool.execute_in_session(
               "probe",
               :create_program,
               %{id: "p", signature: @signature, program_type: "predict"},
               opts
             ),
           {:ok, _} <-
             NativePool.execute_in_session(
               "probe",
               :execute_program,
               %{program_id: "p", inputs: %{question: "ping?"}},
               opts
             ) do
        :ok
      else
        {:error, reason} -> {:error, "dspy_bridge.py failed the probe: #{inspect(reason)}"}
      end
    rescue
      e -> {:error, "dspy_bridge.py failed the probe: #{Exception.message(e)}"}
    after
      Impls.stop(h)
    end
  end

  defp dspy_execute(cfg, python) do
    size = cfg.dspy_exec_size
    h = Impls.start(:native, size, python, Env.dspy_script(), start_timeout: 180_000)
    {:native, name, _} = h
    opts = [pool: name, timeout: 60_000]

    try do
      {:ok, _} = NativePool.execute_anonymous(:configure_lm, %{provider: "dummy"}, opts)
      Monitor.phase({:s6, :execute})

      make_call = fn ->
        sid = "bench_#{System.unique_integer([:positive])}"

        {:ok, _} =
          NativePool.execute_in_session(
            sid,
            :create_program,
            %{id: "p", signature: @signature, program_type: "predict"},
            opts
          )

        fn ->
          n = Process.get(:n, 0) + 1
          Process.put(:n, n)

          NativePool.execute_in_session(
            sid,
            :execute_program,
            %{program_id: "p", inputs: %{question: "question #{n}"}},
            opts
          )
        end
      end

      r = Load.run(make_call, 16, cfg.dspy_exec_ms, 500)
      status = NativePool.get_pool_status(pool: name)

      r
      |> Map.delete(:samples)
      |> Map.merge(%{pool_size: size, concurrency: 16, restores: status.counters.restores})
    after
      Impls.stop(h)
    end
  end

  # ---- 8. start methods: fork server vs spawn (issue 11) -------------------------------------

  # For each start method, in the same run: time until n DSPy workers are ready (one pool per
  # n, the fork server's own start included), time from a SIGKILLed worker to its replacement
  # answering, and memory: PSS (smaps_rollup) per worker, the pool's total with the fork
  # server, against one standalone DSPy process (a spawned worker of a 1-worker pool).
  def s8_start_method(cfg) do
    case Env.dspy_python() do
      nil ->
        %{skipped: "no Python with dspy (priv/python/.venv or /tmp/probe-venv)"}

      python ->
        rows =
          for method <- [:spawn, :fork_server], n <- cfg.dspy_ns do
            s8_start(cfg, python, method, n)
          end

        standalone = Enum.find(rows, &(&1.method == :spawn and &1.n == 1))
        %{rows: rows, standalone: standalone && hd(standalone.workers_mem)}
    end
  end

  defp s8_start(cfg, python, method, n) do
    Monitor.phase({:s8, method, n})
    log("  #{method}: starting #{n} DSPy workers")
    t0 = Stats.now()

    h =
      Impls.start(:native, n, python, Env.dspy_script(),
        start_timeout: 180_000,
        start_method: method
      )

    start_ms = Stats.native_to_us(Stats.now() - t0) / 1000
    {:native, name, _} = h

    try do
      pids = NativePool.get_pool_status(pool: name).worker_pids
      mem = Enum.map(pids, &%{pss: Env.pss_kib(&1), rss: Env.rss_kib(&1)})
      server = pids |> hd() |> Env.ppid()
      server_pss = if method == :fork_server, do: Env.pss_kib(server), else: 0

      replace =
        if n == Enum.max(cfg.dspy_ns) or n == 4,
          do: for(_ <- 1..cfg.s8_kills, do: s8_replace(name, n)),
          else: []

      %{
        method: method,
        n: n,
        start_ms: start_ms,
        workers_mem: mem,
        pss_worker: Stats.summarize(Enum.map(mem, & &1.pss)),
        pss_total: Enum.sum(Enum.map(mem, & &1.pss)) + server_pss,
        server_pss: server_pss,
        replace_ms: if(replace == [], do: nil, else: Stats.summarize(replace))
      }
    after
      Impls.stop(h)
    end
  end

  # SIGKILL one worker; ms until the pool has a replacement that answered its ping.
  defp s8_replace(name, n) do
    [victim | _] = NativePool.get_pool_status(pool: name).worker_pids
    t0 = Stats.now()
    System.cmd("kill", ["-9", Integer.to_string(victim)])
    wait_replaced(name, n, victim)
    ms = Stats.native_to_us(Stats.now() - t0) / 1000
    {:ok, _} = NativePool.execute_anonymous(:ping, %{}, pool: name)
    ms
  end

  defp wait_replaced(name, n, victim) do
    st = NativePool.get_pool_status(pool: name)

    if st.ready == n and victim not in st.worker_pids do
      :ok
    else
      Process.sleep(1)
      wait_replaced(name, n, victim)
    end
  end

  # ---- 7. conversion and 1 MiB payloads (extra) --------------------------------------------

  def s7_payload(cfg) do
    small = %{"question" => "What is the capital of France?", "session_id" => "s1"}
    big = %{"data" => String.duplicate("x", 1_048_576)}

    big_objects = %{
      "items" =>
        for(
          i <- 1..17_500,
          do: %{"i" => i, "name" => "item #{i}", "score" => 0.5, "tags" => ["a", "b"]}
        )
    }

    Monitor.phase({:s7, :conversion})

    conversion =
      for {label, term} <- [small: small, "1MiB string": big, "1MiB objects": big_objects] do
        {:ok, json} = Native.json_encode(term)
        n = if label == :small, do: 2_000, else: cfg.s7_big_iters
        enc = Stats.summarize(time_n(fn -> Native.json_encode(term) end, n))
        dec = Stats.summarize(time_n(fn -> Native.json_decode(json) end, n))
        %{label: to_string(label), bytes: byte_size(json), encode: enc, decode: dec}
      end

    port = BarePort.open(cfg.python, cfg.script)
    h = Impls.start(:native, 1, cfg.python, cfg.script)

    try do
      echo =
        for {label, args} <- [{"1MiB string", big}, {"1MiB objects", big_objects}] do
          Monitor.phase({:s7, :echo, :port, label})

          p =
            Stats.summarize(time_n(fn -> BarePort.call(port, "echo", args) end, cfg.s7_big_iters))

          Monitor.phase({:s7, :echo, :native, label})
          nat = Stats.summarize(time_n(fn -> Impls.call(h, "echo", args) end, cfg.s7_big_iters))
          %{label: label, port: p, native: nat}
        end

      %{conversion: conversion, echo: echo}
    after
      BarePort.close(port)
      Impls.stop(h)
    end
  end

  # One warm-up call, then `n` timed ones.
  defp time_n(f, n) do
    f.()
    time_each(f, n)
  end

  # ---- raw Python floor -------------------------------------------------------------------

  @doc false
  def raw_floor(cfg, opts) do
    workers = Keyword.get(opts, :workers, [])
    duration_s = Keyword.get(opts, :duration, 1_000) / 1000

    args =
      [
        Env.raw_floor(),
        "--python",
        cfg.python,
        "--script",
        cfg.script,
        "--workers",
        Enum.join(workers, ","),
        "--seq-iters",
        to_string(Keyword.get(opts, :seq_iters, 1_000)),
        "--duration",
        to_string(duration_s),
        "--warmup",
        to_string(cfg.s2_warmup_ms / 1000),
        "--depths",
        "1,32"
      ] ++ if(opts[:skip_sequential], do: ["--skip-sequential"], else: [])

    case System.cmd(cfg.python, args, stderr_to_stdout: false) do
      {out, 0} ->
        {:ok, decoded} = out |> String.trim() |> DSPexBench.JSON.decode()

        %{
          sequential: decoded["sequential"],
          sequential_one_cpu: decoded["sequential_one_cpu"],
          pipelined: decoded["pipelined"] || []
        }

      {out, status} ->
        log("raw_floor.py failed (#{status}): #{out}")
        %{sequential: nil, sequential_one_cpu: nil, pipelined: []}
    end
  end

  def log(msg), do: IO.puts(msg)
end
