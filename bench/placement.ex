defmodule DSPexBench.Placement do
  @moduledoc false
  # Where a timed pass runs:
  #
  #   * `:normal` - in this VM, the OS placing threads and processes on the CPUs as it likes;
  #   * `:pinned` - in a child VM started under `taskset -c 0` with one scheduler (`+S 1:1`):
  #     the VM and every process it starts are on CPU 0 from the first instruction (pinning a
  #     running VM leaves its thread pools sized for every CPU);
  #   * `:busy` - in this VM while one hog process per CPU spins (started before the pass and
  #     killed after it; each also exits by itself after a bound, should the bench die).
  #
  # `run(placement, cfg, scenario, fun)` runs `fun.(cfg)` there (for `:pinned`, the child runs
  # `Scenarios.placement_pass(scenario).(cfg, :pinned)`) and returns its result.

  @all [:normal, :pinned, :busy]
  def all, do: @all

  def label(:normal), do: "idle, normal placement"
  def label(:pinned), do: "pinned to CPU 0 before VM start, 1 scheduler"
  def label(:busy), do: "all CPUs busy (hog processes)"

  def parse(text) do
    text
    |> String.split(",", trim: true)
    |> Enum.map(fn p ->
      atom = p |> String.trim() |> String.to_atom()

      if atom in @all,
        do: atom,
        else: raise(ArgumentError, "unknown placement, got: #{inspect(p)}")
    end)
  end

  def run(:normal, cfg, _scenario, fun), do: fun.(cfg)
  def run(:busy, cfg, _scenario, fun), do: with_hogs(cfg, fn -> fun.(cfg) end)
  def run(:pinned, cfg, scenario, _fun), do: pinned_child(cfg, scenario)

  # ---- pinned: a child VM ----------------------------------------------------------------

  defp pinned_child(cfg, scenario) do
    taskset = System.find_executable("taskset")
    elixir = System.find_executable("elixir")
    mix = System.find_executable("mix")

    if taskset && elixir && mix do
      out = Path.join(System.tmp_dir!(), "dspex_bench_#{System.unique_integer([:positive])}")

      args =
        ["-c", "0", elixir, "--erl", "+S 1:1", "-S", mix, "dspex_native_pool.bench"] ++
          ["--child", "#{scenario}:pinned", "--child-out", out] ++ cfg.child_args

      try do
        case System.cmd(taskset, args, stderr_to_stdout: true, env: [{"MIX_ENV", mix_env()}]) do
          {_, 0} ->
            out |> File.read!() |> :erlang.binary_to_term()

          {text, status} ->
            %{failed: "child VM exited with #{status}: #{String.slice(text, -1500, 1500)}"}
        end
      after
        File.rm(out)
      end
    else
      %{skipped: "taskset, elixir or mix not found"}
    end
  end

  defp mix_env, do: to_string(Mix.env())

  @doc "In the child VM: runs the pass and writes its result where the parent reads it."
  def child(spec, out, cfg) do
    [n, placement] = String.split(spec, ":")
    # Through a variable: bench/scenarios.ex is compiled after this file.
    scenarios = DSPexBench.Scenarios
    pass = scenarios.placement_pass(String.to_integer(n))
    result = pass.(cfg, String.to_existing_atom(placement))
    File.write!(out, :erlang.term_to_binary(result))
  end

  # ---- busy: hog processes ---------------------------------------------------------------

  @doc """
  Runs `fun` while one spinning process per CPU runs. Each hog is a Python loop that exits by
  itself after `cfg.hog_max_s` seconds; they are killed (by OS pid) once `fun` returns.
  The result gets `hogs: %{n, alive_at_end}` (false: a hog ended before the pass did).
  """
  def with_hogs(cfg, fun) do
    n = :erlang.system_info(:logical_processors)

    code =
      "import time\ne = time.monotonic() + #{cfg.hog_max_s}\n" <>
        "while time.monotonic() < e:\n    pass\n"

    hogs =
      for _ <- 1..n do
        port =
          Port.open({:spawn_executable, cfg.python}, [:binary, :exit_status, args: ["-c", code]])

        {:os_pid, os_pid} = Port.info(port, :os_pid)
        {port, os_pid}
      end

    # Let them reach full speed.
    Process.sleep(200)

    try do
      result = fun.()
      alive = Enum.all?(hogs, fn {port, _} -> Port.info(port) != nil end)

      if is_map(result),
        do: Map.put(result, :hogs, %{n: n, alive_at_end: alive}),
        else: result
    after
      Enum.each(hogs, fn {port, os_pid} ->
        # Only while its Port is open: the process has not exited (its pid is still its own).
        if Port.info(port) != nil,
          do: System.cmd("kill", ["-KILL", to_string(os_pid)], stderr_to_stdout: true)

        try do
          Port.close(port)
        rescue
          ArgumentError -> :ok
        end
      end)
    end
  end

  @doc "Seconds a hog may live: the pass is expected to take far less."
  def hog_bound(quick), do: if(quick, do: 180, else: 600)
end
