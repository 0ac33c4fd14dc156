defmodule DSPex.NativePool.Python do
  @moduledoc """
  Where the DSPy workers' Python venv lives, for `mix dspex_native_pool.setup_python`, the pool
  and `mix dspex_native_pool.doctor`.

  The venv is, in this order:

    1. the `DSPEX_NATIVE_POOL_VENV` environment variable;
    2. `config :dspex_native_pool, venv: "/path/to/venv"`;
    3. `priv/python/.venv` of this package, when it exists (a checkout of this project);
    4. `dspex_native_pool/venv` in the user cache directory (`$XDG_CACHE_HOME`, else
       `~/.cache`): the default when this project is a dependency, outside `deps/`, so
       `mix deps.clean` keeps it.

  A pool started without `:python` runs the venv's interpreter, or `python3` when no venv
  exists (and its first start-up error then says to run `mix dspex_native_pool.setup_python`).
  """

  @env_var "DSPEX_NATIVE_POOL_VENV"
  @setup_command "mix dspex_native_pool.setup_python"

  @doc "The environment variable that names the venv."
  def env_var, do: @env_var

  @doc "The command that creates the venv."
  def setup_command, do: @setup_command

  @doc "The venv directory: the first of the list in the moduledoc that is set or exists."
  @spec venv() :: String.t()
  def venv do
    configured() || existing_priv_venv() || cache_venv()
  end

  @doc "The venv the user named (environment variable or application config), or nil."
  def configured do
    case System.get_env(@env_var) do
      dir when dir not in [nil, ""] ->
        Path.expand(dir)

      _ ->
        Application.get_env(:dspex_native_pool, :venv) &&
          Path.expand(Application.get_env(:dspex_native_pool, :venv))
    end
  end

  defp existing_priv_venv do
    dir = priv_venv()
    if File.exists?(Path.join(dir, "bin/python")), do: dir
  end

  @doc "This package's own `priv/python/.venv`."
  def priv_venv, do: Path.join(priv_dir(), "python/.venv")

  @doc "The default venv of a dependency: in the user cache directory."
  def cache_venv, do: Path.join(:filename.basedir(:user_cache, "dspex_native_pool"), "venv")

  @doc "The interpreter of `venv/0`, or nil when that venv has none."
  def venv_python do
    python = Path.join(venv(), "bin/python")
    if File.exists?(python), do: python
  end

  @doc "The default `:python` of a pool: `venv_python/0`, else `python3` from PATH."
  def default_python, do: venv_python() || System.find_executable("python3") || "python3"

  @doc "The default worker script."
  def default_script, do: Path.join(priv_dir(), "python/dspy_bridge.py")

  @doc "The fork server that starts a pool's workers (`priv/python/fork_server.py`)."
  def fork_server_script, do: Path.join(priv_dir(), "python/fork_server.py")

  @doc "The hint given with the first start-up error when no venv is set up."
  def setup_hint do
    "the Python venv for the DSPy workers is not set up (looked for #{venv()}): run " <>
      "`#{@setup_command}` in your project (set #{@env_var} to use another venv)"
  end

  defp priv_dir, do: :code.priv_dir(:dspex_native_pool) |> to_string()
end
