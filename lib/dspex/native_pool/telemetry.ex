defmodule DSPex.NativePool.Telemetry do
  @moduledoc """
  Telemetry events of the native pool. `:telemetry` is optional: without it, nothing is emitted.

    * `[:dspex_native_pool, :call, :start | :stop | :exception]` - a span around
      `execute_in_session/4` and `execute_anonymous/3`. Measurements: `:system_time` (start),
      native-unit `:duration` (stop, exception). Metadata: `%{pool:, command:, mode:}`, plus
      `:result` (`:ok` or `{:error, reason}`) on stop.
    * `[:dspex_native_pool, :checkout, :start | :stop | :exception]` - a span around
      `checkout/2` (the wait for a worker). Metadata: `%{pool:, mode:}`, plus `:result` on stop.
    * `[:dspex_native_pool, :worker, :start]` - a worker answered its first ping.
      Measurements: `%{start_ms: integer}` (spawn to ready). Metadata: `%{pool:, worker_id:, pid:}`.
    * `[:dspex_native_pool, :worker, :exit]` - a worker process ended (recycled, crashed,
      retired or stopped). Measurements: `%{}`. Metadata: `%{pool:, worker_id:, reason:}`.
  """

  @doc false
  # Runs `fun` inside a telemetry span when `:telemetry` is loaded (checked once per pool).
  def span(false, _name, _meta, fun), do: fun.()

  def span(true, name, meta, fun) do
    apply(:telemetry, :span, [
      [:dspex_native_pool, name],
      meta,
      fn ->
        result = fun.()
        {result, Map.put(meta, :result, outcome(result))}
      end
    ])
  end

  defp outcome({:ok, _}), do: :ok
  defp outcome(other), do: other

  @doc false
  def worker_event(:worker_started, worker, meta) do
    emit([:dspex_native_pool, :worker, :start], %{start_ms: meta.start_ms}, %{
      pool: meta.pool,
      worker_id: worker,
      pid: meta.pid
    })
  end

  def worker_event(:worker_exited, worker, meta) do
    emit([:dspex_native_pool, :worker, :exit], %{}, %{
      pool: meta.pool,
      worker_id: worker,
      reason: meta.reason
    })
  end

  def worker_event(_event, _worker, _meta), do: :ok

  defp emit(event, measurements, metadata) do
    if Code.ensure_loaded?(:telemetry) do
      apply(:telemetry, :execute, [event, measurements, metadata])
    end

    :ok
  end
end
