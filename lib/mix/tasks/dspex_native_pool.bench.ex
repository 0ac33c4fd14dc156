defmodule Mix.Tasks.DspexNativePool.Bench do
  @shortdoc "Benchmarks NativePool against a bare Port, V1/V2-style pools, poolboy and raw Python"

  @moduledoc """
  Runs the benchmark scenarios and writes a markdown report.

      mix dspex_native_pool.bench                  # full run (several minutes)
      mix dspex_native_pool.bench --quick          # about a minute
      mix dspex_native_pool.bench --scenarios 1,2 --sizes 2,8 --out /tmp/bench.md

  Scenarios: 1 sequential ping latency; 2 throughput and p50/p99 latency for pool sizes x
  client concurrency; 3 32 x 50 ms sleeps on 8 workers; 4 checkout + checkin; 5 10,000
  processes queued on a pool of 2 (order, scheduler responsiveness); 6 DSPy workers (start-up,
  RSS, Predict executions/s; skipped with a note when `dspy_bridge.py` or dspy is unavailable);
  7 term/JSON conversion and 1 MiB payloads. The framing micro-benchmark
  (`cargo bench --bench framing`) runs at the end unless `--no-cargo`.

  ## Options

    * `--quick` - shorter runs and fewer sizes (about a minute in all)
    * `--scenarios 1,2,3` - which scenarios to run (default: all)
    * `--sizes 1,2,4,8` - pool sizes of scenario 2
    * `--concurrency 1,4,16,64,256` - client counts of scenario 2
    * `--out PATH` - the report (default: `bench/RESULTS.md`)
    * `--no-cargo` - skip the Rust framing benchmark
    * `--wait-quiet SECONDS` - before each scenario, wait up to this long for other processes
      to use under 5% of the machine (default: 5 with `--quick`, else 120; 0 disables). The
      report says how much CPU other processes used during each part either way.

  The machinery lives in `bench/` and is compiled only when this task runs. poolboy is
  Debian's `erlang-poolboy` (installed with apt-get when missing), not a mix dependency.
  """

  use Mix.Task

  @switches [
    quick: :boolean,
    scenarios: :string,
    sizes: :string,
    concurrency: :string,
    out: :string,
    no_cargo: :boolean,
    wait_quiet: :integer
  ]

  @bench_files ~w(support json baselines impls scenarios report runner)

  @impl Mix.Task
  def run(args) do
    {opts, _} = OptionParser.parse!(args, strict: @switches)
    Mix.Task.run("app.start")

    root = Path.dirname(Mix.Project.project_file())
    Enum.each(@bench_files, &Code.require_file("bench/#{&1}.ex", root))

    # Through a variable: the runner is compiled above, not with the project.
    runner = DSPexBench.Runner
    File.cd!(root, fn -> runner.run(opts) end)
  end
end
