defmodule DSPex.PythonBridge.NativePool do
  @moduledoc """
  A pool of Python DSPy workers run by a Rust NIF, with the API of DSPex's
  `DSPex.PythonBridge.SessionPoolV2`: code that calls SessionPoolV2 works by changing the alias.

      {:ok, _} = DSPex.PythonBridge.NativePool.start_link(pool_size: 4)
      {:ok, %{"status" => "ok"}} = DSPex.PythonBridge.NativePool.execute_anonymous(:ping, %{})

  The wait for a worker and for its reply happens in the calling process: `execute_in_session/4`
  and `execute_anonymous/3` are one NIF call (which returns at once) and one `receive`. Checkout,
  the write to the worker, the read of its reply and checkin all happen in Rust; no GenServer
  sits on the path of a call.

  ## Options

    * `:name` - the pool's name, passed as `:pool` to calls (default: `#{inspect(__MODULE__)}`)
    * `:pool_size` - permanent workers (default: `System.schedulers_online() * 2`)
    * `:overflow` / `:max_overflow` - extra workers started while callers wait and every
      permanent worker is busy, retired after `:overflow_idle_timeout` ms idle (default: 2)
    * `:lazy` - start workers on first demand instead of at start-up (default: `true`); with
      `lazy: false`, `start_link/1` returns once every worker answered a ping, or an error
    * `:python` - interpreter (default: the venv of `mix dspex_native_pool.setup_python` when it
      exists, else `python3`)
    * `:script` - worker script (default: `priv/python/dspy_bridge.py`)
    * `:worker_args` - extra arguments for the script (default: `[]`)
    * `:env` - extra environment for workers, a list of `{name, value}` strings
    * `:checkout_timeout` - default `:pool_timeout` of calls, ms (default: 5_000)
    * `:operation_timeout` - default `:timeout` of calls, ms (default: 30_000)
    * `:start_timeout` - how long a worker may take to answer its first ping, ms (default: 60_000)
    * `:max_frame_size` - largest frame in either direction, bytes (default: 64 MiB)
    * `:affinity` - `:prefer` (default) or `:strict`, see "Sessions" below
    * `:affinity_wait` - how long a session waits for its busy home worker before it is
      re-created on a free one, ms (default: 10)
    * `:session_ttl` - sessions idle for longer are ended (their programs freed in every
      worker), checked every quarter of it up to every 5 minutes; `:infinity` keeps them
      (default: 3_600_000, one hour, as SessionPoolV2)
    * `:shutdown_grace` - on stop, how long a worker gets after `shutdown` before SIGTERM, and
      after SIGTERM before SIGKILL, ms (default: 2_000)

  ## Sessions

  A session's programs live in a Python process. The pool remembers what each session created
  (the `create_program` specs, the session's `configure_lm` arguments, minus what
  `delete_program` removed) and prefers the worker that already holds them. When that worker is
  busy for longer than `:affinity_wait`, crashed, or was recycled, the session is re-created on
  another worker with a `restore_session` command before its request runs, so a session always
  finds its programs. What is carried over: the programs as specified and the session's LM. What
  is not: Python state changed in place (for example demos set by an optimizer inside the
  worker). For such sessions pass `affinity: :strict`: the session then waits for its own worker,
  and if that worker dies its next call returns `{:error, {:session_lost, detail}}` once.

  A `configure_lm` without a session (see `DSPex.Adapters.PythonPoolNative.configure_lm/1`)
  configures every worker, present and future.

  ## Errors

  Calls return `{:ok, result}` or `{:error, reason}`; `reason` is one of:

    * a string: the command failed in Python, with Python's message
    * `{:pool_timeout, detail}` - no worker became free within `:pool_timeout`
    * `{:timeout, detail}` - the reply took longer than `:timeout`; the worker was recycled and
      its late reply can reach nobody
    * `{:worker_exited, %{exit_status: code | nil, detail: text}}` or
      `{:worker_exited, %{signal: n, detail: text}}` - the worker died mid-request
    * `{:decode_error, detail}` - the worker wrote something that is not a frame of JSON
      (it was recycled)
    * `:response_mismatch` - the worker answered another request's id (it was recycled)
    * `:malformed_response` - JSON that is not a protocol response (it was recycled)
    * `{:invalid_args, detail}` - the arguments cannot be encoded as JSON (a pid, a function, a
      non-UTF-8 binary, an integer beyond 64 bits, nesting over 250 levels, keys that collide
      once written, a struct with no JSON form: the README's "Limits"); nothing was sent
    * `{:checkout_failed, detail}` - the pool is stopping, no worker can be started (the detail
      says why, with the worker's stderr), or a checkout lost its worker
    * `{:session_lost, detail}` - a `:strict` session's worker died
  """

  use Supervisor

  alias DSPex.NativePool.{Checkout, Native, Server, Structs, Telemetry}

  @default_checkout_timeout 5_000
  @default_operation_timeout 30_000
  # Rust answers every request by its deadlines; this margin only guards against a bug there.
  @reply_margin 5_000

  @type session_id :: String.t() | atom()
  @type reason :: term()

  @doc false
  def default_name, do: __MODULE__

  @doc "Starts the pool (a supervisor around the process that owns the native pool)."
  @spec start_link(keyword()) :: Supervisor.on_start()
  def start_link(opts \\ []) do
    opts = Server.validate!(opts)

    case Supervisor.start_link(__MODULE__, opts, name: supervisor_name(opts[:name])) do
      # Say why the pool could not start, not how supervisors nest.
      {:error, {:shutdown, {:failed_to_start_child, Server, reason}}} -> {:error, reason}
      other -> other
    end
  end

  @doc false
  def child_spec(opts) do
    %{
      id: Keyword.get(opts, :name, __MODULE__),
      start: {__MODULE__, :start_link, [opts]},
      type: :supervisor,
      restart: :permanent,
      shutdown: 10_000
    }
  end

  @impl Supervisor
  def init(opts) do
    Supervisor.init([{Server, opts}], strategy: :one_for_one, max_restarts: 3, max_seconds: 5)
  end

  defp supervisor_name(name), do: :"#{name}.Supervisor"

  @doc """
  Runs `command` with `args` (a map) in session `session_id`; `args` gets `:session_id` added.

  Options: `:pool` (name), `:pool_timeout` (wait for a worker, ms), `:timeout` (wait for the
  reply, ms), `:affinity` (`:prefer` | `:strict`), `:retries` (how many times to run the
  request again, on another worker, when its worker died mid-request; default 0: only for
  commands that are safe to repeat, such as `execute_program`).
  """
  @spec execute_in_session(session_id(), atom() | String.t(), map(), keyword()) ::
          {:ok, term()} | {:error, reason()}
  def execute_in_session(session_id, command, args, opts \\ []) do
    session_id = to_string(session_id)

    with {:ok, pool} <- Server.fetch(opts[:pool]),
         :ok <- touch_session(pool.table, session_id),
         {:ok, args} <- args_map(args) do
      args = Map.put(args, :session_id, session_id)
      run(pool, session_mode(pool, session_id, opts), command, args, opts)
    end
  end

  @doc "Runs `command` with `args` on any worker, with no session. Options as `execute_in_session/4`."
  @spec execute_anonymous(atom() | String.t(), map(), keyword()) ::
          {:ok, term()} | {:error, reason()}
  def execute_anonymous(command, args, opts \\ []) do
    with {:ok, pool} <- Server.fetch(opts[:pool]),
         {:ok, args} <- args_map(args) do
      run(pool, :anonymous, command, args, opts)
    end
  end

  defp run(pool, mode, command, args, opts) do
    pool_timeout = Keyword.get(opts, :pool_timeout, pool.checkout_timeout)
    timeout = Keyword.get(opts, :timeout, pool.operation_timeout)
    retries = Keyword.get(opts, :retries, 0)
    meta = %{pool: pool.name, command: command, mode: mode}

    Telemetry.span(pool.telemetry?, :call, meta, fn ->
      run(pool, mode, command, args, pool_timeout, timeout, retries)
    end)
  end

  defp run(pool, mode, command, args, pool_timeout, timeout, retries) do
    ref = make_ref()

    reply =
      case Native.execute(pool.resource, ref, mode, command, args, pool_timeout, timeout) do
        # The receive stays here, next to make_ref/0, so the VM skips older messages.
        :ok ->
          receive do
            {^ref, reply} -> reply
          after
            pool_timeout + timeout + @reply_margin ->
              {:error, {:timeout, "no reply within #{pool_timeout + timeout} ms"}}
          end

        # Arguments too large to encode on a normal scheduler: a dirty one does it.
        :dirty ->
          pool.resource
          |> Native.execute_dirty(ref, mode, command, args, pool_timeout, timeout)
          |> then(fn
            :ok -> await(ref, pool_timeout + timeout)
            error -> error
          end)

        # {:error, _} or :structs
        other ->
          other
      end

    case reply do
      # The arguments hold structs: converted once (DateTime as ISO 8601...), then sent.
      :structs ->
        with {:ok, args} <- Structs.convert(args),
             do: run(pool, mode, command, args, pool_timeout, timeout, retries)

      {:error, {:worker_exited, _}} when retries > 0 ->
        run(pool, mode, command, args, pool_timeout, timeout, retries - 1)

      reply ->
        reply
    end
  end

  defp await(ref, ms) do
    receive do
      {^ref, reply} -> reply
    after
      ms + @reply_margin -> {:error, {:timeout, "no reply within #{ms} ms"}}
    end
  end

  defp args_map(args) when is_map(args), do: {:ok, args}
  defp args_map(args) when is_list(args), do: {:ok, Map.new(args)}

  defp args_map(args),
    do: {:error, {:invalid_args, "args must be a map, got: #{inspect(args)}"}}

  defp session_mode(pool, session_id, opts) do
    case Keyword.get(opts, :affinity, pool.affinity) do
      :strict -> {:session, session_id, :strict}
      _ -> {:session, session_id}
    end
  end

  # ---- checkouts -----------------------------------------------------------------------

  @doc """
  Checks out a worker for the calling process: `mode` is `:anonymous` or `{:session, id}`.

  The checkout is monitored: if the calling process exits, or drops the checkout, the worker
  goes back to the pool (and is recycled if a request was in flight). Options: `:pool`,
  `:pool_timeout`, `:affinity`.
  """
  @spec checkout(:anonymous | {:session, session_id()}, keyword()) ::
          {:ok, Checkout.t()} | {:error, reason()}
  def checkout(mode, opts \\ []) do
    case Server.fetch(opts[:pool]) do
      {:ok, pool} -> checkout(pool, mode, opts)
      error -> error
    end
  end

  defp checkout(pool, mode, opts) do
    pool_timeout = Keyword.get(opts, :pool_timeout, pool.checkout_timeout)

    {native_mode, session_id} =
      case mode do
        :anonymous ->
          {:anonymous, nil}

        {:session, id} ->
          id = to_string(id)
          touch_session(pool.table, id)
          {session_mode(pool, id, opts), id}
      end

    Telemetry.span(pool.telemetry?, :checkout, %{pool: pool.name, mode: native_mode}, fn ->
      wait_checkout(pool, native_mode, session_id, pool_timeout)
    end)
  end

  defp wait_checkout(pool, native_mode, session_id, pool_timeout) do
    ref = make_ref()
    checkout = &%Checkout{lease: &1, pool: pool, session_id: session_id}

    case Native.checkout(pool.resource, ref, native_mode, pool_timeout) do
      {:ok, lease} ->
        {:ok, checkout.(lease)}

      {:queued, lease} ->
        receive do
          {^ref, :ok} -> {:ok, checkout.(lease)}
          {^ref, {:error, _} = error} -> error
        after
          pool_timeout + @reply_margin ->
            Native.checkin(lease)
            {:error, {:pool_timeout, "no worker became available within #{pool_timeout} ms"}}
        end

      {:error, _} = error ->
        error
    end
  end

  @doc """
  Runs a command on a checked-out worker. A session checkout adds `:session_id` to `args`.
  Options: `:timeout`.
  """
  @spec call(Checkout.t(), atom() | String.t(), map(), keyword()) ::
          {:ok, term()} | {:error, reason()}
  def call(%Checkout{} = checkout, command, args, opts \\ []) do
    timeout = Keyword.get(opts, :timeout, checkout.pool.operation_timeout)

    with {:ok, args} <- args_map(args) do
      args =
        if checkout.session_id, do: Map.put(args, :session_id, checkout.session_id), else: args

      ref = make_ref()

      reply =
        case Native.call(checkout.lease, ref, command, args, timeout) do
          :ok ->
            receive do
              {^ref, reply} -> reply
            after
              timeout + @reply_margin -> {:error, {:timeout, "no reply within #{timeout} ms"}}
            end

          :dirty ->
            case Native.call_dirty(checkout.lease, ref, command, args, timeout) do
              :ok -> await(ref, timeout)
              other -> other
            end

          # {:error, _} or :structs
          other ->
            other
        end

      case reply do
        # As in run/7.
        :structs ->
          with {:ok, args} <- Structs.convert(args), do: call(checkout, command, args, opts)

        reply ->
          reply
      end
    end
  end

  @doc "Returns a checked-out worker to the pool. Idempotent."
  @spec checkin(Checkout.t()) :: :ok
  def checkin(%Checkout{lease: lease}), do: Native.checkin(lease)

  @doc """
  Checks out a worker, runs `fun.(checkout)` and checks it in, even if `fun` raises.
  Returns `fun`'s result, or `{:error, reason}` when no worker could be had.
  """
  @spec with_checkout(:anonymous | {:session, session_id()}, (Checkout.t() -> result), keyword()) ::
          result | {:error, reason()}
        when result: term()
  def with_checkout(mode, fun, opts \\ []) when is_function(fun, 1) do
    with {:ok, checkout} <- checkout(mode, opts) do
      try do
        fun.(checkout)
      after
        checkin(checkout)
      end
    end
  end

  # ---- sessions ------------------------------------------------------------------------

  @doc "Starts tracking a session (ETS; no process round trip)."
  @spec track_session(session_id(), keyword()) :: :ok
  def track_session(session_id, opts \\ []) do
    pool = Server.fetch!(opts[:pool])
    now = System.monotonic_time(:millisecond)
    :ets.insert_new(pool.table, {to_string(session_id), now, now, 0})
    :ok
  end

  @doc "Records activity on a session, tracking it if new."
  @spec update_session_activity(session_id(), keyword()) :: :ok
  def update_session_activity(session_id, opts \\ []) do
    pool = Server.fetch!(opts[:pool])
    touch_session(pool.table, to_string(session_id))
  end

  defp touch_session(table, session_id) do
    now = System.monotonic_time(:millisecond)
    :ets.update_counter(table, session_id, {4, 1}, {session_id, now, now, 0})
    :ets.update_element(table, session_id, {3, now})
    :ok
  end

  @doc "Ends a session: forgets it, and frees its programs in every worker that holds them."
  @spec end_session(session_id(), keyword()) :: :ok
  def end_session(session_id, opts \\ []) do
    pool = Server.fetch!(opts[:pool])
    session_id = to_string(session_id)
    :ets.delete(pool.table, session_id)
    Native.end_session(pool.resource, session_id)
  end

  @doc "Lists tracked sessions as `%{session_id:, started_at:, last_activity:, operations:}`."
  @spec get_session_info(keyword()) :: [map()]
  def get_session_info(opts \\ []) do
    pool = Server.fetch!(opts[:pool])

    for {id, started, last, ops} <- :ets.tab2list(pool.table) do
      %{session_id: id, started_at: started, last_activity: last, operations: ops}
    end
  end

  # ---- status --------------------------------------------------------------------------

  @doc """
  The pool's state: SessionPoolV2's keys (`pool_size`, `max_overflow`, `active_sessions`,
  `sessions`, `uptime_ms`) plus live worker counts (`ready`, `busy`, `starting`, `overflow`),
  `queued_callers`, `worker_pids`, `last_start_error` and `counters`.
  """
  @spec get_pool_status(keyword()) :: map()
  def get_pool_status(opts \\ []) do
    pool = Server.fetch!(opts[:pool])
    sessions = get_session_info(opts)

    pool.resource
    |> Native.status()
    |> Map.merge(%{
      active_sessions: length(sessions),
      sessions: sessions,
      uptime_ms: System.monotonic_time(:millisecond) - pool.started_at
    })
  end

  @doc """
  Pings every worker that is free (each on its own checkout; at least one, waiting for it if
  all are busy) and checks that workers can start.

  Returns `{:ok, :healthy}` or `{:error, {:unhealthy, reason}}`, where `reason` is the first
  failure (for example `{:checkout_failed, "no worker could be started: ..."}`).
  Options: `:pool`, `:timeout` (per ping and per wait for a worker, default 5_000).
  """
  @spec health_check(keyword()) :: {:ok, :healthy} | {:error, {:unhealthy, reason()}}
  def health_check(opts \\ []) do
    case Server.fetch(opts[:pool]) do
      {:ok, _} -> check_health(opts)
      {:error, reason} -> {:error, {:unhealthy, reason}}
    end
  end

  defp check_health(opts) do
    timeout = Keyword.get(opts, :timeout, 5_000)
    pool_opts = [pool_timeout: timeout, timeout: timeout] ++ Keyword.take(opts, [:pool])
    free = max(get_pool_status(opts).ready, 1)

    # Hold every checkout until all are pinged, so each ping lands on a different worker.
    {held, failures} =
      Enum.reduce(1..free, {[], []}, fn _, {held, failures} ->
        case checkout(:anonymous, pool_opts) do
          {:ok, checkout} -> {[checkout | held], failures}
          {:error, reason} -> {held, [reason | failures]}
        end
      end)

    try do
      pings = for checkout <- held, do: call(checkout, :ping, %{}, pool_opts)

      case Enum.reverse(failures) ++ for({:error, reason} <- pings, do: reason) do
        [] -> {:ok, :healthy}
        [reason | _] -> {:error, {:unhealthy, reason}}
      end
    after
      Enum.each(held, &checkin/1)
    end
  end

  @doc false
  def default_checkout_timeout, do: @default_checkout_timeout
  @doc false
  def default_operation_timeout, do: @default_operation_timeout
end
