defmodule DSPex.NativePool.PoolCase do
  @moduledoc false
  # Starts a pool of test workers (test/support/test_worker.py) per test, under a unique name.
  use ExUnit.CaseTemplate

  alias DSPex.PythonBridge.NativePool

  using do
    quote do
      import DSPex.NativePool.PoolCase
      alias DSPex.PythonBridge.NativePool
      alias DSPex.NativePool.Native
    end
  end

  def test_worker, do: Path.expand("test_worker.py", __DIR__)

  @doc "Starts a pool of test workers; returns the `opts` to pass to calls (`[pool: name]`)."
  def start_pool(opts \\ []) do
    name = :"pool_#{System.unique_integer([:positive])}"

    opts =
      Keyword.merge(
        [name: name, pool_size: 2, lazy: false, script: test_worker(), shutdown_grace: 200],
        opts
      )

    ExUnit.Callbacks.start_supervised!({NativePool, opts})
    [pool: opts[:name]]
  end

  @doc "Polls `fun` until it returns a truthy value (at most `ms`); for state the pool changes asynchronously."
  def eventually(fun, ms \\ 5_000) do
    deadline = System.monotonic_time(:millisecond) + ms
    poll(fun, deadline)
  end

  defp poll(fun, deadline) do
    case fun.() do
      result when result not in [nil, false] ->
        result

      _ ->
        if System.monotonic_time(:millisecond) > deadline do
          flunk("condition not reached in time")
        else
          Process.sleep(2)
          poll(fun, deadline)
        end
    end
  end

  def status(opts), do: NativePool.get_pool_status(opts)

  def alive?(os_pid), do: File.exists?("/proc/#{os_pid}") and not zombie?(os_pid)

  defp zombie?(os_pid) do
    case File.read("/proc/#{os_pid}/stat") do
      {:ok, stat} -> stat |> String.split(" ") |> Enum.at(2) == "Z"
      _ -> true
    end
  end

  @doc "The parent pid of an OS process."
  def ppid(os_pid) do
    File.read!("/proc/#{os_pid}/stat") |> String.split(" ") |> Enum.at(3) |> String.to_integer()
  end

  @doc """
  Waits for a child VM (a port with `:exit_status`, line mode) to print `READY beam pids` once
  its pool is up; returns `{beam_os_pid, worker_os_pids}`.
  """
  def await_ready(port) do
    receive do
      {^port, {:data, {:eol, "READY " <> rest}}} ->
        [beam, pids] = String.split(rest, " ")
        {beam, pids |> String.split(",") |> Enum.map(&String.to_integer/1)}

      {^port, {:data, _other}} ->
        await_ready(port)

      {^port, {:exit_status, status}} ->
        ExUnit.Assertions.flunk("the child VM exited with #{status}")
    after
      60_000 -> ExUnit.Assertions.flunk("the child VM did not start its pool")
    end
  end
end
