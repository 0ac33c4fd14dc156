defmodule DSPexBench.Stats do
  @moduledoc false

  @doc "Summary of samples (any unit): n, median, p10, p50, p99, mean, min, max."
  def summarize([]),
    do: %{n: 0, median: nil, p10: nil, p50: nil, p99: nil, mean: nil, min: nil, max: nil}

  def summarize(samples) do
    sorted = Enum.sort(samples)
    n = length(sorted)
    tuple = List.to_tuple(sorted)

    %{
      n: n,
      median: pct(tuple, n, 0.5),
      p10: pct(tuple, n, 0.1),
      p50: pct(tuple, n, 0.5),
      p99: pct(tuple, n, 0.99),
      mean: Enum.sum(sorted) / n,
      min: elem(tuple, 0),
      max: elem(tuple, n - 1)
    }
  end

  defp pct(tuple, n, q), do: elem(tuple, min(n - 1, max(0, round(q * (n - 1)))))

  def median(samples), do: summarize(samples).median

  def native_to_us(native), do: native * 1_000_000 / System.convert_time_unit(1, :second, :native)

  def now, do: System.monotonic_time()

  def ratio(_, nil), do: nil
  def ratio(nil, _), do: nil
  def ratio(_, d) when d == 0, do: nil
  def ratio(a, b), do: a / b
end

defmodule DSPexBench.Fmt do
  @moduledoc false

  def num(nil), do: "–"
  def num(x) when is_integer(x), do: Integer.to_string(x)
  def num(x) when is_float(x) and x >= 100, do: :erlang.float_to_binary(x, decimals: 0)
  def num(x) when is_float(x) and x >= 10, do: :erlang.float_to_binary(x, decimals: 1)
  def num(x) when is_float(x), do: :erlang.float_to_binary(x, decimals: 2)
  def num(x), do: to_string(x)

  def ratio(nil), do: "–"
  def ratio(x), do: :erlang.float_to_binary(x / 1, decimals: 2) <> "x"

  def kops(nil), do: "–"
  def kops(x), do: :erlang.float_to_binary(x / 1000, decimals: 1) <> "k"

  def pct(nil), do: "–"
  def pct(x), do: :erlang.float_to_binary(x * 100, decimals: 0) <> "%"

  @doc "A markdown table."
  def table(header, rows) do
    rows = Enum.map(rows, fn row -> Enum.map(row, &cell/1) end)
    header = Enum.map(header, &cell/1)
    widths = widths([header | rows])

    line = fn cells ->
      cells
      |> Enum.zip(widths)
      |> Enum.map(fn {c, w} -> String.pad_trailing(c, w) end)
      |> Enum.join(" | ")
      |> then(&"| #{&1} |")
    end

    sep = "|" <> Enum.map_join(widths, "|", &String.duplicate("-", &1 + 2)) <> "|"
    Enum.join([line.(header), sep | Enum.map(rows, line)], "\n") <> "\n"
  end

  defp cell(c) when is_binary(c), do: c
  defp cell(c), do: num(c)

  defp widths(rows) do
    rows
    |> Enum.map(fn row -> Enum.map(row, &String.length/1) end)
    |> Enum.zip_with(&Enum.max/1)
  end
end

defmodule DSPexBench.Env do
  @moduledoc false

  def root, do: File.cwd!()

  def test_worker, do: Path.join(root(), "test/support/test_worker.py")
  def raw_floor, do: Path.join(root(), "bench/raw_floor.py")
  def dspy_script, do: Path.join(root(), "priv/python/dspy_bridge.py")

  @doc "The interpreter behind `python3` (resolved, so no pyenv shim sits in any spawn)."
  def python do
    exe = System.find_executable("python3") || raise "python3 not found"

    case System.cmd(exe, ["-c", "import sys; print(sys.executable)"], stderr_to_stdout: true) do
      {out, 0} -> String.trim(out)
      _ -> exe
    end
  end

  @doc "A Python with dspy installed, or nil."
  def dspy_python do
    Enum.find(
      [Path.join(root(), "priv/python/.venv/bin/python"), "/tmp/probe-venv/bin/python"],
      &File.exists?/1
    )
  end

  def info(python) do
    %{
      date: DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601(),
      cpus: :erlang.system_info(:logical_processors_available),
      schedulers: System.schedulers_online(),
      cpu_model: cpu_model(),
      otp: "#{System.otp_release()} (erts #{:erlang.system_info(:version)})",
      elixir: System.version(),
      python: cmd(python, ["--version"]),
      python_path: python,
      orjson: cmd(python, ["-c", "import orjson; print(orjson.__version__)"]),
      rustc: cmd("rustc", ["--version"]),
      kernel: cmd("uname", ["-sr"]),
      commit: cmd("git", ["rev-parse", "--short", "HEAD"]),
      dirty: cmd("git", ["status", "--porcelain"]) not in [nil, ""]
    }
  end

  defp cpu_model do
    case File.read("/proc/cpuinfo") do
      {:ok, text} ->
        case Regex.run(~r/model name\s*:\s*(.+)/, text) do
          [_, model] -> model
          _ -> "unknown"
        end

      _ ->
        "unknown"
    end
  end

  def cmd(exe, args) do
    case System.find_executable(exe) || (File.exists?(exe) && exe) do
      nil ->
        nil

      false ->
        nil

      path ->
        case System.cmd(path, args, stderr_to_stdout: true) do
          {out, 0} -> String.trim(out)
          _ -> nil
        end
    end
  end

  @doc """
  CPU accounting to tell the bench's own load from everything else on the machine: total busy
  and steal time (/proc/stat), and the CPU of this VM and all its descendants, reaped ones
  included (utime + stime + cutime + cstime over the process tree), all in clock ticks.
  """
  def cpu_snapshot do
    with {:ok, stat} <- File.read("/proc/stat"),
         ["cpu" | fields] <- stat |> String.split("\n") |> hd() |> String.split() do
      [user, nice, system, _idle, _iowait, irq, softirq, steal | _] =
        Enum.map(fields, &String.to_integer/1)

      %{busy: user + nice + system + irq + softirq, steal: steal, own: tree_ticks()}
    else
      _ -> nil
    end
  end

  @doc "Share of all CPUs used outside this VM's process tree, and stolen, between snapshots."
  def cpu_foreign(nil, _, _), do: nil
  def cpu_foreign(_, nil, _), do: nil

  def cpu_foreign(a, b, wall_ms) do
    ticks = wall_ms / 1000 * 100 * :erlang.system_info(:logical_processors)

    %{
      foreign: max(0, b.busy - a.busy - (b.own - a.own)) / ticks,
      steal: (b.steal - a.steal) / ticks,
      own: (b.own - a.own) / ticks
    }
  end

  defp tree_ticks do
    procs =
      for dir <- Path.wildcard("/proc/[0-9]*"),
          {:ok, text} <- [File.read(dir <> "/stat")],
          [_, rest] <- [String.split(text, ") ", parts: 2)] do
        f = String.split(rest)
        pid = dir |> Path.basename() |> String.to_integer()
        ppid = String.to_integer(Enum.at(f, 1))
        ticks = Enum.sum(Enum.map(11..14, &String.to_integer(Enum.at(f, &1))))
        {pid, ppid, ticks}
      end

    children = Enum.group_by(procs, &elem(&1, 1))
    ticks = Map.new(procs, fn {pid, _, t} -> {pid, t} end)
    sum_tree(String.to_integer(System.pid()), children, ticks)
  end

  defp sum_tree(pid, children, ticks) do
    Map.get(ticks, pid, 0) +
      (children
       |> Map.get(pid, [])
       |> Enum.map(&sum_tree(elem(&1, 0), children, ticks))
       |> Enum.sum())
  end

  @doc """
  Waits up to `max_s` seconds for a second in which processes outside this VM's tree use less
  than `threshold` of the machine (a test suite or a build next door skews every figure).
  """
  def wait_quiet(max_s, threshold \\ 0.05) do
    deadline = System.monotonic_time(:millisecond) + max_s * 1000
    quiet_loop(deadline, threshold)
  end

  defp quiet_loop(deadline, threshold) do
    a = cpu_snapshot()
    Process.sleep(1000)

    case cpu_foreign(a, cpu_snapshot(), 1000) do
      nil ->
        :unknown

      %{foreign: f} when f < threshold ->
        {:quiet, f}

      %{foreign: f} ->
        if System.monotonic_time(:millisecond) >= deadline,
          do: {:busy, f},
          else: quiet_loop(deadline, threshold)
    end
  end

  @doc "Proportional set size of an OS process (its shared pages split among their users), KiB."
  def pss_kib(os_pid) do
    with {:ok, text} <- File.read("/proc/#{os_pid}/smaps_rollup"),
         [_, kib] <- Regex.run(~r/^Pss:\s*(\d+)\s*kB/m, text) do
      String.to_integer(kib)
    else
      _ -> nil
    end
  end

  @doc "Parent pid of an OS process."
  def ppid(os_pid) do
    File.read!("/proc/#{os_pid}/stat") |> String.split(" ") |> Enum.at(3) |> String.to_integer()
  end

  @doc "VmRSS of an OS process, in KiB."
  def rss_kib(os_pid) do
    with {:ok, text} <- File.read("/proc/#{os_pid}/status"),
         [_, kib] <- Regex.run(~r/VmRSS:\s*(\d+)\s*kB/, text) do
      String.to_integer(kib)
    else
      _ -> nil
    end
  end
end

defmodule DSPexBench.Monitor do
  @moduledoc false
  # Scheduler responsiveness for the whole run, attributed to phases:
  #
  #   * `:erlang.system_monitor(pid, long_schedule: 1)`: every process or port that ran 1 ms
  #     or more without yielding (its `in`/`out` locations say where: a NIF shows as the
  #     MFA it was called from);
  #   * a probe process at `:high` priority that sleeps 1 ms in a loop and records how late it
  #     wakes up: a scheduler held by a NIF, a port or a long BIF delays it; runnable
  #     normal-priority processes do not.

  def start do
    parent = self()
    pid = spawn(fn -> collector(parent) end)
    :erlang.system_monitor(pid, long_schedule: 1)
    probe = spawn(fn -> Process.flag(:priority, :high) && probe(pid) end)

    receive do
      {:collector_ready, ^pid} -> :ok
    end

    :persistent_term.put({__MODULE__, :pids}, {pid, probe})
    :ok
  end

  def phase(name) do
    case :persistent_term.get({__MODULE__, :pids}, nil) do
      {pid, _} -> send(pid, {:phase, name})
      nil -> :ok
    end

    :ok
  end

  @doc "Per phase: %{long: [events], max_long_ms, probe_max_late_us}."
  def stop do
    {pid, probe} = :persistent_term.get({__MODULE__, :pids})
    :persistent_term.erase({__MODULE__, :pids})
    :erlang.system_monitor(:undefined)
    Process.exit(probe, :kill)
    ref = make_ref()
    send(pid, {:report, self(), ref})

    receive do
      {^ref, report} -> report
    after
      5_000 -> %{}
    end
  end

  defp collector(parent) do
    send(parent, {:collector_ready, self()})
    collect(:setup, %{})
  end

  defp collect(phase, acc) do
    receive do
      {:phase, name} ->
        collect(name, acc)

      {:monitor, who, :long_schedule, info} ->
        event = %{who: describe(who), ms: info[:timeout], in: info[:in], out: info[:out]}
        collect(phase, update(acc, phase, fn p -> %{p | long: [event | p.long]} end))

      {:late, us} ->
        collect(
          phase,
          update(acc, phase, fn p -> %{p | probe_max_late_us: max(p.probe_max_late_us, us)} end)
        )

      {:report, from, ref} ->
        report =
          Map.new(acc, fn {name, p} ->
            {name, Map.put(p, :max_long_ms, p.long |> Enum.map(& &1.ms) |> Enum.max(fn -> 0 end))}
          end)

        send(from, {ref, report})
    end
  end

  defp update(acc, phase, fun) do
    Map.update(acc, phase, fun.(%{long: [], probe_max_late_us: 0}), fun)
  end

  defp describe(pid) when is_pid(pid) do
    case Process.info(pid, [:registered_name, :initial_call, :current_function]) do
      nil -> inspect(pid)
      info -> "#{inspect(pid)} #{inspect(info[:registered_name] || info[:initial_call])}"
    end
  end

  defp describe(port) when is_port(port) do
    case Port.info(port, :name) do
      {:name, name} -> "#{inspect(port)} #{name}"
      _ -> inspect(port)
    end
  end

  defp describe(other), do: inspect(other)

  defp probe(collector) do
    t0 = System.monotonic_time(:microsecond)

    receive do
    after
      1 -> :ok
    end

    late = System.monotonic_time(:microsecond) - t0 - 1_000
    # Report only what matters, to keep the collector's mailbox short.
    if late > 200, do: send(collector, {:late, late})
    probe(collector)
  end
end

defmodule DSPexBench.Load do
  @moduledoc false
  # A closed loop: `concurrency` processes each call back to back for `duration_ms` after a
  # `warmup_ms`; completions that end inside the measured window count.

  alias DSPexBench.Stats

  @doc """
  `make_call` runs in each client process and returns the 0-arity function to call (so
  a client may set up what only it can own). Returns throughput (req/s), latency summary
  (µs), errors.
  """
  def run(make_call, concurrency, duration_ms, warmup_ms \\ 100) do
    parent = self()

    clients =
      for _ <- 1..concurrency do
        spawn_monitor(fn -> client(parent, make_call) end)
      end

    Enum.each(clients, fn {pid, _} ->
      receive do
        {:ready, ^pid} -> :ok
      after
        60_000 -> raise "client did not start"
      end
    end)

    start = Stats.now()
    measure_from = start + ms(warmup_ms)
    deadline = measure_from + ms(duration_ms)
    Enum.each(clients, fn {pid, _} -> send(pid, {:go, measure_from, deadline}) end)

    results = collect(clients, deadline, [])
    lats = Enum.flat_map(results, & &1.lats)
    count = Enum.sum(Enum.map(results, & &1.count))
    errors = Enum.sum(Enum.map(results, & &1.errors))
    first_error = Enum.find_value(results, & &1.first_error)
    window_s = (deadline - measure_from) / System.convert_time_unit(1, :second, :native)

    samples = Enum.map(lats, &Stats.native_to_us/1)

    %{
      throughput: count / window_s,
      count: count,
      errors: errors,
      first_error: first_error,
      lat: Stats.summarize(samples),
      samples: samples
    }
  end

  @doc "Merges repetitions: median throughput; latency over every sample; errors summed."
  def merge([one]), do: Map.delete(one, :samples)

  def merge(reps) do
    %{
      throughput: Stats.median(Enum.map(reps, & &1.throughput)),
      throughputs: Enum.map(reps, & &1.throughput),
      count: Enum.sum(Enum.map(reps, & &1.count)),
      errors: Enum.sum(Enum.map(reps, & &1.errors)),
      first_error: Enum.find_value(reps, & &1.first_error),
      lat: Stats.summarize(Enum.flat_map(reps, & &1.samples))
    }
  end

  defp ms(ms), do: System.convert_time_unit(ms, :millisecond, :native)

  defp client(parent, make_call) do
    call = make_call.()
    send(parent, {:ready, self()})

    receive do
      {:go, measure_from, deadline} ->
        send(parent, {:done, self(), loop(call, measure_from, deadline, [], 0, 0, nil)})
    end
  end

  defp loop(call, measure_from, deadline, lats, count, errors, first_error) do
    t0 = Stats.now()

    if t0 >= deadline do
      %{lats: lats, count: count, errors: errors, first_error: first_error}
    else
      result = call.()
      t1 = Stats.now()

      {errors, first_error} =
        case result do
          {:ok, _} -> {errors, first_error}
          :ok -> {errors, first_error}
          other -> {errors + 1, first_error || other}
        end

      if t1 >= measure_from and t1 < deadline do
        loop(call, measure_from, deadline, [t1 - t0 | lats], count + 1, errors, first_error)
      else
        loop(call, measure_from, deadline, lats, count, errors, first_error)
      end
    end
  end

  defp collect([], _deadline, acc), do: acc

  defp collect(clients, deadline, acc) do
    wait =
      max(0, System.convert_time_unit(deadline - Stats.now(), :native, :millisecond)) + 120_000

    receive do
      {:done, pid, result} ->
        {[{^pid, ref}], rest} = Enum.split_with(clients, fn {p, _} -> p == pid end)
        Process.demonitor(ref, [:flush])
        collect(rest, deadline, [result | acc])

      {:DOWN, ref, :process, pid, reason} ->
        rest = Enum.reject(clients, fn {p, r} -> p == pid and r == ref end)
        err = %{lats: [], count: 0, errors: 1, first_error: {:client_crashed, reason}}
        collect(rest, deadline, [err | acc])
    after
      wait ->
        Enum.each(clients, fn {pid, _} -> Process.exit(pid, :kill) end)
        err = %{lats: [], count: 0, errors: length(clients), first_error: :clients_stuck}
        [err | acc]
    end
  end
end
