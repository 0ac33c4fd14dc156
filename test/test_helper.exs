# DSPy tests need the project's venv (`mix dspex_native_pool.setup_python`, run by `mix test`).
dspy? =
  System.cmd(DSPex.NativePool.Server.default_python(), ["-c", "import dspy"],
    stderr_to_stdout: true
  )
  |> elem(1) == 0

ExUnit.start(exclude: if(dspy?, do: [], else: [:dspy]), capture_log: true)
