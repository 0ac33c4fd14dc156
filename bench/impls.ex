defmodule DSPexBench.Impls do
  @moduledoc false
  # One interface over the pool under test and the baseline pools:
  #
  #   start(kind, size, python, script) -> handle
  #   call(handle, command, args)       -> {:ok, result} | {:error, reason}   (any process)
  #   checkout_checkin(handle)          -> :ok                                 (scenario 4)
  #   stop(handle)
  #
  # Every handle started is remembered, so `stop_all/0` can clean up after a failure.

  alias DSPex.PythonBridge.NativePool
  alias DSPexBench.{Poolboy, V1Pool, V2Pool}

  @kinds [:native, :v2, :v1, :poolboy]
  def kinds, do: @kinds

  def label(:native), do: "NativePool"
  def label(:v2), do: "V2 (NimblePool pattern)"
  def label(:v1), do: "V1 (one GenServer)"
  def label(:poolboy), do: "poolboy"
  def label(:port), do: "bare Port"
  def label(:raw), do: "raw Python"

  def start(kind, size, python, script, extra \\ []) do
    DSPexBench.Monitor.phase({:pool_start, kind})
    do_start(kind, size, python, script, extra)
  end

  defp do_start(:native, size, python, script, extra) do
    name = :"dspex_bench_#{System.unique_integer([:positive])}"

    opts =
      [
        name: name,
        pool_size: size,
        max_overflow: 0,
        lazy: false,
        python: python,
        script: script,
        checkout_timeout: 120_000,
        operation_timeout: 120_000
      ] ++ extra

    {:ok, sup} = NativePool.start_link(opts)
    Process.unlink(sup)
    remember({:native, name, sup})
  end

  defp do_start(:v2, size, python, script, _extra) do
    {:ok, pid} = V2Pool.start_link(size: size, python: python, script: script)
    Process.unlink(pid)
    remember({:v2, pid})
  end

  defp do_start(:v1, size, python, script, _extra) do
    {:ok, pid} = V1Pool.start_link(size: size, python: python, script: script)
    Process.unlink(pid)
    remember({:v1, pid})
  end

  defp do_start(:poolboy, size, python, script, _extra) do
    :ok = Poolboy.ensure_loaded()
    {:ok, pid} = Poolboy.start_link(size: size, python: python, script: script)
    Process.unlink(pid)
    remember({:poolboy, pid})
  end

  def call({:native, name, _}, command, args),
    do: NativePool.execute_anonymous(command, args, pool: name)

  def call({:v2, pid}, command, args), do: V2Pool.execute_anonymous(pid, command, args)
  def call({:v1, pid}, command, args), do: V1Pool.execute_anonymous(pid, command, args)
  def call({:poolboy, pid}, command, args), do: Poolboy.execute_anonymous(pid, command, args)

  def checkout_checkin({:native, name, _}) do
    {:ok, checkout} = NativePool.checkout(:anonymous, pool: name)
    NativePool.checkin(checkout)
  end

  def checkout_checkin({:v2, pid}), do: V2Pool.checkout_checkin(pid)
  def checkout_checkin({:poolboy, pid}), do: Poolboy.checkout_checkin(pid)

  def stop(handle) do
    DSPexBench.Monitor.phase({:pool_stop, elem(handle, 0)})
    forget(handle)

    try do
      do_stop(handle)
    catch
      _, _ -> :ok
    end

    :ok
  end

  defp do_stop({:native, name, _}), do: GenServer.stop(name, :normal, 30_000)
  defp do_stop({:v2, pid}), do: V2Pool.stop(pid)
  defp do_stop({:v1, pid}), do: V1Pool.stop(pid)
  defp do_stop({:poolboy, pid}), do: Poolboy.stop(pid)

  def stop_all do
    Enum.each(live(), &stop/1)
  end

  # An ETS table, not :persistent_term: replacing a persistent term scans every process.
  defp table do
    case :ets.whereis(__MODULE__) do
      :undefined -> :ets.new(__MODULE__, [:named_table, :public, :set])
      tid -> tid
    end
  end

  defp live, do: Enum.map(:ets.tab2list(table()), &elem(&1, 0))

  defp remember(handle) do
    :ets.insert(table(), {handle})
    handle
  end

  defp forget(handle), do: :ets.delete(table(), handle)
end
