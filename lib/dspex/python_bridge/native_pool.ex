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

    * `:name` - the pool's name: its owner process is registered under it, and calls pass it as
      `:pool` (or `:"\#{name}_pool"`, V2's pool name, as `:pool_name`) (default:
      `#{inspect(__MODULE__)}`)
    * `:pool_size` - permanent workers (default: `System.schedulers_online() * 2`)
      (`:pool_size + :max_overflow` must fit the file descriptors the VM may open, about 4 per
      worker: a larger pool raises `ArgumentError` saying the RLIMIT_NOFILE limit)
    * `:overflow` / `:max_overflow` - extra workers started while callers wait and every
      permanent worker is busy, retired after `:overflow_idle_timeout` ms idle (default: 2)
    * `:lazy` / `:pool_lazy` - start workers on first demand instead of at start-up (default:
      `false`, or `config :dspex, pool_lazy: true`, as SessionPoolV2); with `lazy: false`,
      `start_link/1` returns once every worker answered a ping, or an error
    * `:retries` / `:max_retries` - the default `:retries` of calls (default: 0)
    * `:worker_module` - SessionPoolV2's NimblePool worker: accepted and ignored
    * `:python` - interpreter (default: the venv of `mix dspex_native_pool.setup_python` when it
      exists, else `python3`)
    * `:script` - worker script (default: `priv/python/dspy_bridge.py`)
    * `:start_method` - `:fork_server` (default for the DSPy bridge): workers are forks of one
      process per pool that imported the script (and DSPy) once, so they start in milliseconds
      and share memory; `:spawn` (default for any other `:script`): each worker is a fresh
      interpreter. Either way a helper process starts the workers, never the VM itself. A
      script the fork server cannot import once and run per worker (it needs a top-level
      `main(argv)`, run only under `if __name__ == "__main__"`) falls back to `:spawn`, with a
      warning in the log
    * `:worker_args` - extra arguments for the script (default: `[]`)
    * `:env` - extra environment for workers, a list of `{name, value}` strings
    * `:checkout_timeout` - default `:pool_timeout` of calls, ms or `:infinity` (default: 5_000)
    * `:operation_timeout` - default `:timeout` of calls, ms or `:infinity` (default: 30_000)
    * `:start_timeout` - how long a worker may take to answer its first ping, ms (default: 60_000)
    * `:max_frame_size` - largest frame in either direction, bytes (default: 64 MiB)
    * `:affinity` - `:prefer` (default) or `:strict`, see "Sessions" below
    * `:affinity_wait` - how long a session waits for its busy home worker before it is
      re-created on a free one, ms (default: 10)
    * `:session_ttl` - sessions idle for longer are ended (their programs freed in every
      worker), checked every quarter of it up to every 5 minutes; `:infinity` keeps them
      (default: 3_600_000, one hour, as SessionPoolV2)
    * `:shutdown_grace` - on stop, how long a worker gets after `shutdown` before SIGTERM, and
      after SIGTERM before SIGKILL, ms (default: 2_000); the child spec's `shutdown` is
      derived from it
    * `:worker_concurrency` - the most requests one worker runs at once (default: `nil`, what
      each worker announces). A worker that speaks protocol 2 (`priv/python/dspy_bridge.py`
      announces 64) runs up to the smaller of its announcement and this; a worker that
      announces nothing (DSPex's own bridge) runs one at a time whatever this says.
      `execute_in_session/4` and `execute_anonymous/3` fill the least-loaded worker with room (a
      session's home worker while it has room); a checkout always has a worker to itself
      (while one waits, busy workers take no new request, so that one frees up for it)
    * `:heartbeat_timeout` - a protocol-2 worker with requests in flight that sends nothing at
      all for this long is recycled; after a third of it without a frame it is pinged, ms
      (default: 30_000)

  Bad option values raise `ArgumentError` with `got: ...`; keys SessionPoolV2 never knew raise
  too.

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

  ## Streaming and Elixir tools

  `execute_stream/4` returns a `Stream` of an `execute_program`'s output fields as the LM writes
  them, then its result (the bridge runs the program under `dspy.streamify`):

      NativePool.execute_stream("chat", :execute_program, %{program_id: "qa", inputs: %{question: "Why?"}})
      |> Enum.each(fn
        {:chunk, field, text} -> IO.write(text)   # "reasoning" (ChainOfThought), then each output
        {:done, result} -> IO.inspect(result["outputs"])
        {:error, reason} -> IO.inspect(reason)
      end)

  Chunks arrive in order; joined per field they are the final outputs. Halting the stream
  before `{:done, _}` writes a `cancel` for the request and waits (up to 5 s) for the worker's
  `"cancelled"`, so nothing of it stays in the mailbox; a consumer that dies is a caller gone,
  which the pool cancels itself. Either way the worker stays.

  **A slow consumer.** The pool keeps no per-request buffer: each frame the worker writes is
  read at once and sent to the caller's mailbox, and the worker's asyncio task is never
  throttled (holding its frames back would hold back the LM's own stream, and the pipe, which
  other requests of the worker share). The mailbox is the buffer, and it is bounded by the
  answer itself: a request's chunks together are its output fields, which the LM's
  `max_tokens` and the pool's `:max_frame_size` already bound, the same memory the final reply
  takes. With `into: pid` the forwarder sends each element on at once, so the buffer is `pid`'s
  mailbox, with the same bound.

  A ReAct program created with tool declarations (`tools: [%{name: "lookup", description:
  "...", args: %{key: "string"}}]`, next to built-in tools such as `"calculator"`) gets their
  implementations per call:

      NativePool.execute_in_session("shop", :execute_program, %{program_id: "clerk", inputs: %{question: "q"}},
        tools: %{"lookup" => fn %{"key" => key} -> :ets.lookup(:stock, key) |> Map.new() end})

  Each tool call of the request runs `fun.(args)` (string keys) in a task of the pool's task
  supervisor, which monitors the caller; the caller's `receive` goes on meanwhile (chunks,
  other tool calls, the reply), and tools of other requests run at the same time, on the same
  worker or not. The function's value, as JSON, is the agent's observation. A raise, throw or
  exit, a value JSON cannot carry, or a function still running after `:tool_timeout` (it is
  killed) is sent as an error string the agent reads (`"Execution error in lookup: ..."`). A
  tool call for a name the call gave no function for is answered the same way. A caller that
  dies while its tool runs takes the task down, and the pool cancels the request.

  `:tools` and `:tool_timeout` are taken by `execute_in_session/4`, `execute_anonymous/3`,
  `call/4`, `execute_stream/4` and `DSPex.Adapters.PythonPoolNative.execute_program/3`. Tools
  can also be registered once per session with `register_tools/2`: they answer every later
  call of the session (a call's `:tools` take precedence), until `end_session/1`.

  ## Intermediate events and control frames (protocol 2)

  A request may get frames before its reply (`{"id": N, "event": ...}`, see
  `docs/protocol.md`): they reach the caller as `{ref, {:event, lease, map}}` messages, with
  the `ref` of its reply, before `{ref, reply}`. The calls of this module answer tool calls
  (see "Streaming and Elixir tools"), turn chunks into `execute_stream/4`'s elements, and skip
  other events.
  `control/3` writes a control frame for the request `lease` has in flight (for example
  `%{control: "tool_result", call_id: 1, ok: true, result: 3}`; the pool adds the id). Underneath
  it, `DSPex.NativePool.Native.control(pool_resource, lease, map)` returns `:ok`,
  `{:error, reason}`, `:dirty` for a body too large to encode on a normal scheduler (then call
  `Native.control_dirty/3`), or `:structs` for a body holding structs (convert it with
  `DSPex.NativePool.Structs.convert/1` and call again).

  ## Errors

  Calls return `{:ok, result}` or `{:error, reason}`; `reason` is one of:

    * a string: the command failed in Python, with Python's message
    * `{:pool_timeout, detail}` - no worker became free within `:pool_timeout`
    * `{:timeout, detail}` - the reply took longer than `:timeout`; a protocol-2 worker is sent a
      cancel for the request and keeps running, a one-at-a-time worker is recycled; either way
      its late reply can reach nobody
    * `{:worker_unresponsive, detail}` - a protocol-2 worker sent nothing at all, not even an
      answer to a heartbeat ping, for `:heartbeat_timeout` while the request was in flight; it
      was recycled (retried where `:retries` allows, like `:worker_exited`)
    * `{:worker_exited, %{exit_status: code | nil, detail: text}}` or
      `{:worker_exited, %{signal: n, detail: text}}` - the worker died mid-request
    * `{:decode_error, detail}` - the worker wrote something that is not a frame of JSON
      (it was recycled)
    * `:response_mismatch` - the worker answered another request's id (it was recycled)
    * `:malformed_response` - JSON that is not a protocol response (it was recycled). This
      includes a reply with `"id": null`, the bridge's answer to a request it could not parse:
      the pool cannot tell which request it was, so the worker's state is unknown
    * `{:invalid_args, detail}` - the arguments cannot be encoded as JSON (a pid, a function, a
      non-UTF-8 binary, an integer beyond 64 bits, nesting over 250 levels, keys that collide
      once written, a struct with no JSON form: the README's "Limits"); nothing was sent
    * `{:checkout_failed, detail}` - the pool is stopping, no worker can be started (start-up
      failed twice in a row and nothing else is up or starting; the detail says why, with the
      worker's stderr), or a checkout lost its worker
    * `{:session_lost, detail}` - a `:strict` session's worker died
    * `{:invalid_command, detail}` - the command is not an atom or a non-empty UTF-8 string
    * `{:invalid_session_id, detail}` - the session id is not a non-empty UTF-8 string, an atom
      or an integer
    * `{:invalid_mode, detail}` - `checkout/2` got a mode other than `:anonymous` or
      `{:session, id}`

  Bad call options (not a keyword list or a map, a timeout that is not `0..4294967295` or
  `:infinity`, an unknown `:affinity`, a negative `:retries`) raise `ArgumentError` with
  `got: ...` before anything is sent. Unknown call option keys are ignored, as SessionPoolV2 did.
  """

  alias DSPex.NativePool.{
    Checkout,
    Native,
    Registry,
    Server,
    Streaming,
    Structs,
    Telemetry,
    Tools
  }

  @default_checkout_timeout 5_000
  @default_operation_timeout 30_000
  # Rust answers every request by its deadlines; this margin only guards against a bug there.
  @reply_margin 5_000
  # The longest `receive ... after`; longer waits are :infinity.
  @max_wait 4_294_967_295
  # What :infinity means to the native pool (30 years, as Tokio's own "far future").
  @native_infinity 946_080_000_000

  # The call options, as strings: written so, they are refused rather than ignored.
  @option_names ~w(pool pool_name pool_timeout timeout affinity retries max_retries tools tool_timeout into)

  @type session_id :: String.t() | atom() | integer()
  @type reason :: term()
  @type options :: keyword() | map()

  @doc false
  def default_name, do: __MODULE__

  @doc """
  Starts the pool: a process registered under `:name` (`Process.whereis(name)` is its pid)
  that owns the native pool and its workers. Stopping it (`GenServer.stop(name)`, its
  supervisor, or its death) stops every worker and frees the name.

  Under a supervisor (a parent that traps exits) the pool stops its workers before it exits,
  within the child spec's `shutdown`; linked to a process that does not trap exits, it dies with
  that process at once, as SessionPoolV2 did, and its workers stop in the background.

  It answers `GenServer.call(name, :get_status)` (`get_pool_status/1`), `:get_pool_name`
  (`get_pool_name_for/1`) and `:health_check` as SessionPoolV2's process did.
  """
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    opts |> Server.validate!() |> Server.start_link()
  end

  @doc """
  A child spec. `shutdown` gives the pool time to stop its workers: 10 s, or more with a
  longer `:shutdown_grace` (`2 * shutdown_grace + 2_000`).
  """
  def child_spec(opts) do
    grace =
      case Keyword.keyword?(opts) && Keyword.get(opts, :shutdown_grace, 2_000) do
        grace when is_integer(grace) and grace >= 0 -> grace
        _ -> 2_000
      end

    %{
      id: (Keyword.keyword?(opts) && Keyword.get(opts, :name)) || __MODULE__,
      start: {__MODULE__, :start_link, [opts]},
      type: :worker,
      restart: :permanent,
      shutdown: Server.shutdown_timeout(grace)
    }
  end

  @doc """
  SessionPoolV2's name of the pool behind the process `name`: what DSPex code passes back as
  the `:pool_name` call option. Calls accept it, as they accept `name` itself as `:pool`.
  """
  @spec get_pool_name_for(atom() | pid()) :: atom()
  def get_pool_name_for(name \\ __MODULE__)

  def get_pool_name_for(pid) when is_pid(pid), do: get_pool_name_for(owner_name!(pid))

  def get_pool_name_for(name) when is_atom(name) do
    case Server.fetch(name) do
      {:ok, pool} ->
        Server.pool_name(pool.name)

      # Registered but not published yet (still starting): its process answers once it is up.
      {:error, _} ->
        if Process.whereis(name),
          do: GenServer.call(name, :get_pool_name),
          else: Server.fetch!(name)
    end
  end

  def get_pool_name_for(other),
    do: raise(ArgumentError, "expected a pool name (an atom) or its pid, got: #{inspect(other)}")

  # SessionPoolV2's functions took its process's pid too: the name the pool's owner is
  # registered under (every pool's owner is).
  defp owner_name!(pid) do
    case Process.info(pid, :registered_name) do
      {:registered_name, name} when is_atom(name) and name != [] ->
        name

      _ ->
        raise ArgumentError,
              "no DSPex.PythonBridge.NativePool is running as this process, got: #{inspect(pid)}"
    end
  end

  @doc """
  Runs `command` with `args` (a map) in session `session_id`; `args` gets `:session_id` added.

  Options (a keyword list or a map):

    * `:pool` or `:pool_name` - the pool's name, or what `get_pool_name_for/1` returned
      (default: `#{inspect(__MODULE__)}`)
    * `:pool_timeout` - wait for a worker, ms or `:infinity` (the pool's `:checkout_timeout`)
    * `:timeout` - wait for the reply, ms or `:infinity` (the pool's `:operation_timeout`)
    * `:affinity` - `:prefer` | `:strict`
    * `:retries` (or `:max_retries`) - how many times to run the request again, on another
      worker, when its worker died mid-request (the pool's `:retries`, default 0: use it only
      for commands that are safe to repeat, such as `execute_program`)
    * `:tools` - a map of tool names (strings or atoms) to 1-arity functions: the Elixir
      implementations of a ReAct program's declared tools (see "Streaming and Elixir tools")
    * `:tool_timeout` - how long one tool call may run, ms (default: 30_000)

  Other keys are ignored, as SessionPoolV2 did (keys that are not atoms too, but an option's
  name written as a string, such as `"pool_name"`, raises). A bad option value raises `ArgumentError`
  (`got: ...`) before anything is sent. Bad data returns an error: a command that is not an
  atom or a UTF-8 string (`{:invalid_command, detail}`), a session id that is not a UTF-8
  string, an atom or an integer (`{:invalid_session_id, detail}`), arguments that are not a map
  or cannot be encoded (`{:invalid_args, detail}`).
  """
  @spec execute_in_session(session_id(), atom() | String.t(), map(), options()) ::
          {:ok, term()} | {:error, reason()}
  def execute_in_session(session_id, command, args, opts \\ []) do
    opts = call_options!(opts)

    with {:ok, session_id} <- session_id(session_id),
         {:ok, command_name} <- command(command),
         {:ok, args} <- args_map(args),
         {:ok, pool} <- Server.fetch(opts[:pool]) do
      touch_session(session_id)
      args = with_session_id(args, session_id)
      run(pool, session_mode(pool, session_id, opts), command, command_name, args, opts)
    end
  end

  @doc "Runs `command` with `args` on any worker, with no session. Options as `execute_in_session/4`."
  @spec execute_anonymous(atom() | String.t(), map(), options()) ::
          {:ok, term()} | {:error, reason()}
  def execute_anonymous(command, args, opts \\ []) do
    opts = call_options!(opts)

    with {:ok, command_name} <- command(command),
         {:ok, args} <- args_map(args),
         {:ok, pool} <- Server.fetch(opts[:pool]) do
      run(pool, :anonymous, command, command_name, args, opts)
    end
  end

  defp run(pool, mode, command, command_name, args, opts) do
    pool_timeout = Keyword.get(opts, :pool_timeout, pool.checkout_timeout)
    timeout = Keyword.get(opts, :timeout, pool.operation_timeout)
    retries = Keyword.get(opts, :retries, pool.retries)
    meta = %{pool: pool.name, command: command, mode: mode}

    tools =
      tool_context(
        opts,
        case mode do
          :anonymous -> nil
          session -> elem(session, 1)
        end
      )

    Telemetry.span(pool.telemetry?, :call, meta, fn ->
      pool
      |> run(mode, command_name, args, pool_timeout, timeout, retries, tools)
      |> hint(pool)
    end)
  end

  defp run(pool, mode, command, args, pool_timeout, timeout, retries, tools) do
    ref = make_ref()
    native_pool_timeout = native_ms(pool_timeout)
    native_timeout = native_ms(timeout)
    wait = wait_ms(pool_timeout, timeout)

    reply =
      case Native.execute(
             pool.resource,
             ref,
             mode,
             command,
             args,
             native_pool_timeout,
             native_timeout,
             true
           ) do
        # The receive stays here, next to make_ref/0, so the VM skips older messages.
        :ok ->
          receive do
            # The worker's reply is readable: this process reads it (no other thread first).
            {^ref, {:"$dspex_readable", worker, lease}} ->
              read_reply(pool, ref, worker, lease, wait, tools)

            # An intermediate event (streaming, tool calls): the reply is still to come.
            {^ref, {:event, lease, event}} ->
              on_event(pool, lease, event, tools)
              await(ref, wait, pool, tools)

            {^ref, reply} ->
              reply
          after
            wait ->
              {:error,
               {:timeout, "no reply within #{inspect(pool_timeout)} + #{inspect(timeout)} ms"}}
          end

        # Arguments too large to encode on a normal scheduler: a dirty one does it.
        :dirty ->
          pool.resource
          |> Native.execute_dirty(
            ref,
            mode,
            command,
            args,
            native_pool_timeout,
            native_timeout,
            true
          )
          |> then(fn
            :ok -> await(ref, wait, pool, tools)
            error -> error
          end)

        # {:error, _} or :structs
        other ->
          other
      end

    flush_readable(ref)

    case reply do
      # The arguments hold structs: converted once (DateTime as ISO 8601...), then sent.
      :structs ->
        with {:ok, args} <- Structs.convert(args),
             do: run(pool, mode, command, args, pool_timeout, timeout, retries, tools)

      {:error, {tag, _}} when tag in [:worker_exited, :worker_unresponsive] and retries > 0 ->
        run(pool, mode, command, args, pool_timeout, timeout, retries - 1, tools)

      reply ->
        reply
    end
  end

  # The session's id replaces any the caller put in `args` (as SessionPoolV2's Map.put did);
  # a "session_id" string key next to the atom one would be refused as a colliding key.
  defp with_session_id(args, session_id),
    do: args |> Map.delete("session_id") |> Map.put(:session_id, session_id)

  defp await(ref, wait, pool, tools) do
    receive do
      {^ref, {:"$dspex_readable", worker, lease}} ->
        read_reply(pool, ref, worker, lease, wait, tools)

      {^ref, {:event, lease, event}} ->
        on_event(pool, lease, event, tools)
        await(ref, wait, pool, tools)

      {^ref, reply} ->
        reply
    after
      wait -> {:error, {:timeout, "no reply within #{wait} ms"}}
    end
  end

  # A worker's stdout can be armed for this caller twice (re-armed while a notification was
  # on its way). Once the call is over it is armed for someone else, and every notification
  # ERTS sent this caller is already in the mailbox: none outlives the call.
  defp flush_readable(ref) do
    receive do
      {^ref, {:"$dspex_readable", _, _}} -> flush_readable(ref)
    after
      0 -> :ok
    end
  end

  # Reads the worker's stdout in this process: the reply, or `:wait` (it comes later, or
  # events came first and are in the mailbox).
  defp read_reply(pool, ref, worker, lease, wait, tools) do
    case Native.read(pool.resource, worker, lease) do
      :wait -> await(ref, wait, pool, tools)
      reply -> reply
    end
  end

  # A tool call is always answered (with an error when no function was given for it), so an
  # agent never waits for a tool nobody runs; other events (chunks) are skipped here.
  defp on_event(pool, lease, %{"event" => "tool_call"} = call, tools),
    do: Tools.handle(pool, lease, call, tools)

  defp on_event(_pool, _lease, _event, _tools), do: :ok

  @doc false
  def tool_context(opts, session_id) do
    {Keyword.get(opts, :tools), Keyword.get(opts, :tool_timeout, Tools.default_timeout()),
     session_id}
  end

  @doc """
  Runs `command` (typically `:execute_program`) with `args` plus `stream: true`, and returns a
  `Stream` of what arrives: `{:chunk, field, text}` elements, in order, while the program
  writes its output fields, then one `{:done, result}` (the reply `execute_in_session/4`
  would have returned as `{:ok, result}`) or `{:error, reason}`.

  `target` is a session id, `:anonymous`, or a `DSPex.NativePool.Checkout` (the request runs
  on that worker). Options are `execute_in_session/4`'s, plus `:tools` and `:tool_timeout`
  (see "Streaming and Elixir tools" in the moduledoc) and:

    * `:into` - a pid: instead of a stream, returns `{:ok, ref}` at once and sends the
      elements to `pid` as `{ref, element}` messages (from a process of the pool's task
      supervisor, which cancels the request when `pid` exits)

  The request is sent when the stream is first enumerated, by the process that enumerates
  it. Halting the stream before `{:done, _}` (`Enum.take/2`, `Stream.take_while/2`, a raise)
  cancels the request in Python; the worker stays and serves others. A consumer that exits
  mid-stream cancels it too. Errors that prevent the request (a bad session id, no such pool)
  are the stream's only element, `{:error, reason}`; bad options raise `ArgumentError` here.

  A worker without protocol 2 (DSPex's own bridge) sends no chunks: the stream is then just
  `{:done, result}`.
  """
  @spec execute_stream(
          session_id() | :anonymous | Checkout.t(),
          atom() | String.t(),
          map(),
          options()
        ) ::
          Enumerable.t() | {:ok, reference()}
  def execute_stream(target, command, args, opts \\ []) do
    {into, opts} = pop_into!(opts)
    opts = call_options!(opts)

    tools =
      case target do
        %Checkout{session_id: session_id} -> tool_context(opts, session_id)
        :anonymous -> tool_context(opts, nil)
        session_id -> tool_context(opts, with({:ok, id} <- session_id(session_id), do: id))
      end

    start = fn -> start_stream(target, command, args, opts) end

    case into do
      nil -> Streaming.stream(start, tools)
      pid -> Streaming.into(start, tools, pid)
    end
  end

  defp pop_into!(opts) do
    case opts |> option_pairs!() |> Keyword.pop(:into) do
      {into, opts} when into == nil or is_pid(into) -> {into, opts}
      {into, _} -> bad_option!(:into, into, "a pid")
    end
  end

  defp start_stream(%Checkout{pool: %{resource: _}} = checkout, command, args, opts) do
    timeout = Keyword.get(opts, :timeout, checkout.pool.operation_timeout)

    with {:ok, command} <- command(command),
         {:ok, args} <- args_map(args) do
      args = Map.put(args, :stream, true)
      args = if checkout.session_id, do: with_session_id(args, checkout.session_id), else: args
      ref = make_ref()

      {resource, ms} = {checkout.pool.resource, native_ms(timeout)}

      send_call = fn args ->
        # A stream's consumer may pause between elements: the pool reads for it (false).
        case Native.call(resource, checkout.lease, ref, command, args, ms, false) do
          :dirty ->
            Native.call_dirty(resource, checkout.lease, ref, command, args, ms, false)

          other ->
            other
        end
      end

      with :ok <- with_structs(send_call, args),
           do: {:ok, ref, checkout.pool, wait_ms(timeout, 0)}
    end
  end

  defp start_stream(%Checkout{} = checkout, _command, _args, _opts),
    do: not_a_checkout(checkout)

  defp start_stream(target, command, args, opts) do
    with {:ok, mode, args} <- stream_mode(target, args, opts),
         {:ok, command} <- command(command),
         {:ok, args} <- args_map(args),
         {:ok, pool} <- Server.fetch(opts[:pool]) do
      pool_timeout = Keyword.get(opts, :pool_timeout, pool.checkout_timeout)
      timeout = Keyword.get(opts, :timeout, pool.operation_timeout)
      {native_pool_timeout, native_timeout} = {native_ms(pool_timeout), native_ms(timeout)}
      args = Map.put(args, :stream, true)
      ref = make_ref()
      mode = if mode == :anonymous, do: :anonymous, else: session_mode(pool, mode, opts)

      send_execute = fn args ->
        case Native.execute(
               pool.resource,
               ref,
               mode,
               command,
               args,
               native_pool_timeout,
               native_timeout,
               false
             ) do
          :dirty ->
            Native.execute_dirty(
              pool.resource,
              ref,
              mode,
              command,
              args,
              native_pool_timeout,
              native_timeout,
              false
            )

          other ->
            other
        end
      end

      case with_structs(send_execute, args) do
        :ok -> {:ok, ref, pool, wait_ms(pool_timeout, timeout)}
        {:error, reason} -> {:error, Server.with_hint(reason, pool)}
      end
    end
  end

  # Sends with `args` as they are, or once more with their structs converted (see run/8).
  defp with_structs(send_fun, args) do
    case send_fun.(args) do
      :structs -> with {:ok, args} <- Structs.convert(args), do: send_fun.(args)
      other -> other
    end
  end

  defp stream_mode(:anonymous, args, _opts), do: {:ok, :anonymous, args}

  defp stream_mode(session_id, args, _opts) do
    with {:ok, session_id} <- session_id(session_id),
         {:ok, args} <- args_map(args) do
      touch_session(session_id)
      {:ok, session_id, with_session_id(args, session_id)}
    end
  end

  # Without a venv, the first errors say how to set one up.
  defp hint({:error, reason}, %{setup_hint: hint} = pool) when is_binary(hint),
    do: {:error, Server.with_hint(reason, pool)}

  defp hint(reply, _pool), do: reply

  defp native_ms(:infinity), do: @native_infinity
  defp native_ms(ms), do: ms

  # How long a caller waits for the reply Rust always sends by its own deadlines.
  defp wait_ms(a, b) when a == :infinity or b == :infinity, do: :infinity

  defp wait_ms(a, b) do
    case a + b + @reply_margin do
      ms when ms > @max_wait -> :infinity
      ms -> ms
    end
  end

  # A struct is written as its JSON (a string for a DateTime), not an object: args it is not.
  defp args_map(%module{} = args) when is_atom(module),
    do:
      {:error,
       {:invalid_args,
        "args must be a map or a keyword list, got: #{inspect(args)} (a struct: put it under a key)"}}

  defp args_map(args) when is_map(args), do: {:ok, args}

  defp args_map(args) when is_list(args) do
    if Keyword.keyword?(args), do: {:ok, Map.new(args)}, else: invalid_args(args)
  end

  defp args_map(args), do: invalid_args(args)

  defp invalid_args(args),
    do: {:error, {:invalid_args, "args must be a map or a keyword list, got: #{inspect(args)}"}}

  defp command(command) when is_atom(command) and command != nil,
    do: {:ok, Atom.to_string(command)}

  defp command(command) when is_binary(command) and command != "" do
    if String.valid?(command), do: {:ok, command}, else: invalid_command(command)
  end

  defp command(command), do: invalid_command(command)

  defp invalid_command(command) do
    {:error,
     {:invalid_command,
      "expected the command to be an atom or a non-empty UTF-8 string, got: #{inspect(command)}"}}
  end

  @doc false
  def session_id(id) when is_binary(id) and id != "" do
    if String.valid?(id), do: {:ok, id}, else: invalid_session_id(id)
  end

  def session_id(id) when is_atom(id) and id not in [nil, :""], do: {:ok, Atom.to_string(id)}
  def session_id(id) when is_integer(id), do: {:ok, Integer.to_string(id)}
  def session_id(id), do: invalid_session_id(id)

  defp invalid_session_id(id) do
    {:error,
     {:invalid_session_id,
      "expected a session id to be a non-empty UTF-8 string, a non-empty atom or an integer, got: #{inspect(id)}"}}
  end

  # Call options: a keyword list or a map (SessionPoolV2 took both); values checked before
  # anything is sent; `:pool_name` and `:max_retries` are SessionPoolV2's names.
  defp call_options!(opts) do
    opts
    |> option_pairs!()
    |> Enum.reduce([], fn
      {key, value}, acc when key in [:pool, :pool_name] ->
        if value != nil and not is_atom(value),
          do: bad_option!(key, value, "a pool name (an atom)")

        if value == nil or Keyword.has_key?(acc, :pool), do: acc, else: [{:pool, value} | acc]

      {key, value}, acc when key in [:pool_timeout, :timeout] ->
        if Server.timeout?(value),
          do: [{key, value} | acc],
          else: bad_option!(key, value, "a timeout in ms (0..4294967295) or :infinity")

      {:affinity, value}, acc ->
        if value in [:prefer, :strict],
          do: [{:affinity, value} | acc],
          else: bad_option!(:affinity, value, ":prefer or :strict")

      {:tools, value}, acc ->
        [{:tools, Tools.validate!(value)} | acc]

      {:tool_timeout, value}, acc ->
        if is_integer(value) and value > 0 and value <= @max_wait,
          do: [{:tool_timeout, value} | acc],
          else: bad_option!(:tool_timeout, value, "a positive time in ms")

      {key, value}, acc when key in [:retries, :max_retries] ->
        cond do
          not (is_integer(value) and value >= 0) ->
            bad_option!(key, value, "a non-negative integer")

          Keyword.has_key?(acc, :retries) ->
            acc

          true ->
            [{:retries, value} | acc]
        end

      _ignored, acc ->
        acc
    end)
  end

  # A proper list of 2-tuples (an improper one too is refused, not a FunctionClauseError).
  defp pairs?([{_, _} | rest]), do: pairs?(rest)
  defp pairs?(rest), do: rest == []

  # The options as a keyword list. Keys that are not atoms are ignored, as SessionPoolV2's
  # Keyword.get ignored them, except an option's name written as a string: ignoring that one
  # would send the call elsewhere (`"pool_name"`) or with other timeouts than asked.
  defp option_pairs!(opts) when is_map(opts), do: opts |> Map.to_list() |> atom_keys!(opts)

  defp option_pairs!(opts) when is_list(opts) do
    if pairs?(opts) do
      atom_keys!(opts, opts)
    else
      raise ArgumentError,
            "expected the options to be a keyword list or a map, got: #{inspect(opts)}"
    end
  end

  defp option_pairs!(opts) do
    raise ArgumentError,
          "expected the options to be a keyword list or a map, got: #{inspect(opts)}"
  end

  defp atom_keys!(pairs, given) do
    Enum.filter(pairs, fn
      {key, _} when is_atom(key) ->
        true

      {key, _} when key in @option_names ->
        raise ArgumentError,
              "expected the options to be a keyword list or a map, got: #{inspect(given)} " <>
                "(the option #{inspect(key)} must be an atom key)"

      _ ->
        false
    end)
  end

  defp bad_option!(key, value, expected) do
    raise ArgumentError, "expected #{inspect(key)} to be #{expected}, got: #{inspect(value)}"
  end

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
  goes back to the pool (and is recycled if a request was in flight). Options: `:pool`
  (`:pool_name`), `:pool_timeout`, `:affinity`.
  """
  @spec checkout(:anonymous | {:session, session_id()}, options()) ::
          {:ok, Checkout.t()} | {:error, reason()}
  def checkout(mode, opts \\ []) do
    opts = call_options!(opts)

    with {:ok, mode} <- checkout_mode(mode),
         {:ok, pool} <- Server.fetch(opts[:pool]) do
      checkout(pool, mode, opts)
    end
  end

  defp checkout_mode(:anonymous), do: {:ok, :anonymous}

  defp checkout_mode({:session, id}) do
    with {:ok, id} <- session_id(id), do: {:ok, {:session, id}}
  end

  defp checkout_mode(mode) do
    {:error, {:invalid_mode, "expected :anonymous or {:session, id}, got: #{inspect(mode)}"}}
  end

  defp checkout(pool, mode, opts) do
    pool_timeout = Keyword.get(opts, :pool_timeout, pool.checkout_timeout)

    {native_mode, session_id} =
      case mode do
        :anonymous ->
          {:anonymous, nil}

        {:session, id} ->
          touch_session(id)
          {session_mode(pool, id, opts), id}
      end

    Telemetry.span(pool.telemetry?, :checkout, %{pool: pool.name, mode: native_mode}, fn ->
      pool |> wait_checkout(native_mode, session_id, pool_timeout) |> hint(pool)
    end)
  end

  defp wait_checkout(pool, native_mode, session_id, pool_timeout) do
    ref = make_ref()
    checkout = &%Checkout{lease: &1, pool: pool, session_id: session_id}

    case Native.checkout(pool.resource, ref, native_mode, native_ms(pool_timeout)) do
      {:ok, lease} ->
        {:ok, checkout.(lease)}

      {:queued, lease} ->
        receive do
          {^ref, :ok} -> {:ok, checkout.(lease)}
          {^ref, {:error, _} = error} -> error
        after
          wait_ms(pool_timeout, 0) ->
            Native.checkin(pool.resource, lease)
            {:error, {:pool_timeout, "no worker became available within #{pool_timeout} ms"}}
        end

      {:error, _} = error ->
        error
    end
  end

  @doc """
  Runs a command on a checked-out worker. A session checkout adds `:session_id` to `args`.
  Options: `:timeout` (ms or `:infinity`). Errors as `execute_in_session/4`.
  """
  @spec call(Checkout.t(), atom() | String.t(), map(), options()) ::
          {:ok, term()} | {:error, reason()}
  def call(checkout, command, args, opts \\ [])

  def call(%Checkout{pool: %{resource: _}} = checkout, command, args, opts) do
    opts = call_options!(opts)
    timeout = Keyword.get(opts, :timeout, checkout.pool.operation_timeout)

    with {:ok, command} <- command(command),
         {:ok, args} <- args_map(args) do
      args = if checkout.session_id, do: with_session_id(args, checkout.session_id), else: args

      ref = make_ref()
      wait = wait_ms(timeout, 0)

      tools = tool_context(opts, checkout.session_id)
      pool = checkout.pool
      {resource, ms} = {pool.resource, native_ms(timeout)}

      reply =
        case Native.call(resource, checkout.lease, ref, command, args, ms, true) do
          :ok ->
            receive do
              {^ref, {:"$dspex_readable", worker, lease}} ->
                read_reply(pool, ref, worker, lease, wait, tools)

              {^ref, {:event, lease, event}} ->
                on_event(pool, lease, event, tools)
                await(ref, wait, pool, tools)

              {^ref, reply} ->
                reply
            after
              wait -> {:error, {:timeout, "no reply within #{inspect(timeout)} ms"}}
            end

          :dirty ->
            case Native.call_dirty(resource, checkout.lease, ref, command, args, ms, true) do
              :ok -> await(ref, wait, pool, tools)
              other -> other
            end

          # {:error, _} or :structs
          other ->
            other
        end

      flush_readable(ref)

      case reply do
        # As in run/8.
        :structs ->
          with {:ok, args} <- Structs.convert(args), do: call(checkout, command, args, opts)

        reply ->
          reply
      end
    end
  end

  # A %Checkout{} whose pool is not a running pool's record (built by hand).
  def call(%Checkout{} = checkout, _command, _args, _opts), do: not_a_checkout(checkout)

  @doc """
  Writes a control frame (protocol 2) for the request in flight of `lease`, the integer of
  its `{ref, {:event, lease, map}}` messages: `body` is a map such as
  `%{control: "tool_result", call_id: 1, ok: true, result: 3}` (structs in it are written as in
  arguments). Options: `:pool` or `:pool_name`, as `execute_in_session/4`.

  Returns `:ok`, `{:error, {:checkout_failed, _}}` when no request of `lease` is in flight on a
  protocol 2 worker, or `{:error, {:invalid_args, _}}` for a body that cannot be a JSON object.
  """
  @spec control(non_neg_integer(), map(), options()) :: :ok | {:error, reason()}
  def control(lease, body, opts \\ [])

  def control(lease, body, opts) when is_integer(lease) and lease >= 0 do
    opts = call_options!(opts)
    with {:ok, pool} <- Server.fetch(opts[:pool]), do: control_frame(pool.resource, lease, body)
  end

  def control(lease, _body, _opts),
    do:
      {:error,
       {:invalid_args, "expected a lease (a non-negative integer), got: #{inspect(lease)}"}}

  @doc false
  def control_frame(resource, lease, body) do
    reply =
      case Native.control(resource, lease, body) do
        :dirty -> Native.control_dirty(resource, lease, body)
        other -> other
      end

    case reply do
      # As in run/8.
      :structs ->
        with {:ok, body} <- Structs.convert(body), do: control_frame(resource, lease, body)

      reply ->
        reply
    end
  end

  @doc """
  Returns a checked-out worker to the pool. Idempotent. Raises `ArgumentError` for a
  `%Checkout{}` that `checkout/2` did not make.
  """
  @spec checkin(Checkout.t()) :: :ok
  def checkin(%Checkout{lease: lease, pool: %{resource: resource}}) do
    case Native.checkin(resource, lease) do
      :ok -> :ok
      {:error, {:checkout_failed, why}} -> raise ArgumentError, "#{why}, got: #{inspect(lease)}"
    end
  end

  def checkin(%Checkout{} = checkout) do
    {:error, {:checkout_failed, why}} = not_a_checkout(checkout)
    raise ArgumentError, why
  end

  defp not_a_checkout(%Checkout{pool: pool}) do
    {:error,
     {:checkout_failed,
      "not a checkout made by checkout/2 (its pool is no running pool's), got pool: " <>
        inspect(pool)}}
  end

  @doc """
  Checks out a worker, runs `fun.(checkout)` and checks it in, even if `fun` raises.
  Returns `fun`'s result, or `{:error, reason}` when no worker could be had.
  """
  @spec with_checkout(:anonymous | {:session, session_id()}, (Checkout.t() -> result), options()) ::
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
  # One table for every pool, SessionPoolV2's own (`:dspex_pool_sessions`, rows
  # `{session_id, info}`): tracking works with no pool running, DSPex's test clean-up
  # (`:ets.delete_all_objects(:dspex_pool_sessions)`) clears it, and SessionPoolV2 running in
  # the same VM reads it.

  @doc "Starts tracking a session (ETS; no process round trip; no pool needed)."
  @spec track_session(session_id()) :: :ok | {:error, reason()}
  def track_session(session_id) do
    with {:ok, session_id} <- session_id(session_id) do
      now = System.monotonic_time(:millisecond)
      :ets.insert_new(Registry.sessions(), {session_id, session_info(session_id, now, 0)})
      :ok
    end
  end

  @doc "Records activity on a session, tracking it if new."
  @spec update_session_activity(session_id()) :: :ok | {:error, reason()}
  def update_session_activity(session_id) do
    with {:ok, session_id} <- session_id(session_id), do: touch_session(session_id)
  end

  defp session_info(session_id, now, operations),
    do: %{session_id: session_id, started_at: now, last_activity: now, operations: operations}

  # Lock-free: the row is replaced only if no other caller changed it meanwhile, else again.
  defp touch_session(session_id) do
    table = Registry.sessions()
    now = System.monotonic_time(:millisecond)

    case :ets.lookup(table, session_id) do
      [{_, %{operations: ops, last_activity: last} = info}] when is_integer(ops) ->
        new = %{info | last_activity: max(now, last), operations: ops + 1}
        spec = [{{session_id, info}, [], [{{session_id, {:const, new}}}]}]
        if :ets.select_replace(table, spec) == 1, do: :ok, else: touch_session(session_id)

      [] ->
        row = {session_id, session_info(session_id, now, 1)}
        if :ets.insert_new(table, row), do: :ok, else: touch_session(session_id)

      # A row not of this shape (written by other code): replaced.
      [_] ->
        :ets.insert(table, {session_id, session_info(session_id, now, 1)})
        :ok
    end
  end

  @doc """
  Ends a session: forgets it, and frees its programs in every worker of every running pool
  that holds them.
  """
  @spec end_session(session_id()) :: :ok | {:error, reason()}
  def end_session(session_id) do
    with {:ok, session_id} <- session_id(session_id) do
      :ets.delete(Registry.sessions(), session_id)
      :ets.delete(Registry.session_tools(), session_id)
      Enum.each(Registry.pools(), &Native.end_session(&1, session_id))
    end
  end

  @doc """
  Registers Elixir tools for a session: `tools` (a map of tool names to 1-arity functions, as
  the `:tools` call option) answer the tool calls of the session's ReAct programs in every
  later call, next to (and overridden by) the `:tools` a call gives. Replaces what the session
  had registered; `end_session/1` forgets them. Raises `ArgumentError` for a bad map.

      :ok = NativePool.register_tools("shop", %{"lookup" => &MyApp.Stock.lookup/1})
  """
  @spec register_tools(session_id(), %{optional(String.t() | atom()) => (map() -> term())}) ::
          :ok | {:error, reason()}
  def register_tools(session_id, tools) do
    tools = Tools.validate!(tools)

    with {:ok, session_id} <- session_id(session_id) do
      :ets.insert(Registry.session_tools(), {session_id, tools})
      :ok
    end
  end

  @doc "Lists tracked sessions as `%{session_id:, started_at:, last_activity:, operations:}`."
  @spec get_session_info() :: [map()]
  def get_session_info do
    for {_id, %{session_id: _} = info} <- :ets.tab2list(Registry.sessions()), do: info
  end

  # ---- status --------------------------------------------------------------------------

  @doc """
  The state of the pool `name` (its pid, or `[pool: name]`): SessionPoolV2's keys (`pool_size`,
  `max_overflow`, `active_sessions`, `sessions`, `uptime_ms`, `session_affinity`) plus live
  worker counts (`ready`, `busy`, `starting`, `overflow`), `queued_callers`, `worker_pids`,
  `last_start_error` and `counters`. A worker running requests counts as `busy`; `in_flight` is
  the callers' requests running on all workers and `capacity` how many they can run at once
  (1 per one-at-a-time worker).

  `session_affinity` is `%{}`, as SessionPoolV2's with its basic workers; with
  `worker_module: DSPex.PythonBridge.PoolWorkerV2Enhanced` it holds the pool's affinity mode and
  how many sessions were re-created on another worker (`%{mode:, restores:}`).
  Raises `ArgumentError` when no such pool is running.
  """
  @spec get_pool_status(atom() | pid() | options()) :: map()
  def get_pool_status(name_or_opts \\ [])

  def get_pool_status(name) when is_atom(name), do: get_pool_status(pool: name)
  def get_pool_status(pid) when is_pid(pid), do: get_pool_status(owner_name!(pid))

  def get_pool_status(opts) do
    pool = Server.fetch!(call_options!(opts)[:pool])
    sessions = get_session_info()
    status = Native.status(pool.resource)

    affinity =
      if pool.affinity_stats?,
        do: %{mode: pool.affinity, restores: status.counters.restores},
        else: %{}

    Map.merge(status, %{
      active_sessions: length(sessions),
      sessions: sessions,
      uptime_ms: System.monotonic_time(:millisecond) - pool.started_at,
      session_affinity: affinity
    })
  end

  @doc """
  Pings every worker that is free (each on its own checkout; at least one, waiting for it if
  all are busy) and checks that workers can start. Takes a pool name, its pid, or options.

  Returns `{:ok, :healthy}` or `{:error, {:unhealthy, reason}}`, where `reason` is the first
  failure (for example `{:checkout_failed, "no worker could be started: ..."}`).
  Options: `:pool` (`:pool_name`), `:timeout` (per ping and per wait for a worker, default 5_000).
  """
  @spec health_check(atom() | pid() | options()) ::
          {:ok, :healthy} | {:error, {:unhealthy, reason()}}
  def health_check(name_or_opts \\ [])

  def health_check(name) when is_atom(name), do: health_check(pool: name)

  def health_check(pid) when is_pid(pid) do
    health_check(owner_name!(pid))
  rescue
    e in ArgumentError -> {:error, {:unhealthy, {:checkout_failed, Exception.message(e)}}}
  end

  def health_check(opts) do
    opts = call_options!(opts)

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
