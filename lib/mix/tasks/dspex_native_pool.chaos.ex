defmodule Mix.Tasks.DspexNativePool.Chaos do
  @shortdoc "Reliability suite: mixed calls while workers are killed, stopped and holders die"

  @moduledoc """
  Runs the pool through chaos (or a soak) and prints the outcome as tables. Exits non-zero
  when a must-be-0 count is not 0, so CI can run a short version.

      mix dspex_native_pool.chaos                      # ~1 minute of chaos
      mix dspex_native_pool.chaos --duration 10        # shorter
      mix dspex_native_pool.chaos --soak               # 1M calls, resources sampled
      mix dspex_native_pool.chaos --soak --calls 200000

  Chaos: 200 callers on `pool_size: 4` run mixed work on `test/support/test_worker.py`
  (echo, ping and sleep through `execute_anonymous/3`, echo and `execute_program` in 8
  sessions through `execute_in_session/4`, `with_checkout/3` holding a worker for three
  calls, and 3% misbehaving requests: reply twice, unparseable, garbage JSON, wrong id, go
  silent, stderr flood, a grandchild left behind) while a worker is SIGKILLed every 200 ms,
  one is SIGSTOPped for 3 s (then SIGCONTed) four times, and a caller holding a checkout is
  killed every 150 ms. Every reply carries a nonce that is checked.

  Must be 0: wrong replies, session state lost, callers hung past their timeout + 1 s, API
  calls that raised, `{:checkout_failed, _}` while workers can start, undocumented error
  reasons, pool exits, status vs OS inconsistencies after settling (worker pids = the live
  children of the pool's fork-server helper, counts), open leases, zombies, stray Python
  processes, orphans after stop (any process that inherited the run's `DSPEX_CHAOS_RUN`
  environment variable), the helper left after stop, and the BEAM's fd growth.

  Soak: the same callers without chaos or misbehaving requests for `--calls` calls; BEAM
  memory, binary memory, fd count, OS threads and worker RSS are sampled every
  `--sample-every` calls (100,000) and their growth per that many calls is reported.

  ## Options

    * `--duration S` - chaos duration in seconds (default: 45)
    * `--soak` - soak mode; `--calls N` (default: 1,000,000), `--sample-every N`
    * `--callers N` (200), `--pool-size N` (4), `--sessions N` (8)
    * `--kill-every MS` (200), `--stops N` (4), `--stop-ms MS` (3000),
      `--caller-kill-every MS` (150)
    * `--no-misbehave` - no misbehaving requests
    * `--protocol 1|2` - the test worker's protocol (default: 1)
    * `--start-method fork_server|spawn` - default: the pool's default for the script
    * `--timeout MS` (1500), `--pool-timeout MS` (3000), `--patient-timeout MS` (5000, 10% of calls)
    * `--verbose` - keep the pool's log (warnings for each recycled worker, worker stderr)
    * `--script PATH` (`test/support/test_worker.py`), `--python PATH`, `--seed N`
  """

  use Mix.Task

  alias DSPex.NativePool.Chaos

  @switches [
    duration: :integer,
    soak: :boolean,
    calls: :integer,
    sample_every: :integer,
    callers: :integer,
    pool_size: :integer,
    sessions: :integer,
    kill_every: :integer,
    stops: :integer,
    stop_ms: :integer,
    caller_kill_every: :integer,
    misbehave: :boolean,
    protocol: :integer,
    start_method: :string,
    timeout: :integer,
    pool_timeout: :integer,
    patient_timeout: :integer,
    script: :string,
    python: :string,
    seed: :integer,
    verbose: :boolean
  ]

  @impl Mix.Task
  def run(args) do
    {opts, _} = OptionParser.parse!(args, strict: @switches)
    Mix.Task.run("app.start")
    # Every recycled worker is logged: thousands of lines here. --verbose keeps them.
    unless opts[:verbose], do: Logger.configure(level: :error)
    opts = Keyword.delete(opts, :verbose)
    root = Path.dirname(Mix.Project.project_file())

    opts =
      opts
      |> Keyword.put_new(:script, Path.join(root, "test/support/test_worker.py"))
      |> Keyword.update(:script, nil, &Path.expand/1)
      |> rename(:duration, :duration_ms, &(&1 * 1000))
      |> rename(:start_method, :start_method, &start_method/1)

    report = Chaos.run(opts)
    Mix.shell().info(IO.iodata_to_binary(Chaos.format(report)))

    case Chaos.failures(report) do
      [] ->
        Mix.shell().info("every must-be-0 check is 0")

      failures ->
        Mix.raise(
          "#{length(failures)} must-be-0 check(s) failed: " <>
            Enum.map_join(failures, "; ", fn {label, v} -> "#{label}: #{inspect(v)}" end)
        )
    end
  end

  defp rename(opts, from, to, fun) do
    case Keyword.pop(opts, from) do
      {nil, opts} -> opts
      {value, opts} -> Keyword.put(opts, to, fun.(value))
    end
  end

  defp start_method("fork_server"), do: :fork_server
  defp start_method("spawn"), do: :spawn

  defp start_method(other),
    do:
      raise(ArgumentError, "expected --start-method fork_server or spawn, got: #{inspect(other)}")
end
