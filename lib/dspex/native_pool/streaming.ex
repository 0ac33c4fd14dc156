defmodule DSPex.NativePool.Streaming do
  @moduledoc false
  # The Stream behind `NativePool.execute_stream/4` (issue 12).
  #
  # The process that enumerates the stream is the pool's caller: the request is sent when
  # enumeration starts, `chunk` events become `{:chunk, field, text}` elements, `tool_call`
  # events run the given Elixir tools (DSPex.NativePool.Tools), and the reply ends the stream
  # with `{:done, result}` or `{:error, reason}`. Halting early writes a `cancel` control frame
  # for the request and waits (at most @cancel_wait) for its final frame, so nothing of it is
  # left in the mailbox; a consumer that dies is a caller gone, which the pool cancels itself.

  alias DSPex.NativePool.{Server, Tools}
  alias DSPex.PythonBridge.NativePool

  # How long a halted stream waits for the worker to confirm the cancel.
  @cancel_wait 5_000

  @doc false
  # `start` runs in the enumerating process: `{:ok, ref, pool, wait}` once the request is
  # sent, or `{:error, reason}`.
  def stream(start, tools, watch \\ nil) do
    Stream.resource(
      fn -> begin(start, tools, watch) end,
      &next/1,
      &finish/1
    )
  end

  defp begin(start, tools, watch) do
    case start.() do
      {:ok, ref, pool, wait} ->
        %{ref: ref, pool: pool, wait: wait, tools: tools, watch: watch, lease: nil, done: false}

      {:error, _} = error ->
        %{error: error, done: false, watch: watch}
    end
  end

  defp next(%{done: done} = state) when done != false, do: {:halt, state}
  defp next(%{error: error} = state), do: {[error], %{state | done: true}}

  defp next(%{ref: ref, wait: wait, watch: watch} = state) do
    receive do
      {^ref, {:event, lease, %{"event" => "chunk", "field" => field, "text" => text}}} ->
        {[{:chunk, field, text}], %{state | lease: lease}}

      {^ref, {:event, lease, %{"event" => "tool_call"} = call}} ->
        Tools.handle(state.pool, lease, call, state.tools)
        {[], %{state | lease: lease}}

      {^ref, {:event, lease, _other}} ->
        {[], %{state | lease: lease}}

      {^ref, {:ok, result}} ->
        {[{:done, result}], %{state | done: true}}

      {^ref, {:error, reason}} ->
        {[{:error, Server.with_hint(reason, state.pool)}], %{state | done: true}}

      # `into:` mode: the receiver exited; halting cancels the request.
      {:DOWN, ^watch, :process, _, _} when watch != nil ->
        {:halt, state}
    after
      wait ->
        # Rust answers by its own deadlines; this only guards against a lost reply.
        {[{:error, {:timeout, "no frame within #{wait} ms"}}], %{state | done: :timed_out}}
    end
  end

  defp finish(%{done: true}), do: :ok
  defp finish(%{lease: nil}), do: :ok

  defp finish(%{ref: ref, pool: pool, lease: lease}) do
    case NativePool.control_frame(pool.resource, lease, %{control: "cancel"}) do
      :ok -> drain(ref, System.monotonic_time(:millisecond) + @cancel_wait)
      # The request already ended: its reply is on its way or here.
      {:error, _} -> drain(ref, System.monotonic_time(:millisecond))
    end
  end

  defp finish(_state), do: :ok

  # Waits for the request's final frame after a cancel, dropping its events.
  defp drain(ref, deadline) do
    receive do
      {^ref, {:event, _, _}} -> drain(ref, deadline)
      {^ref, _reply} -> :ok
    after
      max(deadline - System.monotonic_time(:millisecond), 0) -> :ok
    end
  end

  @doc false
  # `into: pid`: a forwarder under the task supervisor runs the stream and sends each element
  # to `pid` as `{ref, element}`; it monitors `pid`, and cancels the request when it exits.
  def into(start, tools, pid) do
    ref = make_ref()

    {:ok, _} =
      Task.Supervisor.start_child(DSPex.NativePool.TaskSupervisor, fn ->
        watch = Process.monitor(pid)

        start
        |> stream(tools, watch)
        |> Enum.each(&send(pid, {ref, &1}))
      end)

    {:ok, ref}
  end
end
