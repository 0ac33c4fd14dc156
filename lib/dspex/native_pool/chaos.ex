defmodule DSPex.NativePool.Chaos do
  @moduledoc false
  # The reliability suite behind `mix dspex_native_pool.chaos` and its short ExUnit version
  # (test/dspex/chaos_test.exs). It lives in lib/ (not bench/) because both callers need it
  # compiled: the test suite cannot see bench/, and `mix compile --warnings-as-errors` and
  # `mix format` then check it like the rest of the code.
  #
  # Chaos mode: `:callers` processes call one pool (mixed work, every reply checked against a
  # nonce) while its workers are SIGKILLed every `:kill_every` ms, SIGSTOPped for `:stop_ms`
  # (then SIGCONTed) and callers are killed while they hold a checkout. Soak mode: the same
  # callers, no chaos, `:calls` calls, resources sampled every `:sample_every` calls.
  #
  # Only the public API of DSPex.PythonBridge.NativePool is used. Signals go to a process only
  # after /proc says it is a child of this pool's fork-server helper. Orphans are found by an
  # environment variable every worker (and whatever it starts) inherits: DSPEX_CHAOS_RUN.

  alias DSPex.PythonBridge.NativePool

  @defaults [
    script: nil,
    python: nil,
    start_method: nil,
    protocol: 1,
    pool_size: 4,
    callers: 200,
    sessions: 8,
    duration_ms: 45_000,
    kill_every: 200,
    stop_ms: 3_000,
    stops: 4,
    caller_kill_every: 150,
    misbehave: true,
    pool_timeout: 3_000,
    timeout: 1_500,
    patient_timeout: 5_000,
    soak: false,
    calls: 1_000_000,
    sample_every: 100_000,
    seed: nil
  ]

  # Must-be-0 checks: {key, label}.
  @must_be_zero [
    wrong: "wrong replies",
    session_lost: "session state lost (Program not found)",
    hung: "callers hung past their timeout + 1 s",
    raised: "API calls that raised or exited",
    checkout_failed_startable: "{:checkout_failed, _} while workers can start",
    undocumented: "error reasons the moduledoc does not list",
    pool_exits: "pool supervisor exits during the run",
    status_inconsistent: "status vs OS inconsistencies after settling",
    open_leases: "open leases after settling",
    zombies: "zombies",
    strays: "stray Python processes while running (not a live worker's)",
    orphans: "orphans after stop",
    helper_left: "fork-server helper left after stop",
    fd_growth: "BEAM fd growth (after stop vs before start)"
  ]

  @doc "Runs the suite; returns a report map (see `format/1` and `failures/1`)."
  def run(opts) do
    opts = Keyword.merge(@defaults, opts)
    unless opts[:script], do: raise(ArgumentError, "the :script option is required, got: nil")

    task = Task.async(fn -> orchestrate(Map.new(opts)) end)
    Task.await(task, :infinity)
  end

  @doc "The must-be-0 checks that are not 0, as `[{label, value}]`."
  def failures(report) do
    for {key, label} <- @must_be_zero, (v = report.checks[key]) != 0, do: {label, v}
  end

  # ---- the orchestrator ---------------------------------------------------------------

  defp orchestrate(opts) do
    Process.flag(:trap_exit, true)
    seed = opts.seed || :erlang.phash2(make_ref())
    :rand.seed(:exsss, {seed, 1, 2})
    run_id = "chaos-#{System.os_time(:millisecond)}-#{System.unique_integer([:positive])}"
    sh = open_signal_port()

    # A first pool in this VM creates the shared runtime (its epoll, timer and signal fds):
    # warm it up so the fd baseline is the steady state.
    warm_up(opts)
    fds_before = stable_fd_count()
    beam_pid = String.to_integer(System.pid())

    name = :"chaos_pool_#{System.unique_integer([:positive])}"
    pool_opts = pool_opts(opts, name, run_id)
    {:ok, sup} = NativePool.start_link(pool_opts)

    ctx = %{
      opts: opts,
      owner: self(),
      pool: [pool: name],
      run_id: run_id,
      sh: sh,
      beam: beam_pid,
      sup: sup,
      counts: :ets.new(:chaos_counts, [:public, :set, write_concurrency: true]),
      inflight: :ets.new(:chaos_inflight, [:public, :set, write_concurrency: true]),
      holding: :ets.new(:chaos_holding, [:public, :set, write_concurrency: true]),
      seen: :ets.new(:chaos_seen, [:public, :set, write_concurrency: true]),
      samples: [],
      stop: :atomics.new(2, []),
      sessions: for(i <- 1..opts.sessions, do: "chaos-session-#{i}"),
      seed: seed
    }

    setup_sessions(ctx)
    helper = helper_pid(ctx)
    started = System.monotonic_time(:millisecond)

    ctx =
      if opts.soak do
        soak(ctx)
      else
        chaos(ctx)
      end

    elapsed = System.monotonic_time(:millisecond) - started
    drained = drain_pool_exits(ctx)
    settle = settle(ctx, helper)
    status = NativePool.get_pool_status(ctx.pool)
    worker_pids_seen = seen(ctx, :worker)
    Supervisor.stop(sup, :normal, :infinity)
    after_stop = after_stop(ctx, helper, worker_pids_seen)
    :ets.delete(ctx.inflight)
    fds_after = wait_fds(fds_before)
    Port.close(sh)

    counts = Map.new(:ets.tab2list(ctx.counts))

    checks = %{
      wrong: counts[:wrong] || 0,
      session_lost: counts[:session_lost] || 0,
      hung: (counts[:hung] || 0) + (counts[:never_returned] || 0),
      raised: counts[:raised] || 0,
      checkout_failed_startable: counts[:checkout_failed_startable] || 0,
      undocumented: counts[:other] || 0,
      pool_exits: (counts[:pool_exits] || 0) + drained,
      status_inconsistent: length(settle.problems),
      open_leases: settle.open_leases,
      zombies: settle.zombies + after_stop.zombies,
      strays: length(settle.strays),
      orphans: length(after_stop.orphans),
      helper_left: if(after_stop.helper_alive, do: 1, else: 0),
      # Fewer descriptors after than before is no leak (a lazily opened one was closed).
      fd_growth: max(fds_after - fds_before, 0)
    }

    %{
      mode: if(opts.soak, do: :soak, else: :chaos),
      opts: opts,
      seed: seed,
      elapsed_ms: elapsed,
      counts: counts,
      checks: checks,
      fds: {fds_before, fds_after},
      settle: settle,
      after_stop: after_stop,
      status: Map.drop(status, [:sessions]),
      samples: Enum.reverse(ctx.samples),
      examples: examples(ctx)
    }
  end

  defp pool_opts(opts, name, run_id) do
    env = [{"DSPEX_CHAOS_RUN", run_id}, {"TEST_WORKER_PROTOCOL", to_string(opts.protocol)}]

    [
      name: name,
      pool_size: opts.pool_size,
      lazy: false,
      script: opts.script,
      shutdown_grace: 500,
      env: env,
      worker_args: ["--chaos-run", run_id],
      checkout_timeout: opts.pool_timeout,
      operation_timeout: opts.timeout
    ]
    |> put_if(:python, opts.python)
    |> put_if(:start_method, opts.start_method)
  end

  defp put_if(kw, _key, nil), do: kw
  defp put_if(kw, key, value), do: Keyword.put(kw, key, value)

  defp warm_up(opts) do
    name = :"chaos_warm_#{System.unique_integer([:positive])}"

    {:ok, sup} =
      NativePool.start_link(
        pool_opts(%{opts | pool_size: 1}, name, "warm-up")
        |> Keyword.put(:max_overflow, 0)
      )

    {:ok, _} = NativePool.execute_anonymous(:ping, %{}, pool: name)
    Supervisor.stop(sup, :normal, :infinity)
    drain_exit(sup)
  end

  defp drain_exit(pid) do
    receive do
      {:EXIT, ^pid, _} -> :ok
    after
      0 -> :ok
    end
  end

  defp drain_pool_exits(ctx) do
    receive do
      {:EXIT, pid, _} when pid == ctx.sup -> 1 + drain_pool_exits(ctx)
    after
      0 -> 0
    end
  end

  defp setup_sessions(ctx) do
    for sid <- ctx.sessions do
      {:ok, %{"program_id" => "prog"}} =
        NativePool.execute_in_session(sid, :create_program, %{id: "prog"}, ctx.pool)
    end
  end

  # ---- chaos mode -----------------------------------------------------------------------

  defp chaos(ctx) do
    opts = ctx.opts
    callers = for i <- 1..opts.callers, into: %{}, do: spawn_caller(ctx, i)
    Process.send_after(self(), :kill_worker, opts.kill_every)
    Process.send_after(self(), :kill_caller, opts.caller_kill_every)

    # SIGSTOP episodes spread over the run, the first after a second.
    if opts.stops > 0 do
      gap = max(div(opts.duration_ms - 1_000, opts.stops), opts.stop_ms + 500)

      for k <- 0..(opts.stops - 1), (at = 1_000 + k * gap) + opts.stop_ms < opts.duration_ms do
        Process.send_after(self(), :sigstop, at)
      end
    end

    Process.send_after(self(), :end, opts.duration_ms)
    state = %{callers: callers, next_id: opts.callers + 1, stopped: nil}
    state = chaos_loop(ctx, state)
    finish_callers(ctx, state.callers)
    ctx
  end

  defp chaos_loop(ctx, state) do
    receive do
      :kill_worker ->
        kill_worker(ctx, state.stopped)
        Process.send_after(self(), :kill_worker, ctx.opts.kill_every)
        chaos_loop(ctx, state)

      :kill_caller ->
        kill_caller(ctx)
        Process.send_after(self(), :kill_caller, ctx.opts.caller_kill_every)
        chaos_loop(ctx, state)

      :sigstop ->
        case pick_worker(ctx, nil) do
          {pid, start_time} ->
            signal(ctx, pid, "STOP")
            bump(ctx, :sigstops)
            Process.send_after(self(), {:sigcont, pid, start_time}, ctx.opts.stop_ms)
            chaos_loop(ctx, %{state | stopped: pid})

          nil ->
            chaos_loop(ctx, state)
        end

      {:sigcont, pid, start_time} ->
        resume(ctx, pid, start_time)
        chaos_loop(ctx, %{state | stopped: nil})

      {:DOWN, _ref, :process, pid, reason} ->
        {_, callers} = Map.pop(state.callers, pid)
        caller_down(ctx, pid, reason)
        {pid2, i} = spawn_caller(ctx, state.next_id)
        chaos_loop(ctx, %{state | callers: Map.put(callers, pid2, i), next_id: state.next_id + 1})

      {:EXIT, pid, _reason} when pid == ctx.sup ->
        bump(ctx, :pool_exits)
        chaos_loop(ctx, state)

      {:EXIT, _pid, _reason} ->
        chaos_loop(ctx, state)

      :end ->
        if state.stopped, do: resume(ctx, state.stopped, nil)
        state
    end
  end

  defp resume(ctx, pid, start_time) do
    case proc_stat(pid) do
      %{start_time: t} when start_time in [nil, t] ->
        signal(ctx, pid, "CONT")
        bump(ctx, :sigconts)

      _ ->
        bump(ctx, :stopped_recycled_before_cont)
    end
  end

  defp kill_worker(ctx, stopped) do
    case pick_worker(ctx, stopped) do
      {pid, _} ->
        signal(ctx, pid, "KILL")
        bump(ctx, :sigkills)

      nil ->
        :ok
    end
  end

  # A live worker of this pool (a child of its helper), not `except`.
  defp pick_worker(ctx, except) do
    pids = NativePool.get_pool_status(ctx.pool).worker_pids
    Enum.each(pids, &:ets.insert(ctx.seen, {{:worker, &1}}))

    candidates =
      for pid <- pids -- [except],
          %{state: s, ppid: ppid, start_time: t} <- [proc_stat(pid)],
          s != "Z" and helper?(ppid, ctx),
          do: {pid, t}

    if candidates == [], do: nil, else: Enum.random(candidates)
  end

  defp helper?(pid, ctx) do
    match?(%{ppid: ppid} when ppid == ctx.beam, proc_stat(pid)) and
      cmdline(pid) =~ "fork_server.py"
  end

  defp kill_caller(ctx) do
    case :ets.tab2list(ctx.holding) do
      [] ->
        :ok

      holders ->
        {pid} = Enum.random(holders)
        :ets.insert(ctx.counts, {{:killing, pid}, 1})
        Process.exit(pid, :kill)
    end
  end

  defp caller_down(ctx, pid, reason) do
    :ets.delete(ctx.inflight, pid)
    :ets.delete(ctx.holding, pid)

    case {reason, :ets.take(ctx.counts, {:killing, pid})} do
      {:killed, [_]} -> bump(ctx, :callers_killed_holding)
      {:normal, _} -> :ok
      _ -> bump(ctx, :raised) && example(ctx, {:caller_crashed, reason})
    end
  end

  # Stops the callers: each finishes its operation; one still running past its limit + 1 s
  # (the operation's own deadline) is counted as never returned and killed.
  defp finish_callers(ctx, callers) do
    :atomics.put(ctx.stop, 1, 1)
    wait = ctx.opts.pool_timeout + ctx.opts.patient_timeout * 3 + 2_000
    deadline = System.monotonic_time(:millisecond) + wait
    await_callers(ctx, Map.keys(callers) |> MapSet.new(), deadline)
  end

  defp await_callers(ctx, live, deadline) do
    if MapSet.size(live) == 0 do
      :ok
    else
      remaining = max(deadline - System.monotonic_time(:millisecond), 0)

      receive do
        {:DOWN, _ref, :process, pid, reason} ->
          caller_down(ctx, pid, reason)
          await_callers(ctx, MapSet.delete(live, pid), deadline)

        {:EXIT, pid, _} when pid == ctx.sup ->
          bump(ctx, :pool_exits)
          await_callers(ctx, live, deadline)
      after
        remaining ->
          now = System.monotonic_time(:millisecond)

          for pid <- live do
            case :ets.lookup(ctx.inflight, pid) do
              [{_, what, t0, limit}] when now - t0 > limit + 1_000 ->
                bump(ctx, :never_returned)
                example(ctx, {:never_returned, what, now - t0})

              _ ->
                :ok
            end

            Process.exit(pid, :kill)
          end

          :ok
      end
    end
  end

  # ---- soak mode ------------------------------------------------------------------------

  defp soak(ctx) do
    ctx = sample(ctx, 0)
    callers = for i <- 1..ctx.opts.callers, into: %{}, do: spawn_caller(ctx, i)
    soak_loop(ctx, MapSet.new(Map.keys(callers)))
  end

  defp soak_loop(ctx, live) do
    if MapSet.size(live) == 0 do
      # A last sample unless the last multiple of :sample_every already reached :calls.
      case ctx.samples do
        [%{calls: n} | _] when n >= ctx.opts.calls -> ctx
        _ -> sample(ctx, :atomics.get(ctx.stop, 2))
      end
    else
      receive do
        {:sample, n} ->
          soak_loop(sample(ctx, n), live)

        {:DOWN, _ref, :process, pid, reason} ->
          caller_down(ctx, pid, reason)
          soak_loop(ctx, MapSet.delete(live, pid))

        {:EXIT, pid, _} when pid == ctx.sup ->
          bump(ctx, :pool_exits)
          soak_loop(ctx, live)
      end
    end
  end

  defp sample(ctx, n) do
    if match?([%{calls: ^n} | _], ctx.samples) do
      ctx
    else
      # Every process, so a binary counts only while something can still reach it.
      Enum.each(Process.list(), &:erlang.garbage_collect/1)
      pids = NativePool.get_pool_status(ctx.pool).worker_pids

      s = %{
        calls: n,
        t: System.monotonic_time(:millisecond),
        memory: :erlang.memory(:total),
        binary: :erlang.memory(:binary),
        fds: fd_count(),
        threads: length(File.ls!("/proc/self/task")),
        workers: length(pids),
        worker_rss: pids |> Enum.map(&rss_kb/1) |> Enum.sum()
      }

      %{ctx | samples: [s | ctx.samples]}
    end
  end

  # ---- callers --------------------------------------------------------------------------

  defp spawn_caller(ctx, i) do
    {pid, _ref} = spawn_monitor(fn -> caller(ctx, i) end)
    {pid, i}
  end

  defp caller(ctx, i) do
    :rand.seed(:exsss, {ctx.seed, i, 7})
    caller_loop(ctx)
  end

  defp caller_loop(ctx) do
    if go?(ctx) do
      op(ctx, pick_op(ctx.opts))
      caller_loop(ctx)
    end
  end

  # Soak: an operation starts while fewer than `:calls` API calls were made (a checkout
  # makes three, so the total overshoots by at most three per caller).
  defp go?(%{opts: %{soak: true}} = ctx), do: :atomics.get(ctx.stop, 2) < ctx.opts.calls

  defp go?(ctx), do: :atomics.get(ctx.stop, 1) == 0

  @chaos_ops [
    echo: 25,
    ping: 10,
    sleep: 10,
    session_echo: 20,
    session_program: 10,
    checkout: 15,
    misbehave: 3
  ]
  @soak_ops [echo: 30, ping: 10, sleep: 2, session_echo: 25, session_program: 15, checkout: 18]

  defp pick_op(opts) do
    ops =
      cond do
        opts.soak -> @soak_ops
        opts.misbehave -> @chaos_ops
        true -> List.keydelete(@chaos_ops, :misbehave, 0)
      end

    total = ops |> Keyword.values() |> Enum.sum()
    pick(ops, :rand.uniform(total))
  end

  defp pick([{op, w} | rest], n), do: if(n <= w, do: op, else: pick(rest, n - w))

  defp timeout(opts) do
    if :rand.uniform(10) == 1, do: opts.patient_timeout, else: opts.timeout
  end

  defp call_opts(ctx, timeout),
    do: ctx.pool ++ [pool_timeout: ctx.opts.pool_timeout, timeout: timeout]

  defp session(ctx), do: Enum.random(ctx.sessions)

  defp op(ctx, :echo) do
    n = nonce()
    t = timeout(ctx.opts)
    args = %{nonce: n, pad: String.duplicate("x", :rand.uniform(64))}

    timed(ctx, :execute_anonymous, ctx.opts.pool_timeout + t, fn ->
      NativePool.execute_anonymous(:echo, args, call_opts(ctx, t))
    end)
    |> check(ctx, :execute, fn r -> r == stringify(args) end)
  end

  defp op(ctx, :ping) do
    n = nonce()
    t = timeout(ctx.opts)

    timed(ctx, :execute_anonymous, ctx.opts.pool_timeout + t, fn ->
      NativePool.execute_anonymous(:ping, %{nonce: n}, call_opts(ctx, t))
    end)
    |> check(ctx, :execute, fn r ->
      if is_integer(r["pid"]), do: :ets.insert(ctx.seen, {{:worker, r["pid"]}})
      r["nonce"] == n and r["status"] == "ok"
    end)
  end

  defp op(ctx, :sleep) do
    n = nonce()
    t = timeout(ctx.opts)
    ms = if ctx.opts.soak, do: :rand.uniform(2) - 1, else: :rand.uniform(30)

    timed(ctx, :execute_anonymous, ctx.opts.pool_timeout + t, fn ->
      NativePool.execute_anonymous(:sleep, %{ms: ms, nonce: n}, call_opts(ctx, t))
    end)
    |> check(ctx, :execute, fn r -> r == %{"slept" => ms, "nonce" => n} end)
  end

  defp op(ctx, :session_echo) do
    n = nonce()
    sid = session(ctx)
    t = timeout(ctx.opts)

    timed(ctx, :execute_in_session, ctx.opts.pool_timeout + t, fn ->
      NativePool.execute_in_session(sid, :echo, %{nonce: n}, call_opts(ctx, t))
    end)
    |> check(ctx, :execute, fn r -> r == %{"nonce" => n, "session_id" => sid} end)
  end

  defp op(ctx, :session_program) do
    n = nonce()
    sid = session(ctx)
    t = timeout(ctx.opts)

    timed(ctx, :execute_in_session, ctx.opts.pool_timeout + t, fn ->
      NativePool.execute_in_session(
        sid,
        :execute_program,
        %{program_id: "prog", nonce: n},
        call_opts(ctx, t)
      )
    end)
    |> check(ctx, :execute, fn r -> r["nonce"] == n and r["program_id"] == "prog" end)
  end

  # A worker held for three calls; callers are killed (by the orchestrator) while here.
  defp op(ctx, :checkout) do
    sid = if :rand.uniform(2) == 1, do: session(ctx)
    mode = if sid, do: {:session, sid}, else: :anonymous
    t0 = System.monotonic_time(:millisecond)
    :ets.insert(ctx.inflight, {self(), :checkout, t0, ctx.opts.pool_timeout})

    result =
      guarded(ctx, fn ->
        NativePool.with_checkout(
          mode,
          fn checkout -> hold(ctx, checkout, sid, t0) end,
          ctx.pool ++ [pool_timeout: ctx.opts.pool_timeout]
        )
      end)

    :ets.delete(ctx.inflight, self())
    :ets.delete(ctx.holding, self())

    if match?({:error, _}, result) and
         System.monotonic_time(:millisecond) - t0 > ctx.opts.pool_timeout + 1_000,
       do: hung(ctx, :checkout, t0)

    case result do
      :held -> :ok
      :raised -> :ok
      {:error, _} = error -> outcome(ctx, :checkout, error, fn _ -> false end)
      other -> wrong(ctx, {:with_checkout, other})
    end
  end

  defp op(ctx, :misbehave) do
    {command, args, expect} =
      Enum.random([
        {:reply_twice, %{}, &(&1 == %{"twice" => true})},
        {:unparseable, %{}, fn _ -> false end},
        {:garbage_json, %{}, fn _ -> false end},
        {:wrong_id, %{}, fn _ -> false end},
        {:go_silent, %{}, fn _ -> false end},
        {:stderr_flood, %{lines: 2_000, bytes: 200},
         &match?(%{"lines" => 2_000, "bytes" => 200}, &1)},
        {:spawn_grandchild, %{seconds: 3_600}, &match?(%{"pid" => p} when is_integer(p), &1)}
      ])

    n = nonce()
    bump(ctx, {:misbehave, command})

    timed(ctx, :execute_anonymous, ctx.opts.pool_timeout + ctx.opts.timeout, fn ->
      NativePool.execute_anonymous(command, Map.put(args, :nonce, n), ctx.pool)
    end)
    |> check(ctx, :execute, fn r ->
      expect.(Map.delete(r, "nonce")) and r["nonce"] in [n, nil]
    end)
  end

  defp hold(ctx, checkout, sid, t0) do
    checked_out = System.monotonic_time(:millisecond)
    :ets.delete(ctx.inflight, self())
    if checked_out - t0 > ctx.opts.pool_timeout + 1_000, do: hung(ctx, :checkout, t0)
    :ets.insert(ctx.holding, {self()})

    for _ <- 1..3 do
      n = nonce()
      t = timeout(ctx.opts)
      {command, args} = Enum.random([{:echo, %{nonce: n}}, {:sleep, %{ms: 5, nonce: n}}])

      expected =
        case command do
          :echo -> if sid, do: %{"nonce" => n, "session_id" => sid}, else: %{"nonce" => n}
          :sleep -> %{"slept" => 5, "nonce" => n}
        end

      timed(ctx, :call, t, fn -> NativePool.call(checkout, command, args, timeout: t) end)
      |> check(ctx, :call, &(&1 == expected))
    end

    :ets.delete(ctx.holding, self())
    :held
  end

  # Runs `fun` with its deadline recorded (for the end-of-run watchdog); a reply later than
  # `limit + 1 s` counts as hung.
  defp timed(ctx, what, limit, fun) do
    t0 = System.monotonic_time(:millisecond)
    :ets.insert(ctx.inflight, {self(), what, t0, limit})
    n = :atomics.add_get(ctx.stop, 2, 1)
    if ctx.opts.soak and rem(n, ctx.opts.sample_every) == 0, do: send(ctx.owner, {:sample, n})
    result = guarded(ctx, fun)
    :ets.delete(ctx.inflight, self())
    if System.monotonic_time(:millisecond) - t0 > limit + 1_000, do: hung(ctx, what, t0)
    result
  end

  defp guarded(ctx, fun) do
    fun.()
  rescue
    e ->
      bump(ctx, :raised)
      example(ctx, {:raised, Exception.format(:error, e, __STACKTRACE__)})
      :raised
  catch
    kind, reason ->
      bump(ctx, :raised)
      example(ctx, {:raised, kind, reason})
      :raised
  end

  defp hung(ctx, what, t0) do
    bump(ctx, :hung)
    example(ctx, {:hung, what, System.monotonic_time(:millisecond) - t0})
  end

  defp check(:raised, _ctx, _where, _ok?), do: :ok
  defp check(result, ctx, where, ok?), do: outcome(ctx, where, result, ok?)

  defp outcome(ctx, where, result, ok?) do
    case result do
      {:ok, r} when is_map(r) ->
        if ok?.(r), do: bump(ctx, :ok), else: wrong(ctx, result)

      {:error, "Program not found" <> _ = why} ->
        bump(ctx, :session_lost)
        example(ctx, {:session_lost, why})

      {:error, reason} ->
        kind = error_kind(where, reason)
        bump(ctx, {:error, kind})

        if kind in [:checkout_failed_startable, :other] do
          bump(ctx, kind)
          example(ctx, {where, reason})
        end

      other ->
        wrong(ctx, other)
    end
  end

  defp wrong(ctx, reply) do
    bump(ctx, :wrong)
    example(ctx, {:wrong, reply})
  end

  defp error_kind(_where, {:timeout, _}), do: :timeout
  defp error_kind(_where, {:pool_timeout, _}), do: :pool_timeout
  defp error_kind(_where, {:worker_exited, _}), do: :worker_exited
  defp error_kind(_where, {:decode_error, _}), do: :decode_error
  defp error_kind(_where, :response_mismatch), do: :response_mismatch
  defp error_kind(_where, :malformed_response), do: :malformed_response
  defp error_kind(_where, {:session_lost, _}), do: :session_lost
  defp error_kind(_where, reason) when is_binary(reason), do: :python_error

  # A held checkout whose worker died, or whose worker another request's timeout recycled,
  # is told so; anything else while workers can start is a defect.
  defp error_kind(:call, {:checkout_failed, _}), do: :checkout_failed_worker_lost

  defp error_kind(_where, {:checkout_failed, "its worker was recycled" <> _}),
    do: :checkout_failed_worker_lost

  defp error_kind(_where, {:checkout_failed, _}), do: :checkout_failed_startable
  defp error_kind(_where, _reason), do: :other

  defp nonce, do: System.unique_integer([:positive])

  defp stringify(args), do: Map.new(args, fn {k, v} -> {to_string(k), v} end)

  defp bump(ctx, key), do: :ets.update_counter(ctx.counts, key, 1, {key, 0})

  # The first three problems of each kind, for the report.
  defp example(ctx, what) do
    key = {:examples, elem(what, 0)}

    if :ets.update_counter(ctx.counts, key, 1, {key, 0}) <= 3,
      do: :ets.insert(ctx.counts, {{:example, System.unique_integer([:monotonic])}, what})

    true
  end

  defp examples(ctx) do
    for {{:example, _}, what} <- :ets.tab2list(ctx.counts), do: what
  end

  # ---- settling, stop, orphans ----------------------------------------------------------

  # After the chaos: the pool must come back to pool_size idle workers whose pids are exactly
  # the helper's live children, with no zombies and no Python process not a live worker's.
  defp settle(ctx, helper0) do
    deadline = System.monotonic_time(:millisecond) + 15_000
    settle_poll(ctx, helper0, deadline)
  end

  defp settle_poll(ctx, helper0, deadline) do
    status = NativePool.get_pool_status(ctx.pool)
    helper = helper_of(status.worker_pids) || helper0
    Enum.each(status.worker_pids, &:ets.insert(ctx.seen, {{:worker, &1}}))
    children = children_of(helper)
    live_children = for {pid, s} <- children, s != "Z", do: pid
    zombies = for {pid, "Z"} <- children, do: pid
    pids = MapSet.new(status.worker_pids)

    problems =
      [
        {status.busy != 0, {:busy, status.busy}},
        {status.queued_callers != 0, {:queued_callers, status.queued_callers}},
        {status.starting != 0, {:starting, status.starting}},
        {status.ready < status.pool_size, {:ready_below_pool_size, status.ready}},
        {length(status.worker_pids) != status.ready,
         {:worker_pids_vs_ready, length(status.worker_pids), status.ready}},
        {pids != MapSet.new(live_children),
         {:worker_pids_vs_helper_children, Enum.sort(status.worker_pids),
          Enum.sort(live_children)}}
      ]
      |> Enum.filter(&elem(&1, 0))
      |> Enum.map(&elem(&1, 1))

    marked = marked_processes(ctx.run_id)
    # A live worker's own children (grandchildren of the helper) are fine while it lives.
    strays =
      for {pid, pgid, _} <- marked,
          pid != helper and pid not in pids and pgid not in pids,
          do: pid

    done = problems == [] and zombies == [] and strays == [] and status.open_leases == 0

    if done or System.monotonic_time(:millisecond) > deadline do
      %{
        problems: problems,
        zombies: length(zombies),
        strays: describe(strays),
        open_leases: status.open_leases,
        helper: helper
      }
    else
      Process.sleep(50)
      settle_poll(ctx, helper0, deadline)
    end
  end

  defp after_stop(ctx, helper, seen) do
    deadline = System.monotonic_time(:millisecond) + 5_000
    after_stop_poll(ctx, helper, seen, deadline)
  end

  defp after_stop_poll(ctx, helper, seen, deadline) do
    helper_stat = helper && proc_stat(helper)
    helper_alive = match?(%{state: s} when s != "Z", helper_stat)
    helper_zombie = match?(%{state: "Z"}, helper_stat)
    # The VM's own children are the pools' helpers and erl_child_setup: none may stay unreaped.
    beam_zombies = for {pid, "Z"} <- children_of(ctx.beam), do: pid
    seen_set = MapSet.new(seen)

    orphans = for {pid, pgid, _} <- marked_processes(ctx.run_id), do: {pid, pgid in seen_set}

    if (orphans == [] and not helper_alive and not helper_zombie and beam_zombies == []) or
         System.monotonic_time(:millisecond) > deadline do
      %{
        orphans: describe(Enum.map(orphans, &elem(&1, 0))),
        helper_alive: helper_alive or helper_zombie,
        zombies: length(beam_zombies),
        workers_seen: length(seen)
      }
    else
      Process.sleep(50)
      after_stop_poll(ctx, helper, seen, deadline)
    end
  end

  # Every process that inherited this run's DSPEX_CHAOS_RUN, as {pid, pgid, state}.
  defp marked_processes(run_id) do
    needle = "DSPEX_CHAOS_RUN=" <> run_id <> <<0>>

    for entry <- File.ls!("/proc"),
        match?({_, ""}, Integer.parse(entry)),
        pid = String.to_integer(entry),
        {:ok, env} <- [File.read("/proc/#{pid}/environ")],
        String.contains?(env <> <<0>>, needle),
        %{pgrp: pgid, state: state} <- [proc_stat(pid)],
        state != "Z",
        do: {pid, pgid, state}
  end

  defp describe(pids), do: for(pid <- pids, do: {pid, cmdline(pid)})

  defp helper_pid(ctx) do
    helper_of(NativePool.get_pool_status(ctx.pool).worker_pids)
  end

  defp helper_of(worker_pids) do
    Enum.find_value(worker_pids, fn pid ->
      case proc_stat(pid) do
        %{ppid: ppid} -> if cmdline(ppid) =~ "fork_server.py", do: ppid
        _ -> nil
      end
    end)
  end

  defp children_of(nil), do: []

  defp children_of(parent) do
    for entry <- File.ls!("/proc"),
        match?({_, ""}, Integer.parse(entry)),
        %{ppid: ^parent, state: s} <- [proc_stat(String.to_integer(entry))],
        do: {String.to_integer(entry), s}
  end

  defp seen(ctx, kind), do: for({{^kind, pid}} <- :ets.tab2list(ctx.seen), do: pid)

  # The count once it held still for 200 ms (a stopped pool closes some descriptors late).
  defp stable_fd_count(last \\ -1, tries \\ 50) do
    now = fd_count()

    if now == last or tries == 0 do
      now
    else
      Process.sleep(200)
      stable_fd_count(now, tries - 1)
    end
  end

  # Code loading and the closing of ports may lag a little behind the stop.
  defp wait_fds(before, tries \\ 40) do
    now = fd_count()

    if now <= before or tries == 0 do
      now
    else
      Process.sleep(50)
      wait_fds(before, tries - 1)
    end
  end

  # ---- /proc and signals ----------------------------------------------------------------

  defp fd_count, do: length(File.ls!("/proc/self/fd"))

  @doc false
  def proc_stat(pid) do
    # The command name (field 2) may hold ") ": the fields start after the last one.
    with {:ok, stat} <- File.read("/proc/#{pid}/stat"),
         [_ | _] = matches <- :binary.matches(stat, ") ") do
      {pos, len} = List.last(matches)
      fields = stat |> binary_part(pos + len, byte_size(stat) - pos - len) |> String.split(" ")

      %{
        state: Enum.at(fields, 0),
        ppid: String.to_integer(Enum.at(fields, 1)),
        pgrp: String.to_integer(Enum.at(fields, 2)),
        start_time: Enum.at(fields, 19)
      }
    else
      _ -> nil
    end
  end

  defp cmdline(pid) do
    case File.read("/proc/#{pid}/cmdline") do
      {:ok, c} -> String.replace(c, <<0>>, " ") |> String.trim()
      _ -> ""
    end
  end

  defp rss_kb(pid) do
    case File.read("/proc/#{pid}/status") do
      {:ok, s} ->
        case Regex.run(~r/VmRSS:\s+(\d+)/, s) do
          [_, kb] -> String.to_integer(kb)
          _ -> 0
        end

      _ ->
        0
    end
  end

  # One shell for every signal: `kill` is its builtin, so no process is forked per signal.
  defp open_signal_port do
    Port.open({:spawn_executable, "/bin/sh"}, [:binary, :use_stdio, {:line, 1024}, args: ["-s"]])
  end

  defp signal(ctx, pid, sig) do
    Port.command(ctx.sh, "kill -s #{sig} #{pid} 2>/dev/null; echo k\n")

    receive do
      {port, {:data, {:eol, "k"}}} when port == ctx.sh -> :ok
    after
      5_000 -> :ok
    end
  end

  # ---- the report -----------------------------------------------------------------------

  @doc "The report as markdown tables."
  def format(report) do
    [
      header(report),
      "\n",
      outcomes_table(report),
      "\n",
      checks_table(report),
      if(report.samples != [], do: ["\n", soak_table(report)], else: []),
      examples_text(report)
    ]
  end

  defp header(r) do
    o = r.opts
    calls = calls(r.counts)
    secs = max(r.elapsed_ms, 1) / 1000

    mode =
      if r.mode == :soak,
        do: "soak, #{o.calls} calls",
        else:
          "chaos, #{div(o.duration_ms, 1000)} s, SIGKILL every #{o.kill_every} ms, " <>
            "#{o.stops} SIGSTOP of #{o.stop_ms} ms, a holder killed every #{o.caller_kill_every} ms"

    "#{mode}; #{o.callers} callers, pool_size #{o.pool_size}, protocol #{o.protocol}, " <>
      "timeouts #{o.pool_timeout}/#{o.timeout} ms (10% #{o.patient_timeout} ms), seed #{r.seed}\n" <>
      "#{calls} calls in #{Float.round(secs, 1)} s (#{round(calls / secs)}/s)\n"
  end

  defp calls(counts) do
    Enum.reduce(counts, 0, fn
      {:ok, n}, acc -> acc + n
      {{:error, _}, n}, acc -> acc + n
      {k, n}, acc when k in [:wrong, :session_lost] -> acc + n
      _, acc -> acc
    end)
  end

  defp outcomes_table(r) do
    c = r.counts
    errors = for {{:error, kind}, n} <- c, do: {"error #{kind}", n}
    misbehave = for {{:misbehave, cmd}, n} <- c, do: {"  misbehaving request: #{cmd}", n}

    info =
      [
        {"workers SIGKILLed", c[:sigkills]},
        {"workers SIGSTOPped", c[:sigstops]},
        {"  SIGCONTed after #{r.opts.stop_ms} ms", c[:sigconts]},
        {"  recycled by the pool before SIGCONT", c[:stopped_recycled_before_cont]},
        {"callers killed while holding a checkout", c[:callers_killed_holding]}
      ]
      |> Enum.reject(&(elem(&1, 1) in [nil, 0]))

    status = r.status

    pool = [
      {"pool: worker starts", status.counters[:worker_starts]},
      {"pool: start failures", status.counters[:start_failures]},
      {"pool: recycled", status.counters[:recycled]},
      {"pool: timeouts", status.counters[:timeouts]},
      {"distinct worker pids seen", r.after_stop.workers_seen}
    ]

    rows = [{"ok (nonce checked)", c[:ok] || 0}] ++ Enum.sort(errors) ++ misbehave ++ info ++ pool
    table(["outcome", "count"], Enum.map(rows, fn {k, v} -> [k, to_string(v || 0)] end))
  end

  defp checks_table(r) do
    {before, after_} = r.fds

    rows =
      for {key, label} <- @must_be_zero do
        v = r.checks[key]

        detail =
          case key do
            :fd_growth -> "#{before} -> #{after_}"
            :status_inconsistent -> inspect(r.settle.problems, limit: 20)
            :strays -> inspect(r.settle.strays, limit: 10)
            :orphans -> inspect(r.after_stop.orphans, limit: 10)
            _ -> ""
          end

        [label <> " (must be 0)", to_string(v), if(v == 0, do: "ok", else: "FAIL"), detail]
      end

    table(["check", "value", "", "detail"], rows)
  end

  defp soak_table(r) do
    samples = r.samples

    rows =
      for s <- samples do
        [
          to_string(s.calls),
          mb(s.memory),
          mb(s.binary),
          to_string(s.fds),
          to_string(s.threads),
          "#{s.worker_rss} kB / #{s.workers}"
        ]
      end

    growth = growth(samples, r.opts.sample_every)

    table(["calls", "BEAM memory", "binary", "fds", "OS threads", "worker RSS / workers"], rows) <>
      "\n" <> growth
  end

  # Growth per `every` calls, from the first sample after warm-up (the second one, when there
  # are three or more) to the last.
  defp growth(samples, every) do
    from = if length(samples) >= 3, do: Enum.at(samples, 1), else: hd(samples)
    to = List.last(samples)
    span = to.calls - from.calls

    if span <= 0 do
      "growth: too few samples\n"
    else
      per = fn a, b -> (b - a) * every / span end

      "growth per #{every} calls (from #{from.calls} to #{to.calls}): " <>
        "BEAM memory #{kb(per.(from.memory, to.memory))}, binary #{kb(per.(from.binary, to.binary))}, " <>
        "fds #{Float.round(per.(from.fds, to.fds) / 1, 2)}, " <>
        "OS threads #{Float.round(per.(from.threads, to.threads) / 1, 2)}, " <>
        "worker RSS #{Float.round(per.(from.worker_rss, to.worker_rss) / 1, 1)} kB\n"
    end
  end

  defp mb(bytes), do: "#{Float.round(bytes / 1_048_576, 1)} MB"
  defp kb(bytes), do: "#{Float.round(bytes / 1024, 1)} kB"

  defp examples_text(%{examples: []}), do: []

  defp examples_text(r) do
    [
      "\nfirst problems seen:\n"
      | Enum.map(r.examples, &["  ", inspect(&1, limit: 30), "\n"])
    ]
  end

  defp table(header, rows) do
    all = [header | rows]

    widths =
      for i <- 0..(length(header) - 1) do
        all |> Enum.map(&String.length(Enum.at(&1, i))) |> Enum.max()
      end

    line = fn cells ->
      "| " <>
        (cells
         |> Enum.zip(widths)
         |> Enum.map_join(" | ", fn {c, w} -> String.pad_trailing(c, w) end)) <> " |\n"
    end

    sep = "|" <> Enum.map_join(widths, "|", &String.duplicate("-", &1 + 2)) <> "|\n"
    line.(header) <> sep <> Enum.map_join(rows, "", line)
  end
end
