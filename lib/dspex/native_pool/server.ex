defmodule DSPex.NativePool.Server do
  @moduledoc false
  # Owns the native pool: starts it, publishes it in :persistent_term for callers, forwards
  # worker stderr to Logger and worker events to telemetry, and stops the workers on shutdown.

  use GenServer
  require Logger

  alias DSPex.NativePool.{Native, Telemetry}
  alias DSPex.PythonBridge.NativePool

  @options [
    :name,
    :pool_size,
    :overflow,
    :max_overflow,
    :lazy,
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
    :worker_concurrency,
    :heartbeat_timeout
  ]

  @doc false
  def validate!(opts) do
    opts = Keyword.validate!(opts, @options)
    overflow = Keyword.get(opts, :max_overflow, Keyword.get(opts, :overflow, 2))

    validated = [
      name: check(opts, :name, NativePool.default_name(), &is_atom/1, "an atom"),
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
      lazy: check(opts, :lazy, true, &is_boolean/1, "a boolean"),
      python: check(opts, :python, default_python(), &string?/1, "a path"),
      script: check(opts, :script, default_script(), &string?/1, "a path"),
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
          &non_neg_int?/1,
          "a timeout in ms"
        ),
      operation_timeout:
        check(
          opts,
          :operation_timeout,
          NativePool.default_operation_timeout(),
          &non_neg_int?/1,
          "a timeout in ms"
        ),
      start_timeout: check(opts, :start_timeout, 60_000, &pos_int?/1, "a timeout in ms"),
      max_frame_size:
        check(opts, :max_frame_size, 64 * 1024 * 1024, &pos_int?/1, "a size in bytes"),
      affinity:
        check(opts, :affinity, :prefer, &(&1 in [:prefer, :strict]), ":prefer or :strict"),
      affinity_wait: check(opts, :affinity_wait, 10, &non_neg_int?/1, "a time in ms"),
      overflow_idle_timeout:
        check(opts, :overflow_idle_timeout, 10_000, &pos_int?/1, "a time in ms"),
      shutdown_grace: check(opts, :shutdown_grace, 2_000, &non_neg_int?/1, "a time in ms"),
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
        )
    ]

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

  defp pos_int?(v), do: is_integer(v) and v > 0
  defp non_neg_int?(v), do: is_integer(v) and v >= 0
  defp string?(v), do: is_binary(v) and v != ""
  defp strings?(v), do: is_list(v) and Enum.all?(v, &is_binary/1)

  defp env?(v),
    do: is_list(v) and Enum.all?(v, &match?({k, val} when is_binary(k) and is_binary(val), &1))

  @doc "The interpreter of the project's venv when it exists, else `python3`."
  def default_python do
    venv = Path.join(priv_dir(), "python/.venv/bin/python")
    if File.exists?(venv), do: venv, else: System.find_executable("python3") || "python3"
  end

  defp default_script, do: Path.join(priv_dir(), "python/dspy_bridge.py")

  # The DSPy bridge is forked from a fork server that imported DSPy once; other scripts are
  # started afresh (through the same server, so the VM never forks per worker).
  defp default_start_method(script) do
    if script in [nil, default_script()], do: :fork_server, else: :spawn
  end

  defp priv_dir, do: :code.priv_dir(:dspex_native_pool) |> to_string()

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

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts, name: :"#{opts[:name]}.Server")

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    name = opts[:name]
    cache_dir = Path.join(System.tmp_dir!(), "dspex_native_pool_dspy_cache")

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
      python: opts[:python],
      script: opts[:script],
      start_method: opts[:start_method],
      fork_server: Path.join(priv_dir(), "python/fork_server.py"),
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

    table =
      :ets.new(:dspex_native_pool_sessions, [
        :set,
        :public,
        read_concurrency: true,
        write_concurrency: true
      ])

    pool = %{
      name: name,
      resource: resource,
      table: table,
      checkout_timeout: opts[:checkout_timeout],
      operation_timeout: opts[:operation_timeout],
      affinity: opts[:affinity],
      started_at: System.monotonic_time(:millisecond),
      telemetry?: Code.ensure_loaded?(:telemetry)
    }

    state = %{pool: pool, shutdown_grace: opts[:shutdown_grace], session_ttl: opts[:session_ttl]}

    case wait_until_ready(opts, state) do
      :ok ->
        :persistent_term.put({NativePool, name}, pool)

        Logger.info(
          "DSPex native pool #{inspect(name)} started (pool_size: #{opts[:pool_size]}, max_overflow: #{opts[:max_overflow]})"
        )

        schedule_session_sweep(state)
        {:ok, state}

      {:error, reason} ->
        Native.pool_stop(resource)
        {:stop, reason}
    end
  end

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

    cond do
      status.ready >= size ->
        :ok

      # An eager pool that cannot start a worker fails at once, saying why.
      status.counters.start_failures > 0 ->
        {:error, {:worker_start_failed, status.last_start_error}}

      true ->
        remaining = deadline - System.monotonic_time(:millisecond)

        receive do
          message ->
            handle_native(message, state)
            await_workers(state, size, deadline)
        after
          max(remaining, 0) -> {:error, {:worker_start_failed, "workers did not start in time"}}
        end
    end
  end

  @impl true
  def handle_info(:sweep_sessions, state) do
    # Sessions idle for longer than :session_ttl are ended, as SessionPoolV2 did, which also
    # frees their programs in the workers and the pool's record of them.
    cutoff = System.monotonic_time(:millisecond) - state.session_ttl

    stale =
      :ets.select(state.pool.table, [{{:"$1", :_, :"$2", :_}, [{:<, :"$2", cutoff}], [:"$1"]}])

    for session_id <- stale do
      Logger.debug("ending idle session #{inspect(session_id)}", pool: state.pool.name)
      :ets.delete(state.pool.table, session_id)
      Native.end_session(state.pool.resource, session_id)
    end

    schedule_session_sweep(state)
    {:noreply, state}
  end

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
    :persistent_term.erase({NativePool, state.pool.name})
    Native.pool_stop(state.pool.resource)
    # Workers get `shutdown`, then SIGTERM and SIGKILL after a grace period each.
    receive do
      {:dspex_native_pool_event, :stopped} -> :ok
    after
      state.shutdown_grace * 2 + 1_000 -> :ok
    end
  end
end
