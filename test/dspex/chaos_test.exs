defmodule DSPex.NativePool.ChaosTest do
  # The short version of `mix dspex_native_pool.chaos`: every must-be-0 count must be 0.
  # Not async: the BEAM's fd count and the process scan must not see other tests' pools.
  use ExUnit.Case, async: false

  alias DSPex.NativePool.{Chaos, PoolCase}
  alias DSPex.PythonBridge.NativePool

  @moduletag :chaos

  defp chaos do
    Chaos.run(
      script: PoolCase.test_worker(),
      duration_ms: 6_000,
      stops: 1,
      seed: System.unique_integer([:positive])
    )
  end

  @tag timeout: 120_000
  test "200 callers on 4 workers through SIGKILLs, a SIGSTOP and killed holders: every reply right, nothing hung or left behind" do
    report = chaos()
    table = IO.iodata_to_binary(Chaos.format(report))
    assert Chaos.failures(report) == [], table

    # The chaos happened: the checks above are not vacuous.
    assert report.counts[:ok] > 100, table
    assert report.counts[:sigkills] >= 10, table
    assert report.counts[:sigstops] == 1, table
    assert report.counts[:callers_killed_holding] > 0, table
    assert report.after_stop.workers_seen > 10, table
  end

  # One worker, killed once when up and once while starting: one failed start is no reason to
  # refuse callers while the next start would succeed.
  test "a worker SIGKILLed during start-up does not make callers fail while the next start would succeed" do
    opts =
      PoolCase.start_pool(
        pool_size: 1,
        max_overflow: 0,
        env: [{"TEST_WORKER_START_DELAY_MS", "300"}]
      )

    [first] = NativePool.get_pool_status(opts).worker_pids
    {_, 0} = System.cmd("kill", ["-KILL", "#{first}"])

    # The replacement is starting (its start-up takes 300 ms): kill it there.
    starting =
      PoolCase.eventually(fn ->
        case NativePool.get_pool_status(opts) do
          %{worker_pids: [pid], starting: 1} when pid != first -> pid
          _ -> nil
        end
      end)

    {_, 0} = System.cmd("kill", ["-KILL", "#{starting}"])
    PoolCase.eventually(fn -> NativePool.get_pool_status(opts).counters.start_failures == 1 end)

    # Today: {:error, {:checkout_failed, "no worker could be started: it exited during
    # start-up (killed by signal 9)"}} within milliseconds.
    assert {:ok, %{"status" => "ok"}} =
             NativePool.execute_anonymous(:ping, %{}, opts ++ [pool_timeout: 5_000])
  end

  @tag timeout: 120_000
  test "a short soak: every reply right, no fd growth, samples taken" do
    report =
      Chaos.run(script: PoolCase.test_worker(), soak: true, calls: 20_000, sample_every: 5_000)

    table = IO.iodata_to_binary(Chaos.format(report))
    assert Chaos.failures(report) == [], table
    assert report.counts[:ok] >= 20_000, table
    assert length(report.samples) == 5, table
    # From the first sample after warm-up (overflow workers started) on, no fd grows.
    [_, warm | _] = report.samples
    assert List.last(report.samples).fds <= warm.fds, table
  end
end
