defmodule Mix.Tasks.DspexNativePool.Bench do
  @shortdoc "Benchmarks NativePool against a bare Port, V1/V2-style pools, poolboy and raw Python"

  @moduledoc """
  Runs the benchmark scenarios and writes a markdown report.

      mix dspex_native_pool.bench                  # full run (several minutes)
      mix dspex_native_pool.bench --quick          # about a minute
      mix dspex_native_pool.bench --scenarios 1,2 --sizes 2,8 --out /tmp/bench.md

  Scenarios: 1 sequential ping latency in three placements (idle/normal; the VM pinned to
  CPU 0 before it starts, one scheduler, in a child VM; all CPUs busy with hog processes the
  bench starts and stops); 2 throughput and p50/p99 latency for pool sizes x
  client concurrency; 3 32 x 50 ms sleeps on 8 workers; 4 checkout + checkin; 5 10,000
  processes queued on a pool of 2 (order, scheduler responsiveness); 6 DSPy workers (start-up,
  RSS, Predict executions/s; skipped with a note when `dspy_bridge.py` or dspy is unavailable);
  7 term/JSON conversion and 1 MiB payloads; 8 DSPy start methods; 9 N concurrent DSPy
  sessions (50, 200, 1,000) x 1 `execute_program` against the local HTTP LM server answering
  after 0.5 s, pool_size 4: protocol 2 vs one request at a time per worker vs the V2 pattern
  (wall time, calls/s, p50/p99, Python memory). The framing micro-benchmark
  (`cargo bench --bench framing`) runs at the end unless `--no-cargo`.

  No instrumentation runs during a timed pass. Long schedules (`system_monitor` and a
  high-priority probe) are measured afterwards in a pass of their own: the scenarios again
  with the `--quick` settings. Every baseline decodes replies with a codec at least as fast as
  Jason (`bench/codec.ex`); its speed is measured at the start of each run.

  ## Options

    * `--quick` - shorter runs and fewer sizes (about a minute in all)
    * `--scenarios 1,2,3` - which scenarios to run (default: all)
    * `--sizes 1,2,4,8` - pool sizes of scenario 2
    * `--concurrency 1,4,16,64,256` - client counts of scenario 2
    * `--out PATH` - the report (default: `bench/RESULTS.md`)
    * `--no-cargo` - skip the Rust framing benchmark
    * `--placements normal,pinned,busy` - the placements of scenario 1 (default: all three)
    * `--sched 1,2,5` - the scenarios of the long-schedule pass (default: those selected, but
      6, 8 and 9); `--sched none` skips the pass
    * `--wait-quiet SECONDS` - before each scenario, wait up to this long for other processes
      to use under 5% of the machine (default: 5 with `--quick`, else 120; 0 disables). The
      report says how much CPU other processes used during each part either way.

  The machinery lives in `bench/` and is compiled only when this task runs. poolboy and jiffy
  are Debian's `erlang-poolboy` and `erlang-jiffy` (installed with apt-get when missing), not
  mix dependencies. `--child N:placement --child-out PATH` is internal: the pinned placement
  re-runs the task that way in a child VM.
  """

  use Mix.Task

  @switches [
    quick: :boolean,
    scenarios: :string,
    sizes: :string,
    concurrency: :string,
    out: :string,
    no_cargo: :boolean,
    wait_quiet: :integer,
    placements: :string,
    sched: :string,
    child: :string,
    child_out: :string
  ]

  @bench_files ~w(support json codec baselines impls placement scenarios lmload report runner)

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
