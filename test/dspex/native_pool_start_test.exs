defmodule DSPex.PythonBridge.NativePoolStartTest do
  # A worker that fails before its first good ping is a start failure (issue 7), with real
  # Python processes.
  use DSPex.NativePool.PoolCase, async: true

  # Prints a banner to stdout (the protocol's channel) and then never answers.
  @banner_worker """
  import sys, time
  sys.stdout.write("Loading model weights...\\n")
  sys.stdout.flush()
  time.sleep(60)
  """

  setup do
    dir = Path.join(System.tmp_dir!(), "dspex_start_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    script = Path.join(dir, "banner_worker.py")
    File.write!(script, @banner_worker)
    on_exit(fn -> File.rm_rf!(dir) end)
    %{script: script}
  end

  test "an eager pool whose worker prints a banner fails to start, saying why", %{script: script} do
    Process.flag(:trap_exit, true)

    assert {:error, {:worker_start_failed, msg}} =
             NativePool.start_link(
               name: :"banner_#{System.unique_integer([:positive])}",
               pool_size: 1,
               lazy: false,
               script: script,
               start_timeout: 30_000
             )

    assert msg =~ "bytes that are not a frame"
  end

  test "a lazy pool whose worker prints a banner tells callers why and backs off", %{
    script: script
  } do
    opts = start_pool(pool_size: 1, lazy: true, script: script)

    assert {:error, {:checkout_failed, msg}} = NativePool.execute_anonymous(:ping, %{}, opts)
    assert msg =~ "no worker could be started"
    assert msg =~ "bytes that are not a frame"

    # Callers during the backoff fail at once, without a new start attempt each.
    for _ <- 1..20,
        do: {:error, {:checkout_failed, _}} = NativePool.execute_anonymous(:ping, %{}, opts)

    assert status(opts).counters.start_failures in 1..3
  end
end
