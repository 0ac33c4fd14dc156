defmodule Mix.Tasks.DspexNativePool.Doctor do
  @shortdoc "Checks what the DSPy worker pool needs, and says how to fix what is missing"
  @moduledoc """
  Checks, from this project or from a project that depends on `:dspex_native_pool`:

    * the Python interpreter the pool will run (`DSPex.NativePool.Python`);
    * the venv, and the DSPy and orjson versions in it against `priv/python/requirements.txt`;
    * that the NIF loads;
    * the file descriptor limit (RLIMIT_NOFILE) against the pool sizes (about 4 descriptors
      per worker);
    * which LM API keys are in the environment (names only, never values).

  Each problem is printed with the exact command that fixes it. Exits with status 1 when a
  check fails (warnings do not fail).

      mix dspex_native_pool.doctor
      mix dspex_native_pool.doctor --pool-size 32 --max-overflow 8

  Pool sizes default to `config :dspex_native_pool, pool_size: ..., max_overflow: ...`, else
  those of `config :dspex, DSPex.PythonBridge.SessionPoolV2` (`:pool_size`, `:overflow`), else
  the pool's defaults.
  """
  use Mix.Task

  alias DSPex.NativePool.{Python, Server}

  @lm_keys ~w(OPENAI_API_KEY GEMINI_API_KEY GOOGLE_API_KEY ANTHROPIC_API_KEY)

  @impl true
  def run(args) do
    {opts, _} = OptionParser.parse!(args, strict: [pool_size: :integer, max_overflow: :integer])

    for {key, min} <- [pool_size: 1, max_overflow: 0], (n = opts[key]) != nil and n < min do
      Mix.raise(
        "expected --#{String.replace(to_string(key), "_", "-")} to be at least #{min}, got: #{n}"
      )
    end

    Mix.Task.run("compile")
    Mix.Task.run("loadconfig")
    results = checks(opts)

    for {status, name, detail, fix} <- results do
      Mix.shell().info("#{label(status)} #{name}: #{detail}")
      if fix && status != :ok, do: Mix.shell().info("       fix: #{fix}")
    end

    if Enum.any?(results, &(elem(&1, 0) == :error)) do
      Mix.shell().error("dspex_native_pool.doctor found problems (see fix: lines above)")
      exit({:shutdown, 1})
    else
      Mix.shell().info("dspex_native_pool.doctor: all checks passed")
    end
  end

  defp label(:ok), do: "[ ok ]"
  defp label(:warn), do: "[warn]"
  defp label(:error), do: "[FAIL]"

  @doc false
  # Every check as `{:ok | :warn | :error, name, detail, fix_command_or_nil}`.
  def checks(opts \\ []) do
    python = python_check()
    [python, venv_check() | package_checks(python)] ++ [nif_check(), fd_check(opts), lm_check()]
  end

  defp setup, do: Python.setup_command()

  defp python_check do
    python = Python.default_python()

    case run_python(python, "import sys; print(sys.version.split()[0])") do
      {:ok, version} -> {:ok, "python", "#{python} (Python #{version})", nil}
      {:error, out} -> {:error, "python", "#{python} does not run: #{out}", install_python()}
    end
  end

  defp install_python, do: "apt-get install -y python3 python3-venv (then #{setup()})"

  defp venv_check do
    venv = Python.venv()

    if File.exists?(Path.join(venv, "bin/python")) do
      {:ok, "venv", venv, nil}
    else
      {:error, "venv",
       "no venv at #{venv} (#{Python.env_var()} or config :dspex_native_pool, :venv)", setup()}
    end
  end

  defp package_checks({:error, _, _, _}), do: []

  defp package_checks(_python) do
    python = Python.default_python()
    pins = pins()

    for package <- ["dspy", "orjson"] do
      wanted = pins[package]
      code = "import importlib.metadata as m; print(m.version(#{inspect(package)}))"

      case run_python(python, code) do
        {:ok, ^wanted} ->
          {:ok, package, wanted, nil}

        {:ok, version} when wanted == nil ->
          {:ok, package, version, nil}

        {:ok, version} ->
          {:warn, package, "#{version} installed, #{wanted} pinned", "#{setup()} --force"}

        {:error, _} ->
          {:error, package, "not installed for #{python}", setup()}
      end
    end
  end

  defp pins do
    path =
      Path.join(
        Mix.Tasks.DspexNativePool.SetupPython.package_root(),
        "priv/python/requirements.txt"
      )

    case File.read(path) do
      {:ok, text} ->
        for line <- String.split(text, "\n"),
            [_, name, version] <- [Regex.run(~r/^\s*([A-Za-z0-9_.-]+)==([^\s#]+)/, line)],
            into: %{},
            do: {String.downcase(name), version}

      {:error, _} ->
        %{}
    end
  end

  defp run_python(python, code) do
    case System.cmd(python, ["-c", code], stderr_to_stdout: true) do
      {out, 0} -> {:ok, String.trim(out)}
      {out, _} -> {:error, out |> String.trim() |> String.split("\n") |> List.last()}
    end
  rescue
    e in ErlangError -> {:error, inspect(e.original)}
  end

  defp nif_check do
    case Code.ensure_loaded(DSPex.NativePool.Native) do
      {:module, native} ->
        try do
          _ = native.live_leases()
          {:ok, "nif", "loaded", nil}
        rescue
          e ->
            {:error, "nif", "does not load: #{Exception.message(e)}", nif_fix()}
        end

      {:error, reason} ->
        {:error, "nif", "module not loaded: #{inspect(reason)}", nif_fix()}
    end
  end

  @doc false
  # In this project's own checkout it is not a dependency: `mix deps.compile` would say
  # "Unknown dependency dspex_native_pool".
  def nif_fix do
    if Mix.Project.config()[:app] == :dspex_native_pool,
      do: "mix compile --force",
      else: "mix deps.compile dspex_native_pool --force"
  end

  defp fd_check(opts) do
    {pool_size, max_overflow} = pool_sizes(opts)
    workers = pool_size + max_overflow

    case Server.fd_limit() do
      nil ->
        {:warn, "file descriptors", "limit unknown; #{workers} workers need about #{workers * 4}",
         nil}

      limit ->
        open = Server.open_fds()
        fit = div(max(limit - open - 64, 0), 4)

        detail =
          "limit #{limit}, #{open} open: up to #{fit} workers; configured #{pool_size} + #{max_overflow} overflow"

        if workers <= fit,
          do: {:ok, "file descriptors", detail, nil},
          else:
            {:error, "file descriptors", detail,
             "ulimit -n #{max(workers * 4 + open + 64, 1024)} (in the shell that starts the VM)"}
    end
  end

  defp pool_sizes(opts) do
    native = Application.get_all_env(:dspex_native_pool)
    v2 = Application.get_env(:dspex, DSPex.PythonBridge.SessionPoolV2, [])

    pool_size =
      opts[:pool_size] || native[:pool_size] || v2[:pool_size] || System.schedulers_online() * 2

    max_overflow = opts[:max_overflow] || native[:max_overflow] || v2[:overflow] || 2
    {pool_size, max_overflow}
  end

  defp lm_check do
    case Enum.filter(@lm_keys, &(System.get_env(&1) not in [nil, ""])) do
      [] ->
        {:warn, "LM keys",
         "none of #{Enum.join(@lm_keys, ", ")} is set: only the offline dummy/mock LM works",
         "export GEMINI_API_KEY=... (or OPENAI_API_KEY, ANTHROPIC_API_KEY)"}

      set ->
        {:ok, "LM keys", Enum.join(set, ", ") <> " set", nil}
    end
  end
end
