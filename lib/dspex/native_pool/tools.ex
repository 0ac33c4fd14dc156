defmodule DSPex.NativePool.Tools do
  @moduledoc false
  # Elixir functions as the tools of a ReAct agent running in Python (issue 12).
  #
  # A `tool_call` event (`%{"event" => "tool_call", "call_id" => k, "name" => s, "args" => map}`)
  # starts a runner under `DSPex.NativePool.TaskSupervisor`. The runner monitors the caller,
  # runs the function in a linked task, and answers the request with a `tool_result` control
  # frame: the function's value (`ok: true`), or, when it raises, throws, exits or outlives
  # `:tool_timeout`, an error string the agent reads as its observation (`ok: false`). The
  # caller's `receive` never waits on a tool, so chunks, other tool calls and the reply keep
  # flowing, and tools of different requests run at the same time. A caller that dies while a
  # tool runs takes the tool down (the pool cancels its request).

  alias DSPex.NativePool.Registry
  alias DSPex.PythonBridge.NativePool

  @supervisor DSPex.NativePool.TaskSupervisor
  @default_timeout 30_000

  @doc false
  def default_timeout, do: @default_timeout

  @doc false
  # `tools: %{name => fun/1}` (names as strings or atoms): normalised to string keys.
  def validate!(tools) when is_map(tools) do
    Map.new(tools, fn
      {name, fun} when (is_binary(name) or is_atom(name)) and is_function(fun, 1) ->
        {to_string(name), fun}

      other ->
        raise ArgumentError,
              "expected :tools to be a map of tool names to 1-arity functions, got: #{inspect(other)} in #{inspect(tools)}"
    end)
  end

  def validate!(tools) do
    raise ArgumentError,
          "expected :tools to be a map of tool names to 1-arity functions, got: #{inspect(tools)}"
  end

  @doc false
  # Answers one tool call of the request `lease` runs on `pool` (a `Server.fetch/1` map).
  # Returns at once.
  # `context`: `{tools given with the call, :tool_timeout, session id or nil}`; the session's
  # registered tools are looked up only here, when an agent calls one.
  def handle(pool, lease, %{"call_id" => call_id} = call, {tools, timeout, session}) do
    name = Map.get(call, "name")
    args = Map.get(call, "args") || %{}
    caller = self()
    tools = Map.merge(registered(session), tools || %{})

    case Map.fetch(tools, name) do
      {:ok, fun} ->
        {:ok, _} =
          Task.Supervisor.start_child(@supervisor, fn ->
            run(pool, lease, call_id, name, fun, args, timeout, caller)
          end)

        :ok

      :error ->
        known = tools |> Map.keys() |> Enum.sort()

        answer(
          pool,
          lease,
          call_id,
          {:error, "no Elixir function for tool #{inspect(name)} (given: #{inspect(known)})"}
        )
    end
  end

  def handle(_pool, _lease, _malformed, _context), do: :ok

  defp registered(nil), do: %{}

  defp registered(session) do
    case :ets.lookup(Registry.session_tools(), session) do
      [{_, tools}] -> tools
      [] -> %{}
    end
  end

  defp run(pool, lease, call_id, name, fun, args, timeout, caller) do
    watch = Process.monitor(caller)
    runner = self()
    # Not linked: a tool killed by an exit signal (its own or a linked process's) must still be
    # answered, so its death is seen through the monitor, not by dying with it.
    {pid, ref} = spawn_monitor(fn -> send(runner, {self(), apply_tool(fun, args)}) end)

    outcome =
      receive do
        {^pid, outcome} ->
          Process.demonitor(ref, [:flush])
          outcome

        {:DOWN, ^ref, :process, _, reason} ->
          {:error, "the Elixir tool #{name} exited: #{Exception.format_exit(reason)}"}

        {:DOWN, ^watch, :process, _, _} ->
          # The caller is gone: the pool cancels its request; nobody wants the answer.
          Process.exit(pid, :kill)
          exit(:normal)
      after
        timeout ->
          Process.exit(pid, :kill)
          {:error, "the Elixir tool #{name} timed out after #{timeout} ms"}
      end

    answer(pool, lease, call_id, outcome)
  end

  defp apply_tool(fun, args) do
    {:ok, fun.(args)}
  rescue
    e -> {:error, Exception.format_banner(:error, e, __STACKTRACE__)}
  catch
    kind, reason -> {:error, Exception.format_banner(kind, reason, __STACKTRACE__)}
  end

  # A request that ended meanwhile (cancelled, timed out) makes control/3 fail: nobody waits.
  defp answer(pool, lease, call_id, {:ok, result}) do
    body = %{control: "tool_result", call_id: call_id, ok: true, result: result}

    case control(pool, lease, body) do
      {:error, {:invalid_args, detail}} ->
        answer(
          pool,
          lease,
          call_id,
          {:error, "the tool's result cannot be sent as JSON: #{detail}"}
        )

      other ->
        other
    end
  end

  defp answer(pool, lease, call_id, {:error, message}) do
    control(pool, lease, %{control: "tool_result", call_id: call_id, ok: false, error: message})
  end

  defp control(pool, lease, body), do: NativePool.control_frame(pool.resource, lease, body)
end
