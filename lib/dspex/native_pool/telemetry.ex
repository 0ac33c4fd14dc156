defmodule DSPex.NativePool.Telemetry do
  @moduledoc """
  Telemetry events of the native pool. `:telemetry` is optional: without it, nothing is emitted.

    * `[:dspex_native_pool, :worker, :start]` - a worker answered its first ping.
      Measurements: `%{start_ms: integer}` (spawn to ready). Metadata: `%{pool:, worker_id:, pid:}`.
    * `[:dspex_native_pool, :worker, :exit]` - a worker process ended (recycled, crashed,
      retired or stopped). Measurements: `%{}`. Metadata: `%{pool:, worker_id:, reason:}`.
  """

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
