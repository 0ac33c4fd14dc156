defmodule Mix.Tasks.DspexNativePool.SetupPython do
  @shortdoc "Creates the Python venv for the DSPy workers"
  @moduledoc """
  Creates `priv/python/.venv` and installs `priv/python/requirements.txt` into it (DSPy 3.4.1,
  orjson). Idempotent: when the venv exists and the requirements have not changed since the
  last install, it does nothing. The pool's default `:python` is this venv's interpreter.

      mix dspex_native_pool.setup_python            # create or update
      mix dspex_native_pool.setup_python --force    # reinstall
      mix dspex_native_pool.setup_python --if-missing   # quiet no-op when up to date

  Set `DSPEX_SKIP_PYTHON_SETUP=1` to skip it (for example when you bring your own `:python`).
  """
  use Mix.Task

  @impl true
  def run(args) do
    {opts, _} = OptionParser.parse!(args, strict: [force: :boolean, if_missing: :boolean])
    root = Path.dirname(Mix.Project.project_file())
    python_dir = Path.join(root, "priv/python")
    venv = Path.join(python_dir, ".venv")
    requirements = Path.join(python_dir, "requirements.txt")
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

  defp create(venv, requirements) do
    python =
      System.find_executable("python3") ||
        Mix.raise("""
        python3 was not found on PATH. Install Python 3.10+ (Debian: apt-get install -y python3 python3-venv).
        """)

    unless File.exists?(Path.join(venv, "bin/python")) do
      Mix.shell().info("Creating Python venv at #{venv}")

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
    Mix.shell().info("Installing #{Path.relative_to_cwd(requirements)} (DSPy takes ~30 s)")

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
