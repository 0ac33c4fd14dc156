defmodule DSPex.Adapters.PythonPoolNative do
  @moduledoc """
  A DSPex adapter backed by `DSPex.PythonBridge.NativePool`: a drop-in for
  `DSPex.Adapters.PythonPool` and `DSPex.Adapters.PythonPoolV2`, with the same public functions,
  arguments and return shapes.

      {:ok, _} = DSPex.PythonBridge.NativePool.start_link(pool_size: 4)
      :ok = DSPex.Adapters.PythonPoolNative.configure_lm(%{provider: "openai", model: "gpt-4o-mini"})

      {:ok, id} =
        DSPex.Adapters.PythonPoolNative.create_program(%{
          session_id: "user_123",
          signature: %{inputs: [%{name: "question"}], outputs: [%{name: "answer"}]}
        })

      {:ok, %{"outputs" => %{"answer" => _}}} =
        DSPex.Adapters.PythonPoolNative.execute_program(id, %{question: "2 + 2?"}, %{
          session_id: "user_123"
        })

  ## Using it from DSPex

  The module declares `@behaviour DSPex.Adapters.Adapter` when that module is available at
  compile time (already compiled, or compiled in the same project), so it compiles with and
  without DSPex. Used as a Mix dependency of DSPex it compiles first and declares nothing, which
  is harmless: the registry checks an adapter with `function_exported?/3`.
  DSPex's registry selects adapters from a compiled-in map; see the README's "Using it from
  DSPex" for the one line to change there and the config that goes with it.

  ## Sessions

  As in V2, every program command runs in a session: the `:session_id` of the config (for
  `create_program/1`) or of the options (every other function). Without one, the command runs
  in the session `"anonymous"`, which every caller without a session shares (V2 did the same).
  An explicit `session_id: nil` or `""` is refused with
  `{:error, "session_id is required in pool-worker mode"}` before anything is sent.

  Unlike V1/V2, a session finds its programs whichever worker serves it: the pool records each
  session's program specs and its session-scoped LM, and re-creates them on another worker when
  the one that held them is busy, crashed or was recycled. What carries over: programs as
  created (minus deleted ones) and the session's `configure_lm`. What does not: Python state
  changed in place inside the worker (for example demos set by an optimizer, or execution
  counters in `get_program_info/2`). `end_session/1` frees the session's programs in every
  worker.

  `configure_lm/1` without a `:session_id` configures every worker of the pool, present and
  future (V2 configured only the worker that served the call). With a `:session_id` it sets the
  LM of that session only, and the LM travels with the session.

  ## Options

  Where V2 took an options map (`execute_program/3`, `list_programs/1`, `delete_program/2`,
  `get_program_info/2`, `get_stats/1`, and the config of `create_program/1` and
  `configure_lm/1`), these keys are read by the adapter and not sent to Python:

    * `:session_id` - see above
    * `:pool` or `:pool_name` - the name of the pool (default: the `:pool` of
      `config :dspex_native_pool, #{inspect(__MODULE__)}`, else `DSPex.PythonBridge.NativePool`)
    * `:pool_timeout` - how long to wait for a free worker, ms (the pool's `:checkout_timeout`)
    * `:timeout` - how long to wait for the reply, ms (the pool's `:operation_timeout`)
    * `:affinity` - `:prefer` or `:strict`, see `DSPex.PythonBridge.NativePool`
    * `:retries` - how many times a request runs again on another worker when its worker died
      mid-request (default: 1 for `execute_program`, `list_programs`, `get_program_info` and
      `get_stats`, 0 for the commands that change a session); an LM call may then be made twice
    * `:tools`, `:tool_timeout` (`execute_program/3` only) - Elixir functions for the tools a
      ReAct program declared (`create_program(%{program_type: "react", tools: [%{name:,
      description:, args:}]})`), as `DSPex.PythonBridge.NativePool.execute_in_session/4` takes
      them; with `:tools` the default `:retries` is 0, so a tool never runs twice

  `:pool_name` (V2's name for the pool, from `NativePool.get_pool_name_for/1`) and
  `:max_retries` are accepted as V2 passed them. Options may be a map or a keyword list. Every
  public function of V2, with every arity, is here (`with_pool_name/1`, `configure_lm/2`,
  `session_adapter/2` with a pool name, ...).

  ## Errors

  Errors keep V2's shapes: pool errors V2 knew become its strings (`"Pool timeout: ..."`,
  `"Checkout failed: ..."`, `"Response decode error: ..."`, ...), a command that failed in Python
  returns Python's message (`"Program not found: p1"`), and the pool's newer reasons
  (`{:timeout, _}`, `{:worker_exited, _}`, `{:invalid_args, _}`, `{:session_lost, _}`) are
  returned as they are. A pool that is not running gives `"Checkout failed: ..."` (or
  `{:checkout_failed, detail}` from `health_check/0` and `configure_lm/1`, which V2 did not map
  either), as a stopped NimblePool did in V2. Sessions are tracked globally, as in V2:
  `start_session/2`, `end_session/1` and `get_session_info/0` work with no pool running.
  """

  alias DSPex.PythonBridge.NativePool

  require Logger

  @adapter_behaviour DSPex.Adapters.Adapter
  @type_converter DSPex.Adapters.TypeConverter

  # Code.ensure_compiled/1, not ensure_loaded?/1: when this file is compiled in the same
  # project as DSPex, the behaviour may still be compiling, and only ensure_compiled waits.
  # Callbacks differ between DSPex versions; @impl is set exactly on the ones the behaviour
  # declares, so neither version nor its absence produces a warning.
  @adapter_callbacks (case Code.ensure_compiled(@adapter_behaviour) do
                        {:module, adapter} -> adapter.behaviour_info(:callbacks)
                        {:error, _} -> []
                      end)
  if @adapter_callbacks != [], do: @behaviour(@adapter_behaviour)

  # Default session for anonymous operations, as in V1/V2.
  @default_session "anonymous"
  @call_opts [:pool, :pool_name, :pool_timeout, :timeout, :affinity, :retries, :max_retries]
  # Commands that change nothing a retry could double: run again on another worker when theirs
  # died mid-request (typically a worker that crashed while idle, just before this request).
  @repeatable [:execute_program, :list_programs, :get_program_info, :get_stats]
  @adapter_keys [:session_id | @call_opts]
  @tool_keys [:tools, :tool_timeout]
  @no_session "session_id is required in pool-worker mode"

  @type options :: map() | keyword()

  ## Adapter callbacks

  if {:create_program, 1} in @adapter_callbacks, do: @impl(true)

  @doc """
  Creates a program in the config's session; returns `{:ok, program_id}`.

  The config is V2's: `:signature` (a map of `inputs`/`outputs` field lists, or a DSPex
  signature module), optional `:id` (generated when missing), `:program_type` (`"predict"`,
  `"chain_of_thought"`, `"react"`), and the adapter keys of "Options".
  """
  @spec create_program(options()) :: {:ok, String.t()} | {:error, term()}
  def create_program(config) do
    config = to_map(config)

    with {:ok, session_id} <- session_id(config) do
      python_config = config |> Map.drop(@adapter_keys) |> convert_config()

      case call(session_id, :create_program, python_config, call_opts(config)) do
        {:ok, response} -> {:ok, extract_program_id(response)}
        {:error, reason} -> handle_pool_error(reason)
      end
    end
  end

  if {:execute_program, 2} in @adapter_callbacks, do: @impl(true)

  @doc "Runs a program with `inputs`; returns the worker's result (`\"outputs\"`, timings)."
  @spec execute_program(String.t(), map()) :: {:ok, map()} | {:error, term()}
  def execute_program(program_id, inputs) do
    execute_program(program_id, inputs, %{})
  end

  if {:execute_program, 3} in @adapter_callbacks, do: @impl(true)

  @spec execute_program(String.t(), map(), options() | nil) :: {:ok, map()} | {:error, term()}
  def execute_program(program_id, inputs, options) do
    options = to_map(options)

    with {:ok, session_id} <- session_id(options) do
      args = %{
        program_id: program_id,
        inputs: inputs,
        options: Map.drop(options, @adapter_keys ++ @tool_keys)
      }

      opts = tool_opts(options) ++ call_opts(options)

      case call(session_id, :execute_program, args, opts) do
        {:ok, response} -> {:ok, response}
        {:error, reason} -> handle_pool_error(reason)
      end
    end
  end

  if {:list_programs, 0} in @adapter_callbacks, do: @impl(true)

  @doc "Lists the ids of the programs of the session (`\"anonymous\"` without one)."
  @spec list_programs() :: {:ok, [String.t()]} | {:error, term()}
  def list_programs do
    list_programs(%{})
  end

  @spec list_programs(options()) :: {:ok, [String.t()]} | {:error, term()}
  def list_programs(options) do
    options = to_map(options)

    with {:ok, session_id} <- session_id(options) do
      case call(session_id, :list_programs, %{}, call_opts(options)) do
        {:ok, %{"programs" => programs}} -> {:ok, Enum.map(programs, &extract_program_id/1)}
        {:ok, %{programs: programs}} -> {:ok, Enum.map(programs, &extract_program_id/1)}
        {:ok, _other} -> handle_pool_error(:malformed_response)
        {:error, reason} -> handle_pool_error(reason)
      end
    end
  end

  if {:delete_program, 1} in @adapter_callbacks, do: @impl(true)

  @doc "Deletes a program of the session; `:ok`."
  @spec delete_program(String.t()) :: :ok | {:error, term()}
  def delete_program(program_id) do
    delete_program(program_id, %{})
  end

  @spec delete_program(String.t(), options()) :: :ok | {:error, term()}
  def delete_program(program_id, options) do
    options = to_map(options)

    with {:ok, session_id} <- session_id(options) do
      case call(session_id, :delete_program, %{program_id: program_id}, call_opts(options)) do
        {:ok, _} -> :ok
        {:error, reason} -> handle_pool_error(reason)
      end
    end
  end

  if {:get_program_info, 1} in @adapter_callbacks, do: @impl(true)

  @doc """
  The worker's description of a program (`"program_type"`, `"signature"`, `"spec"`, ...), plus
  `"id"`, `:id` and `:session_id` as in V2.
  """
  @spec get_program_info(String.t()) :: {:ok, map()} | {:error, term()}
  def get_program_info(program_id) do
    get_program_info(program_id, %{})
  end

  @spec get_program_info(String.t(), options()) :: {:ok, map()} | {:error, term()}
  def get_program_info(program_id, options) do
    options = to_map(options)

    with {:ok, session_id} <- session_id(options) do
      case call(session_id, :get_program_info, %{program_id: program_id}, call_opts(options)) do
        {:ok, info} when is_map(info) ->
          {:ok,
           Map.merge(info, %{"id" => program_id, :id => program_id, :session_id => session_id})}

        {:ok, _other} ->
          handle_pool_error(:malformed_response)

        {:error, reason} ->
          handle_pool_error(reason)
      end
    end
  end

  if {:health_check, 0} in @adapter_callbacks, do: @impl(true)

  @doc "Pings the pool's workers: `:ok` or `{:error, reason}`."
  @spec health_check() :: :ok | {:error, term()}
  def health_check, do: health_check([])

  @spec health_check(options()) :: :ok | {:error, term()}
  def health_check(options) do
    case NativePool.health_check(call_opts(to_map(options))) do
      {:ok, :healthy} -> :ok
      {:error, {:unhealthy, reason}} -> {:error, reason}
      {:error, reason} -> {:error, reason}
    end
  end

  if {:get_stats, 0} in @adapter_callbacks, do: @impl(true)

  @doc """
  `{:ok, stats}`: the pool's status (`NativePool.get_pool_status/1`: V2's keys plus worker
  counts) and, for a named session, the stats of the worker serving it (`"pid"`, `"session"`).
  `adapter_type` is V2's `:python_pool_v2`, so DSPex code that checks it keeps working;
  `implementation: :dspex_native_pool` tells the two apart.
  """
  @spec get_stats() :: {:ok, map()} | {:error, term()}
  def get_stats do
    get_stats(%{})
  end

  @spec get_stats(options()) :: {:ok, map()} | {:error, term()}
  def get_stats(options) do
    options = to_map(options)
    opts = call_opts(options)

    with {:ok, session_id} <- session_id(options),
         {:ok, pool_status} <- guard(fn -> {:ok, NativePool.get_pool_status(opts)} end) do
      session_stats =
        if session_id != @default_session do
          case call(session_id, :get_stats, %{}, opts) do
            {:ok, stats} when is_map(stats) -> stats
            _ -> %{}
          end
        else
          %{}
        end

      {:ok,
       %{
         # V2's value, for DSPex code and tests that check it; `implementation` says which.
         adapter_type: :python_pool_v2,
         implementation: :dspex_native_pool,
         layer: :production,
         pool_status: pool_status,
         session_stats: session_stats,
         python_execution: true,
         concurrent_sessions: true,
         true_concurrency: true
       }}
    else
      {:error, reason} -> handle_pool_error(reason)
    end
  end

  if {:configure_lm, 1} in @adapter_callbacks, do: @impl(true)

  @doc """
  Configures the LM: of every worker, present and future, or with `:session_id` of that session
  only. Config as the DSPy bridge takes it: `provider`, `model`, `api_key`, `temperature`, ...
  (`%{provider: "dummy"}` is an offline LM that answers any signature).
  """
  @spec configure_lm(options()) :: :ok | {:error, term()}
  def configure_lm(config) do
    config = to_map(config)
    lm_config = Map.drop(config, @adapter_keys)
    opts = call_opts(config)

    result =
      case Map.fetch(config, :session_id) do
        :error ->
          NativePool.execute_anonymous(:configure_lm, lm_config, opts)

        {:ok, _} ->
          with {:ok, session_id} <- session_id(config) do
            call(session_id, :configure_lm, lm_config, opts)
          end
      end

    case result do
      {:ok, %{"status" => "configured"}} -> :ok
      {:ok, %{status: "configured"}} -> :ok
      {:error, reason} -> {:error, reason}
      _ -> {:error, :configuration_failed}
    end
  end

  if {:configure_lm, 2} in @adapter_callbacks, do: @impl(true)

  @doc "`configure_lm/1` with V2's separate options (`:pool_name`, `:session_id`, timeouts)."
  @spec configure_lm(options(), options()) :: :ok | {:error, term()}
  def configure_lm(config, options) do
    configure_lm(Map.merge(to_map(config), Map.take(to_map(options), @adapter_keys)))
  end

  if {:supports_test_layer?, 1} in @adapter_callbacks, do: @impl(true)

  @doc "DSPex's test layers: this adapter runs real Python, so only `:production`, as V2."
  def supports_test_layer?(layer), do: layer == :production

  if {:get_test_capabilities, 0} in @adapter_callbacks, do: @impl(true)

  @doc "V2's capability map, plus `session_affinity: true`."
  def get_test_capabilities do
    %{
      python_execution: true,
      real_ml_models: true,
      protocol_validation: true,
      deterministic_outputs: false,
      performance: :highly_optimized,
      requires_environment: [:python, :dspy, :dspex_native_pool],
      concurrent_execution: true,
      true_concurrent_execution: true,
      session_isolation: true,
      session_affinity: true,
      production_ready: true
    }
  end

  ## Session management

  @doc """
  Starts a session: `{:ok, session_id}`. Tracks it at once (no pool needed), so it shows in
  `get_session_info/0`; V2 tracked it on first use.
  """
  @spec start_session(String.t() | atom(), options()) :: {:ok, String.t() | atom()}
  def start_session(session_id, _opts \\ []) do
    Logger.debug("Starting session: #{inspect(session_id)}")
    # Like V2, starting a session never fails.
    _ = NativePool.track_session(session_id)
    {:ok, session_id}
  end

  @doc "Ends a session and frees its programs in every worker: `:ok`."
  @spec end_session(String.t() | atom()) :: :ok | {:error, term()}
  def end_session(session_id), do: NativePool.end_session(session_id)

  @doc "Tracked sessions: `%{session_id:, started_at:, last_activity:, operations:}` each."
  @spec get_session_info() :: [map()]
  def get_session_info, do: NativePool.get_session_info()

  @doc """
  A map of the adapter's functions bound to `session_id` (V2's keys, plus `:configure_lm`
  for the session's LM and `:end_session`). The second argument is V2's pool name (what
  `NativePool.get_pool_name_for/1` returns, or the pool's name; `nil` for the default pool), or
  options (`:pool`, `:pool_name`, timeouts) to bind too.

      adapter = PythonPoolNative.session_adapter("user_123")
      {:ok, program_id} = adapter.create_program.(%{signature: signature})
  """
  @spec session_adapter(String.t() | atom(), atom() | options()) :: map()
  def session_adapter(session_id, pool_name_or_opts \\ nil) do
    bound =
      case pool_name_or_opts do
        nil ->
          %{}

        pool_name when is_atom(pool_name) ->
          %{pool_name: pool_name}

        opts when is_map(opts) or is_list(opts) ->
          opts |> to_map() |> Map.take(@call_opts)

        other ->
          raise ArgumentError, "expected a pool name (an atom) or options, got: #{inspect(other)}"
      end
      |> Map.put(:session_id, session_id)

    with_session = &Map.merge(to_map(&1), bound)

    %{
      create_program: fn config -> create_program(with_session.(config)) end,
      execute_program: fn program_id, inputs, options ->
        execute_program(program_id, inputs, with_session.(options))
      end,
      list_programs: fn -> list_programs(bound) end,
      delete_program: fn program_id -> delete_program(program_id, bound) end,
      get_program_info: fn program_id -> get_program_info(program_id, bound) end,
      get_stats: fn -> get_stats(bound) end,
      health_check: fn -> health_check(Map.delete(bound, :session_id)) end,
      configure_lm: fn config -> configure_lm(with_session.(config)) end,
      end_session: fn -> end_session(session_id) end,
      session_id: session_id
    }
  end

  @doc """
  V2's adapter bound to the pool `pool_name` (a pool's name, or what
  `NativePool.get_pool_name_for/1` returns): a map of functions with V2's keys.
  """
  @spec with_pool_name(atom()) :: map()
  def with_pool_name(pool_name) do
    pool = %{pool_name: pool_name}

    %{
      create_program: fn config -> create_program(Map.merge(to_map(config), pool)) end,
      execute_program: fn program_id, inputs, opts ->
        execute_program(program_id, inputs, Map.merge(to_map(opts), pool))
      end,
      list_programs: fn -> list_programs(pool) end,
      delete_program: fn program_id -> delete_program(program_id, pool) end,
      get_program_info: fn program_id -> get_program_info(program_id, pool) end,
      get_stats: fn -> get_stats(pool) end,
      health_check: fn -> health_check(pool) end,
      configure_lm: fn config -> configure_lm(config, pool) end,
      session_adapter: fn session_id -> session_adapter(session_id, pool_name) end
    }
  end

  ## Private functions

  defp call(session_id, command, args, opts) do
    opts = Keyword.put_new(opts, :retries, if(command in @repeatable, do: 1, else: 0))
    NativePool.execute_in_session(session_id, command, args, opts)
  end

  # get_pool_status/1 raises ArgumentError when no pool of that name runs; V2 returned
  # {:checkout_failed, _} for a stopped NimblePool, and so does this adapter.
  defp guard(fun) do
    fun.()
  rescue
    e in ArgumentError ->
      message = Exception.message(e)

      if message =~ "is running",
        do: {:error, {:checkout_failed, message}},
        else: reraise(e, __STACKTRACE__)
  end

  defp to_map(nil), do: %{}
  defp to_map(map) when is_map(map), do: map

  defp to_map(list) when is_list(list) do
    if Keyword.keyword?(list), do: Map.new(list), else: bad_options!(list)
  end

  defp to_map(other), do: bad_options!(other)

  defp bad_options!(other) do
    raise ArgumentError,
          "expected the config or options to be a map or a keyword list, got: #{inspect(other)}"
  end

  defp session_id(config_or_options) do
    case Map.get(config_or_options, :session_id, @default_session) do
      id when id in [nil, ""] -> {:error, @no_session}
      id -> {:ok, id}
    end
  end

  # Elixir tools (execute_program/3): passed to the pool, never to Python; a request that
  # runs them is not retried unless asked, since a tool may have run before its worker died.
  defp tool_opts(%{tools: _} = options) do
    retries = Map.get(options, :retries, Map.get(options, :max_retries, 0))
    [{:retries, retries} | options |> Map.take(@tool_keys) |> Map.to_list()]
  end

  defp tool_opts(options), do: options |> Map.take(@tool_keys) |> Map.to_list()

  defp call_opts(options) do
    opts = Map.take(options, @call_opts)

    if Map.get(opts, :pool) || Map.get(opts, :pool_name),
      do: Map.to_list(opts),
      else: [{:pool, default_pool()} | Map.to_list(opts)]
  end

  defp default_pool do
    Application.get_env(:dspex_native_pool, __MODULE__, [])[:pool] || NativePool.default_name()
  end

  defp convert_config(config) do
    config
    |> Map.new(fn
      {key, value} when key in [:signature, "signature"] ->
        {"signature", convert_signature(value)}

      {key, value} ->
        {to_string(key), value}
    end)
    |> ensure_program_id()
  end

  # A DSPex signature module; needs DSPex's TypeConverter (without DSPex it is sent as is and
  # the worker answers that a signature must be an object).
  defp convert_signature(signature) when is_atom(signature) and not is_nil(signature) do
    if Code.ensure_loaded?(@type_converter) and Code.ensure_loaded?(signature) do
      # apply/3: DSPex may be absent at compile time.
      apply(@type_converter, :convert_signature_to_format, [signature, :python])
    else
      signature
    end
  end

  defp convert_signature(signature) when is_map(signature) do
    Map.new(signature, fn
      {key, value} when key in [:inputs, "inputs"] -> {"inputs", convert_io_list(value)}
      {key, value} when key in [:outputs, "outputs"] -> {"outputs", convert_io_list(value)}
      {key, value} -> {to_string(key), value}
    end)
  end

  defp convert_signature(signature), do: signature

  defp convert_io_list(io_list) when is_list(io_list) do
    Enum.map(io_list, fn
      item when is_map(item) -> Map.new(item, fn {key, value} -> {to_string(key), value} end)
      item -> item
    end)
  end

  defp convert_io_list(io_list), do: io_list

  defp ensure_program_id(config) do
    case Map.get(config, "id") do
      id when id in [nil, ""] -> Map.put(config, "id", generate_program_id())
      _id -> config
    end
  end

  defp extract_program_id(response) when is_map(response) do
    Map.get(response, "program_id") ||
      Map.get(response, :program_id) ||
      Map.get(response, "id") ||
      Map.get(response, :id)
  end

  defp extract_program_id(id) when is_binary(id), do: id

  defp generate_program_id do
    "pool_#{:erlang.unique_integer([:positive])}_#{System.system_time(:microsecond)}"
  end

  defp handle_pool_error({:pool_timeout, reason}) do
    {:error, "Pool timeout: #{inspect(reason)}"}
  end

  defp handle_pool_error({:checkout_failed, reason}) do
    {:error, "Checkout failed: #{inspect(reason)}"}
  end

  defp handle_pool_error({:decode_error, reason}) do
    {:error, "Response decode error: #{inspect(reason)}"}
  end

  defp handle_pool_error(:response_mismatch) do
    {:error, "Response ID mismatch - possible concurrent operation conflict"}
  end

  defp handle_pool_error(:malformed_response) do
    {:error, "Malformed response from Python worker"}
  end

  defp handle_pool_error(reason) do
    {:error, reason}
  end
end
