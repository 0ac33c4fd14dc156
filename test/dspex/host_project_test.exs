defmodule DSPex.NativePool.HostProjectTest do
  # This package as a dependency: a throwaway Mix project depends on it by `path:`, runs the
  # setup task from its own root, and makes a call to the DSPy bridge (issue 9, item 9).
  # Reuses the installed venv through DSPEX_NATIVE_POOL_VENV to stay fast: the task finds it up
  # to date and installs nothing.
  use ExUnit.Case, async: false

  alias DSPex.NativePool.Python

  @moduletag :dspy
  @moduletag timeout: 300_000

  @root Path.expand("../..", __DIR__)

  setup_all do
    host = Path.join(System.tmp_dir!(), "dspex_host_#{System.unique_integer([:positive])}")
    File.mkdir_p!(Path.join(host, "lib"))

    File.write!(Path.join(host, "mix.exs"), """
    defmodule Host.MixProject do
      use Mix.Project

      def project do
        [app: :host, version: "0.1.0", deps: [{:dspex_native_pool, path: #{inspect(@root)}}]]
      end

      def application, do: [extra_applications: [:logger]]
    end
    """)

    on_exit(fn -> File.rm_rf!(host) end)
    %{host: host, venv: Python.venv() |> Path.expand()}
  end

  defp mix(host, args, env) do
    System.cmd("mix", args,
      cd: host,
      stderr_to_stdout: true,
      env: [{"MIX_ENV", "dev"}, {"DSPEX_SKIP_PYTHON_SETUP", nil} | env]
    )
  end

  test "the setup task and the pool work from a host project", %{host: host, venv: venv} do
    env = [{"DSPEX_NATIVE_POOL_VENV", venv}]
    assert {out, 0} = mix(host, ["compile"], env)
    refute out =~ "error"

    # It reads the dependency's requirements (the host has none) and finds the venv.
    assert {out, 0} = mix(host, ["dspex_native_pool.setup_python"], env)
    assert out =~ "Python venv is up to date: #{venv}"

    script = """
    alias DSPex.PythonBridge.NativePool
    {:ok, _} = NativePool.start_link(pool_size: 1)
    {:ok, %{"status" => "ok"}} = NativePool.execute_anonymous(:ping, %{})
    IO.puts("CALLED OK")
    """

    assert {out, 0} = mix(host, ["run", "-e", script], env)
    assert out =~ "CALLED OK"
  end

  test "without a venv, the first error says which command to run", %{host: host} do
    empty = Path.join(host, "no_venv")
    env = [{"DSPEX_NATIVE_POOL_VENV", empty}]

    script = """
    alias DSPex.PythonBridge.NativePool
    Logger.configure(level: :error)
    {:ok, _} = NativePool.start_link(pool_size: 1, lazy: true)
    {:error, {:checkout_failed, detail}} = NativePool.execute_anonymous(:ping, %{}, pool_timeout: 60_000)
    IO.puts("REPLY: " <> detail)
    """

    assert {out, 0} = mix(host, ["run", "-e", script], env)
    assert out =~ "REPLY: no worker could be started"
    assert out =~ "No module named 'dspy'"
    assert out =~ "run `mix dspex_native_pool.setup_python` in your project"
    assert out =~ "looked for #{empty}"
  end

  test "mix dspex_native_pool.doctor reports each problem with its fix" do
    checks = Mix.Tasks.DspexNativePool.Doctor.checks(pool_size: 2, max_overflow: 0)
    assert {:ok, "nif", "loaded", nil} = List.keyfind(checks, "nif", 1)
    assert {:ok, "dspy", "3.4.1", nil} = List.keyfind(checks, "dspy", 1)
    assert {:ok, "file descriptors", _, nil} = List.keyfind(checks, "file descriptors", 1)

    too_many = Mix.Tasks.DspexNativePool.Doctor.checks(pool_size: 100_000_000)

    assert {:error, "file descriptors", _, "ulimit -n " <> _} =
             List.keyfind(too_many, "file descriptors", 1)

    System.put_env("DSPEX_NATIVE_POOL_VENV", "/nonexistent/venv")

    try do
      no_venv = Mix.Tasks.DspexNativePool.Doctor.checks()

      assert {:error, "venv", detail, "mix dspex_native_pool.setup_python"} =
               List.keyfind(no_venv, "venv", 1)

      assert detail =~ "/nonexistent/venv"

      Mix.shell(Mix.Shell.Process)
      assert catch_exit(Mix.Tasks.DspexNativePool.Doctor.run([])) == {:shutdown, 1}
      assert_received {:mix_shell, :info, ["[FAIL] venv: no venv at /nonexistent/venv" <> _]}
      assert_received {:mix_shell, :info, ["       fix: mix dspex_native_pool.setup_python"]}
    after
      Mix.shell(Mix.Shell.IO)
      System.delete_env("DSPEX_NATIVE_POOL_VENV")
    end
  end
end
