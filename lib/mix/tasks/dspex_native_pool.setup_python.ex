defmodule Mix.Tasks.DspexNativePool.SetupPython do
  @shortdoc "Creates the Python venv for the DSPy workers"
  @moduledoc """
  Creates the Python venv of the DSPy workers and installs this package's
  `priv/python/requirements.txt` into it (DSPy 3.4.1, orjson). Run it from this project or from
  any project that depends on `:dspex_native_pool` (`path:`, `git:` or hex): it reads the
  dependency's own files.

      mix dspex_native_pool.setup_python                 # create or update
      mix dspex_native_pool.setup_python --force         # reinstall
      mix dspex_native_pool.setup_python --if-missing    # quiet no-op when up to date
      mix dspex_native_pool.setup_python --venv DIR      # somewhere else

  Where the venv goes, in this order (the pool looks in the same places at runtime, see
  `DSPex.NativePool.Python`): `--venv`, the `DSPEX_NATIVE_POOL_VENV` environment variable,
  `config :dspex_native_pool, venv: DIR`, the package's `priv/python/.venv` (in a checkout of
  this project, or when it already exists), else `~/.cache/dspex_native_pool/venv`
  (`$XDG_CACHE_HOME` honoured): outside `deps/`, so `mix deps.clean` keeps it. With `--venv`,
  set the environment variable or the config to the same directory for the pool to find it.

  Idempotent: when the venv exists and the requirements have not changed since the last
  install, it does nothing. Set `DSPEX_SKIP_PYTHON_SETUP=1` to skip it (for example when you
  bring your own `:python`).
  """
  use Mix.Task

  alias DSPex.NativePool.Python

  @impl true
  def run(args) do
    {opts, _} =
      OptionParser.parse!(args, strict: [force: :boolean, if_missing: :boolean, venv: :string])

    # The host project's config may name the venv.
    Mix.Task.run("loadconfig")
    root = package_root()
    requirements = Path.join(root, "priv/python/requirements.txt")
    venv = if opts[:venv], do: Path.expand(opts[:venv]), else: venv(root)
    stamp = Path.join(venv, ".requirements.md5")
    wanted = File.read!(requirements) |> :erlang.md5() |> Base.encode16(case: :lower)

    cond do
      System.get_env("DSPEX_SKIP_PYTHON_SETUP") in ["1", "true"] ->
        :ok

      !opts[:force] and File.read(stamp) == {:ok, wanted} and
          File.exists?(Path.join(venv, "bin/python")) ->
        unless opts[:if_missing], do: Mix.shell().info("Python venv is up to date: #{venv}")

      true ->
        create(venv, requirements)
        File.write!(stamp, wanted)
        Mix.shell().info("Python venv ready: #{venv}")
    end
  end

  @doc false
  # The root of the dspex_native_pool package: this project, or the dependency of the host.
  def package_root do
    cond do
      Mix.Project.config()[:app] == :dspex_native_pool ->
        Path.dirname(Mix.Project.project_file())

      path = Mix.Project.deps_paths()[:dspex_native_pool] ->
        path

      true ->
        :code.priv_dir(:dspex_native_pool) |> to_string() |> Path.dirname()
    end
  end

  # As DSPex.NativePool.Python.venv/0 at runtime, from the package root.
  defp venv(root) do
    priv_venv = Path.join(root, "priv/python/.venv")

    cond do
      dir = Python.configured() -> dir
      Mix.Project.config()[:app] == :dspex_native_pool -> priv_venv
      File.exists?(Path.join(priv_venv, "bin/python")) -> priv_venv
      true -> Python.cache_venv()
    end
  end

  defp create(venv, requirements) do
    python =
      System.find_executable("python3") ||
        Mix.raise("""
        python3 was not found on PATH. Install Python 3.10+ (Debian: apt-get install -y python3 python3-venv).
        """)

    unless File.exists?(Path.join(venv, "bin/python")) do
      Mix.shell().info("Creating Python venv at #{venv}")
      File.mkdir_p!(Path.dirname(venv))

      case System.cmd(python, ["-m", "venv", venv], stderr_to_stdout: true) do
        {_, 0} ->
          :ok

        {out, _} ->
          File.rm_rf!(venv)

          Mix.raise("""
          could not create a venv with #{python} -m venv:
          #{out}
          Debian/Ubuntu: apt-get install -y python3-venv
          """)
      end
    end

    pip = Path.join(venv, "bin/pip")
    Mix.shell().info("Installing #{requirements} (DSPy takes ~30 s)")

    case System.cmd(
           pip,
           ["install", "--quiet", "--disable-pip-version-check", "-r", requirements],
           stderr_to_stdout: true,
           into: IO.stream(:stdio, :line)
         ) do
      {_, 0} -> :ok
      {_, status} -> Mix.raise("pip install failed with status #{status}")
    end
  end
end
