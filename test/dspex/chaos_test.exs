defmodule DSPex.NativePool.ChaosTest do
  # The short version of `mix dspex_native_pool.chaos`: every must-be-0 count must be 0.
  # Not async: the BEAM's fd count and the process scan must not see other tests' pools.
  use ExUnit.Case, async: false

  alias DSPex.NativePool.{Chaos, PoolCase}

  @moduletag :chaos

  @tag timeout: 120_000
  test "200 callers on 4 workers through SIGKILLs, a SIGSTOP and killed holders: every reply right, nothing hung or left behind" do
    report =
      Chaos.run(
        script: PoolCase.test_worker(),
        duration_ms: 6_000,
        stops: 1,
        seed: System.unique_integer([:positive])
      )

    table = IO.iodata_to_binary(Chaos.format(report))
    assert Chaos.failures(report) == [], table

    # The chaos happened: the checks above are not vacuous.
    assert report.counts[:ok] > 100, table
    assert report.counts[:sigkills] >= 10, table
    assert report.counts[:sigstops] == 1, table
    assert report.counts[:callers_killed_holding] > 0, table
    assert report.after_stop.workers_seen > 10, table
  end

  @tag timeout: 120_000
  test "a short soak: every reply right, no fd or thread growth, samples taken" do
    report =
      Chaos.run(script: PoolCase.test_worker(), soak: true, calls: 20_000, sample_every: 5_000)

    table = IO.iodata_to_binary(Chaos.format(report))
    assert Chaos.failures(report) == [], table
    assert report.counts[:ok] >= 20_000, table
    assert [first | _] = report.samples
    assert length(report.samples) == 5, table
    last = List.last(report.samples)
    assert last.fds == Enum.at(report.samples, 1).fds, table
    assert last.threads == first.threads, table
  end
end
