defmodule DSPexNativePool.MixProject do
  use Mix.Project

  def project do
    [
      app: :dspex_native_pool,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      compilers: [:dspex_native] ++ Mix.compilers(),
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: [],
      aliases: [test: ["dspex_native_pool.setup_python --if-missing", "test"]]
    ]
  end

  def application do
    [extra_applications: [:logger], mod: {DSPex.NativePool.Application, []}]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end

defmodule Mix.Tasks.Compile.DspexNative do
  @moduledoc """
  Builds the Rust NIF with cargo and copies it to `priv/native/`.

  Runs `cargo build --release` only when a Rust source, `Cargo.toml` or `Cargo.lock` is newer
  than the built library. No hex packages are needed (hex.pm is not reachable where this
  project is built). `mix clean` removes the copied library.
  """
  use Mix.Task.Compiler

  @crate "dspex_native_pool"

  @impl true
  def run(_args) do
    root = Path.dirname(Mix.Project.project_file())
    target = Path.join(root, "priv/native/#{@crate}.so")

    # Every crate of the workspace: the NIF links the pool's core crate.
    sources =
      Path.wildcard(Path.join(root, "native/*/src/**/*.rs")) ++
        Path.wildcard(Path.join(root, "native/*/Cargo.toml")) ++
        Enum.map(["Cargo.toml", "Cargo.lock"], &Path.join(root, &1))

    if Mix.Utils.stale?(sources, [target]) do
      build(root, target)
    else
      Mix.Project.build_structure()
      {:noop, []}
    end
  end

  defp build(root, target) do
    Mix.shell().info("Compiling NIF crate #{@crate} (cargo build --release)")
    # Mix compares modification times in whole seconds: the library is dated a second before
    # the build began, so a source saved while cargo ran is newer, and built the next time.
    started = System.os_time(:second) - 1

    case System.cmd("cargo", ["build", "--release", "--quiet", "-p", @crate],
           cd: root,
           stderr_to_stdout: true,
           into: IO.stream(:stdio, :line)
         ) do
      {_, 0} ->
        File.mkdir_p!(Path.dirname(target))
        built = Path.join(root, "target/release/lib#{@crate}.so")
        # Copy to a temp name and rename: a loaded .so must not be overwritten in place.
        tmp = target <> ".tmp"
        File.cp!(built, tmp)
        File.rename!(tmp, target)
        File.touch!(target, started)
        Mix.Project.build_structure()
        {:ok, []}

      {_, status} ->
        Mix.raise("cargo build failed with status #{status}")
    end
  end

  @impl true
  def clean do
    root = Path.dirname(Mix.Project.project_file())
    File.rm_rf!(Path.join(root, "priv/native"))
    :ok
  end
end
