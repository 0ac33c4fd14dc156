defmodule DSPex.NativePool.Server do
  @moduledoc false
  # Owns the native pool: starts it, publishes it in :persistent_term for callers, forwards
  # worker stderr to Logger and worker events to telemetry, and stops the workers on shutdown.

  use GenServer
  require Logger

  # The longest `receive ... after`.
  @max_timeout 4_294_967_295

  alias DSPex.NativePool.{Native, Python, Registry, Telemetry}
  alias DSPex.PythonBridge.NativePool

  @options [
    :name,
    :pool_size,
    :overflow,
    :max_overflow,
    :lazy,
    :pool_lazy,
    :python,
    :script,
    :start_method,
    :worker_args,
    :env,
    :checkout_timeout,
    :operation_timeout,
    :start_timeout,
    :max_frame_size,
    :affinity,
    :affinity_wait,
    :overflow_idle_timeout,
    :shutdown_grace,
    :session_ttl,
    :retries,
    :max_retries,
    # SessionPoolV2's NimblePool worker module: accepted and ignored.
    :worker_module,
    :worker_concurrency,
    :heartbeat_timeout
  ]

  # File descriptors the BEAM holds per worker: stdin, stdout and stderr pipes, and a spare
  # for the child's spawn. Plus what the VM itself needs to keep loading code and serving ports.
  @fds_per_worker 4
  @fd_reserve 64

  @doc false
  def validate!(opts) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError, "expected the pool options to be a keyword list, got: #{inspect(opts)}"
    end

    opts =
      case Keyword.validate(opts, @options) do
        {:ok, opts} ->
          opts

        {:error, unknown} ->
          raise ArgumentError,
                "unknown keys #{inspect(unknown)} (options SessionPoolV2 never knew either), " <>
                  "the allowed keys are: #{inspect(@options)}, got: #{inspect(opts)}"
      end

    if Keyword.has_key?(opts, :worker_module) do
      Logger.debug(
        "DSPex native pool: ignoring :worker_module #{inspect(opts[:worker_module])} (SessionPoolV2's NimblePool worker; the native pool has its own)"
      )
    end

    overflow = Keyword.get(opts, :max_overflow, Keyword.get(opts, :overflow, 2))
    # SessionPoolV2's default: eager, unless `config :dspex, pool_lazy: true`.
    lazy_default = Application.get_env(:dspex, :pool_lazy, false)
    lazy = Keyword.get(opts, :lazy, Keyword.get(opts, :pool_lazy, lazy_default))
    retries = Keyword.get(opts, :retries, Keyword.get(opts, :max_retries, 0))

    validated = [
      name:
        check(
          opts,
          :name,
          NativePool.default_name(),
          # :undefined cannot be registered (GenServer said {:already_started, :undefined}).
          &(is_atom(&1) and &1 not in [nil, :undefined]),
          "an atom (not nil or :undefined)"
        ),
      pool_size:
        check(opts, :pool_size, System.schedulers_online() * 2, &pos_int?/1, "a positive integer"),
      max_overflow:
        check(
          [max_overflow: overflow],
          :max_overflow,
          2,
          &non_neg_int?/1,
          "a non-negative integer"
        ),
      lazy: check([lazy: lazy], :lazy, false, &is_boolean/1, "a boolean"),
      python: check(opts, :python, nil, &(&1 == nil or string?(&1)), "a path"),
      script: check(opts, :script, Python.default_script(), &string?/1, "a path"),
      start_method:
        check(
          opts,
          :start_method,
          default_start_method(opts[:script]),
          &(&1 in [:fork_server, :spawn]),
          ":fork_server or :spawn"
        ),
      worker_args: check(opts, :worker_args, [], &strings?/1, "a list of strings"),
      env: check(opts, :env, [], &env?/1, "a list of {name, value} strings"),
      checkout_timeout:
        check(
          opts,
          :checkout_timeout,
          NativePool.default_checkout_timeout(),
          &timeout?/1,
          "a timeout in ms or :infinity"
        ),
      operation_timeout:
        check(
          opts,
          :operation_timeout,
          NativePool.default_operation_timeout(),
          &timeout?/1,
          "a timeout in ms or :infinity"
        ),
      start_timeout: check(opts, :start_timeout, 60_000, &pos_int?/1, "a timeout in ms"),
      max_frame_size:
        check(opts, :max_frame_size, 64 * 1024 * 1024, &pos_int?/1, "a size in bytes"),
      affinity:
        check(opts, :affinity, :prefer, &(&1 in [:prefer, :strict]), ":prefer or :strict"),
      affinity_wait: check(opts, :affinity_wait, 10, &non_neg_int?/1, "a time in ms"),
      overflow_idle_timeout:
        check(opts, :overflow_idle_timeout, 10_000, &pos_int?/1, "a time in ms"),
      shutdown_grace:
        check(
          opts,
          :shutdown_grace,
          2_000,
          &(non_neg_int?(&1) and &1 <= 600_000),
          "a time in ms (at most 600000)"
        ),
      worker_concurrency:
        check(
          opts,
          :worker_concurrency,
          nil,
          &(&1 == nil or (pos_int?(&1) and &1 <= 4_294_967_295)),
          "a positive integer or nil (what each worker announces)"
        ),
      heartbeat_timeout: check(opts, :heartbeat_timeout, 30_000, &pos_int?/1, "a time in ms"),
      session_ttl:
        check(
          opts,
          :session_ttl,
          3_600_000,
          &(&1 == :infinity or pos_int?(&1)),
          "a time in ms or :infinity"
        ),
      retries: check([retries: retries], :retries, 0, &non_neg_int?/1, "a non-negative integer"),
      worker_module: Keyword.get(opts, :worker_module)
    ]

    check_fds!(validated[:pool_size], validated[:max_overflow])

    if File.exists?(validated[:script]) do
      validated
    else
      raise ArgumentError, "the :script #{inspect(validated[:script])} does not exist"
    end
  end

  defp check(opts, key, default, valid?, expected) do
    value = Keyword.get(opts, key, default)

    if valid?.(value) do
      value
    else
      raise ArgumentError, "expected #{inspect(key)} to be #{expected}, got: #{inspect(value)}"
    end
  end

  # Every count, size and time is held in 32 bits past here (a `receive` timeout, a frame's
  # length header): larger values are bad options, not a failure later.
  defp pos_int?(v), do: is_integer(v) and v > 0 and v <= @max_timeout
  defp non_neg_int?(v), do: is_integer(v) and v >= 0 and v <= @max_timeout
  defp string?(v), do: is_binary(v) and v != ""
  defp strings?(v), do: is_list(v) and Enum.all?(v, &is_binary/1)

  @doc false
  # A timeout in ms: what `receive ... after` takes, or :infinity.
  def timeout?(v), do: v == :infinity or (is_integer(v) and v >= 0 and v <= @max_timeout)

  # Names and values the OS takes: UTF-8 (the NIF reads them as strings), no NUL, no `=` in a
  # name.
  defp env?(v), do: is_list(v) and Enum.all?(v, &env_pair?/1)

  defp env_pair?({k, val}) when is_binary(k) and is_binary(val) do
    k != "" and String.valid?(k) and String.valid?(val) and not String.contains?(k, ["=", <<0>>]) and
      not String.contains?(val, <<0>>)
  end

  defp env_pair?(_), do: false

  # Each worker holds descriptors of the BEAM's: a pool larger than the process may open
  # would exhaust them (and with them code loading, sockets and files of the whole VM).
  defp check_fds!(pool_size, max_overflow) do
    workers = pool_size + max_overflow
    needed = workers * @fds_per_worker

    case fd_limit() do
      nil ->
        :ok

      limit ->
        open = open_fds()
        available = limit - open - @fd_reserve

        if needed > available do
          raise ArgumentError,
                "expected :pool_size + :max_overflow to fit the file descriptors this VM may open: " <>
                  "#{workers} workers need about #{needed} (#{@fds_per_worker} each), but the limit " <>
                  "(RLIMIT_NOFILE, `ulimit -n`) is #{limit} with #{open} open and #{@fd_reserve} kept " <>
                  "for the VM, so at most #{max(div(available, @fds_per_worker), 0)} workers fit; lower " <>
                  ":pool_size/:max_overflow or raise the limit, got: pool_size: #{pool_size}, " <>
                  "max_overflow: #{max_overflow}"
        end
    end
  end

  @doc false
  # The soft RLIMIT_NOFILE of this OS process, or nil when it cannot be read.
  def fd_limit do
    case File.read("/proc/self/limits") do
      {:ok, limits} ->
        case Regex.run(~r/^Max open files\s+(\d+|unlimited)/m, limits) do
          [_, "unlimited"] -> nil
          [_, n] -> String.to_integer(n)
          _ -> nil
        end

      {:error, _} ->
        case Integer.parse(to_string(:os.cmd(~c"ulimit -n"))) do
          {n, _} -> n
          :error -> nil
        end
    end
  end

  @doc false
  def open_fds do
    case File.ls("/proc/self/fd") do
      {:ok, fds} -> length(fds)
      {:error, _} -> 0
    end
  end

  @doc "The interpreter of the venv when it exists, else `python3` (see `DSPex.NativePool.Python`)."
  def default_python, do: Python.default_python()

  # The DSPy bridge is forked from a fork server that imported DSPy once; other scripts are
  # started afresh (through the same server, so the VM never forks per worker).
  defp default_start_method(script) do
    if script in [nil, Python.default_script()], do: :fork_server, else: :spawn
  end

  @doc false
  def fetch(nil), do: fetch(NativePool.default_name())

  def fetch(name) do
    case :persistent_term.get({NativePool, name}, nil) do
      nil ->
        {:error,
         {:checkout_failed, "no DSPex.PythonBridge.NativePool named #{inspect(name)} is running"}}

      pool ->
        {:ok, pool}
    end
  end

  @doc false
  def fetch!(name) do
    case fetch(name) do
      {:ok, pool} -> pool
      {:error, {:checkout_failed, message}} -> raise ArgumentError, message
    end
  end

  defp enhanced?(module) when is_atom(module) and module != nil,
    do: module |> Atom.to_string() |> String.ends_with?("Enhanced")

  defp enhanced?(_), do: false

  @doc false
  # SessionPoolV2's name of its NimblePool, which DSPex code passes back as `:pool_name`.
  def pool_name(name), do: :"#{name}_pool"

  @doc false
  # How long a supervisor should give the pool to stop: `terminate/2` waits up to
  # 2 x :shutdown_grace (shutdown, then SIGTERM, then SIGKILL) plus a margin.
  def shutdown_timeout(grace), do: max(10_000, 2 * grace + 2_000)

  def start_link(opts) do
    Registry.ensure_started()
    GenServer.start_link(__MODULE__, {self(), opts}, name: opts[:name])
  end

  @impl true
  def init({parent, opts}) do
    Process.flag(:trap_exit, true)
    name = opts[:name]
    cache_dir = Path.join(System.tmp_dir!(), "dspex_native_pool_dspy_cache")
    python = opts[:python] || Python.default_python()
    reader = spawn_link(__MODULE__, :reader, [self()])

    config = %{
      pool_size: opts[:pool_size],
      max_overflow: opts[:max_overflow],
      lazy: opts[:lazy],
      max_frame_size: opts[:max_frame_size],
      start_timeout: opts[:start_timeout],
      overflow_idle_timeout: opts[:overflow_idle_timeout],
      affinity_wait: opts[:affinity_wait],
      shutdown_grace: opts[:shutdown_grace],
      worker_concurrency: opts[:worker_concurrency],
      heartbeat_timeout: opts[:heartbeat_timeout],
      python: python,
      script: opts[:script],
      start_method: opts[:start_method],
      fork_server: Python.fork_server_script(),
      reader: reader,
      worker_args: opts[:worker_args],
      env:
        [
          {"LITELLM_LOCAL_MODEL_COST_MAP", "True"},
          {"DSPY_CACHEDIR", cache_dir},
          {"PYTHONUNBUFFERED", "1"}
        ] ++
          opts[:env]
    }

    resource = Native.pool_start(config)
    send(reader, {:resource, resource})

    pool = %{
      name: name,
      resource: resource,
      checkout_timeout: opts[:checkout_timeout],
      operation_timeout: opts[:operation_timeout],
      affinity: opts[:affinity],
      retries: opts[:retries],
      # SessionPoolV2 reported affinity stats only for its "enhanced" workers.
      affinity_stats?: enhanced?(opts[:worker_module]),
      started_at: System.monotonic_time(:millisecond),
      telemetry?: Code.ensure_loaded?(:telemetry),
      # Said with start-up errors when the default python has no venv (DSPy is missing).
      setup_hint:
        if(opts[:python] == nil and Python.venv_python() == nil, do: Python.setup_hint())
    }

    state = %{
      pool: pool,
      parent: parent,
      reader: reader,
      pool_size: opts[:pool_size],
      max_overflow: opts[:max_overflow],
      shutdown_grace: opts[:shutdown_grace],
      session_ttl: opts[:session_ttl]
    }

    case wait_until_ready(opts, state) do
      :ok ->
        unless opts[:lazy], do: warm_up(state, opts[:start_timeout])
        :ok = Registry.publish([name, pool_name(name)], pool)

        Logger.info(
          "DSPex native pool #{inspect(name)} started (pool_size: #{opts[:pool_size]}, max_overflow: #{opts[:max_overflow]})"
        )

        if pool.setup_hint,
          do: Logger.warning("DSPex native pool #{inspect(name)}: #{pool.setup_hint}")

        schedule_session_sweep(state)
        follow_parent(parent)
        {:ok, state}

      {:error, reason} ->
        stop_pool(state)
        {:stop, with_hint(reason, pool)}

      # The parent (a supervisor shutting down, a caller that exited) stopped waiting.
      {:exit, reason} ->
        stop_pool(state)
        {:stop, reason}
    end
  end

  # An eager pool's last start-up step, before callers can see it: every worker answers one
  # ping through the path callers use (checkout, request, reply, checkin), all at once. The
  # handshakes ran on the pool's own start-up path, each at its worker's own moment; without
  # this step the callers' first requests would be the first on theirs, after every thread on
  # it (the pool's, each worker's reader) sat idle since that worker's handshake, and slower
  # than the requests right after them (issue 9). A worker that fails this ping is replaced as
  # after any failed request; start-up does not fail for it.
  defp warm_up(state, timeout) do
    resource = state.pool.resource
    leases = hold_ready_workers(resource, Native.status(resource).ready, [])

    try do
      pending =
        for lease <- leases, reduce: %{} do
          pending ->
            ref = make_ref()

            # `true`: this process reads the replies itself, as callers do.
            case Native.call(resource, lease, ref, "ping", %{}, timeout, true) do
              :ok ->
                Map.put(pending, ref, true)

              other ->
                warn_warm_up(state.pool, other)
                pending
            end
        end

      await_pings(pending, System.monotonic_time(:millisecond) + timeout, state)
    after
      Enum.each(leases, &Native.checkin(resource, &1))
    end

    # Worker stderr forwarded meanwhile (the workers' "ready" lines) is logged now, before
    # start_link returns, not while the first callers' requests run.
    flush_native(state)
  end

  defp await_pings(pending, _deadline, _state) when map_size(pending) == 0, do: :ok

  defp await_pings(pending, deadline, state) do
    receive do
      {ref, {:"$dspex_readable", worker, lease}} when is_map_key(pending, ref) ->
        case Native.read(state.pool.resource, worker, lease) do
          :wait -> await_pings(pending, deadline, state)
          reply -> await_pings(ping_done(pending, ref, reply, state), deadline, state)
        end

      {ref, reply} when is_map_key(pending, ref) ->
        await_pings(ping_done(pending, ref, reply, state), deadline, state)

      {:dspex_native_pool_logs, _, _} = message ->
        handle_native(message, state)
        await_pings(pending, deadline, state)

      {:dspex_native_pool_event, _, _, _} = message ->
        handle_native(message, state)
        await_pings(pending, deadline, state)
    after
      max(deadline - System.monotonic_time(:millisecond), 0) -> warn_warm_up(state.pool, :timeout)
    end
  end

  defp ping_done(pending, ref, reply, state) do
    if not match?({:ok, _}, reply), do: warn_warm_up(state.pool, reply)
    Map.delete(pending, ref)
  end

  defp flush_native(state) do
    receive do
      {:dspex_native_pool_logs, _, _} = message ->
        handle_native(message, state)
        flush_native(state)

      {:dspex_native_pool_event, _, _, _} = message ->
        handle_native(message, state)
        flush_native(state)
    after
      0 -> :ok
    end
  end

  # One checkout per ready worker, each held until all are pinged, so each lands on its own.
  defp hold_ready_workers(_resource, 0, held), do: held

  defp hold_ready_workers(resource, n, held) do
    case Native.checkout(resource, make_ref(), :anonymous, 0) do
      {:ok, lease} ->
        hold_ready_workers(resource, n - 1, [lease | held])

      # Not expected before the pool is published: nobody else holds a worker.
      {:queued, lease} ->
        Native.checkin(resource, lease)
        held

      {:error, _} ->
        held
    end
  end

  defp warn_warm_up(pool, reason) do
    Logger.warning(
      "DSPex native pool #{inspect(pool.name)}: a worker failed its first ping: #{inspect(reason)}"
    )
  end

  # A parent that traps exits (a supervisor) stops this pool with an exit signal and waits up
  # to its shutdown time: trap it, and stop the workers in terminate/2. A parent that does not
  # (a test process, a script) takes the pool down with it at once, as it took SessionPoolV2
  # (which never trapped exits): then the registry sees this process go and stops the workers,
  # and code that checks `Process.alive?/1` right after the parent died finds it gone.
  defp follow_parent(parent) do
    case Process.info(parent, :trap_exit) do
      {:trap_exit, true} -> :ok
      _ -> Process.flag(:trap_exit, false)
    end
  end

  @doc false
  def with_hint({tag, detail}, %{setup_hint: hint}) when is_binary(hint) and is_binary(detail),
    do: {tag, detail <> "\n" <> hint}

  def with_hint(reason, _pool), do: reason

  # With lazy: false, start-up returns once every worker answered its ping, or fails with why.
  defp wait_until_ready(opts, state) do
    if opts[:lazy] do
      :ok
    else
      deadline = System.monotonic_time(:millisecond) + opts[:start_timeout] + 1_000
      await_workers(state, opts[:pool_size], deadline)
    end
  end

  defp await_workers(state, size, deadline) do
    status = Native.status(state.pool.resource)
    parent = state.parent

    cond do
      status.ready >= size ->
        :ok

      # An eager pool that cannot start a worker fails at once, saying why.
      status.counters.start_failures > 0 ->
        {:error, {:worker_start_failed, status.last_start_error}}

      true ->
        remaining = deadline - System.monotonic_time(:millisecond)

        receive do
          {:EXIT, ^parent, reason} ->
            {:exit, reason}

          message ->
            handle_native(message, state)
            await_workers(state, size, deadline)
        after
          max(remaining, 0) -> {:error, {:worker_start_failed, "workers did not start in time"}}
        end
    end
  end

  @impl true
  def handle_call(:get_status, _from, state) do
    {:reply, NativePool.get_pool_status(state.pool.name), state}
  end

  def handle_call(:get_pool_name, _from, state) do
    {:reply, pool_name(state.pool.name), state}
  end

  def handle_call(:health_check, _from, state) do
    {:reply, NativePool.health_check(pool: state.pool.name), state}
  end

  # A stray call or cast (SessionPoolV1's messages, a typo) is refused; it never takes the pool
  # and its workers down.
  def handle_call(request, _from, state) do
    Logger.warning(
      "DSPex native pool #{inspect(state.pool.name)}: unknown call #{inspect(request)}"
    )

    {:reply, {:error, {:unknown_call, request}}, state}
  end

  @impl true
  def handle_cast(request, state) do
    Logger.warning(
      "DSPex native pool #{inspect(state.pool.name)}: unknown cast #{inspect(request)}"
    )

    {:noreply, state}
  end

  @impl true
  def handle_info(:sweep_sessions, state) do
    # Sessions idle for longer than :session_ttl are ended, as SessionPoolV2 did, which also
    # frees their programs in the workers and the pool's record of them.
    cutoff = System.monotonic_time(:millisecond) - state.session_ttl

    stale =
      :ets.select(Registry.sessions(), [
        {{:"$1", %{last_activity: :"$2"}}, [{:<, :"$2", cutoff}], [:"$1"]}
      ])

    for session_id <- stale do
      Logger.debug("ending idle session #{inspect(session_id)}", pool: state.pool.name)
      NativePool.end_session(session_id)
    end

    schedule_session_sweep(state)
    {:noreply, state}
  end

  # The reader cannot fail but by a bug: without it, replies nobody else reads would wait.
  def handle_info({:EXIT, reader, reason}, %{reader: reader} = state),
    do: {:stop, {:reader_exited, reason}, state}

  # A linked process other than the parent (the parent's exit stops a GenServer by itself).
  def handle_info({:EXIT, _pid, _reason}, state), do: {:noreply, state}

  def handle_info(message, state) do
    handle_native(message, state)
    {:noreply, state}
  end

  defp schedule_session_sweep(%{session_ttl: :infinity}), do: :ok

  defp schedule_session_sweep(%{session_ttl: ttl}) do
    Process.send_after(self(), :sweep_sessions, ttl |> div(4) |> max(10) |> min(300_000))
  end

  # One message per batch of stderr lines; the next batch comes after the ack, so the mailbox
  # never holds more than one batch per pool.
  defp handle_native({:dspex_native_pool_logs, ack, lines}, state) do
    for {worker, level, line} <- lines do
      Logger.log(level, line, worker_id: worker, pool: state.pool.name)
    end

    Native.log_ack(ack)
  end

  defp handle_native({:dspex_native_pool_event, event, worker, meta}, state) do
    Telemetry.worker_event(event, worker, Map.put(meta, :pool, state.pool.name))
  end

  defp handle_native(_other, _state), do: :ok

  @impl true
  def terminate(_reason, state) do
    if Process.alive?(state.parent) do
      # A supervisor (or GenServer.stop): stop the workers within its shutdown time. The
      # registry may be gone already (its application stopping): the pool stops regardless.
      try do
        Registry.unpublish()
      catch
        :exit, _ -> :ok
      end

      stop_pool(state)
    else
      # The parent died and nobody waits for this stop: exit at once; the registry sees this
      # process go and stops the pool.
      :ok
    end
  end

  # Workers get `shutdown`, then SIGTERM and SIGKILL after a grace period each.
  defp stop_pool(state) do
    Native.pool_stop(state.pool.resource)

    receive do
      {:dspex_native_pool_event, :stopped} -> :ok
    after
      state.shutdown_grace * 2 + 1_000 -> :ok
    end
  end

  @doc false
  # The pool's reader: a process that only reads workers' stdout when no caller does (a
  # worker's start-up, several protocol-2 requests in flight on it, a stream, output while
  # idle) and sends each reply to its caller. Apart from the pool's server, so a server busy
  # in a call never holds up a reply. It ends with the server.
  def reader(server) do
    monitor = Process.monitor(server)
    # Ahead of callers on the run queues: while callers queue, it dispatches each worker's next
    # request as it reads the reply (a few µs per frame).
    Process.flag(:priority, :high)

    receive do
      {:resource, resource} -> read(resource, monitor)
      {:DOWN, ^monitor, _, _, _} -> :ok
    end
  end

  defp read(resource, monitor) do
    receive do
      {:"$dspex_readable", worker} ->
        Native.drain(resource, worker)
        read(resource, monitor)

      {:DOWN, ^monitor, _, _, _} ->
        :ok
    end
  end
end
