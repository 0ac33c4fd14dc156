defmodule DSPex.PythonBridge.NativePoolLifecycleTest do
  # Not async: counts global resources and OS processes.
  use DSPex.NativePool.PoolCase, async: false

  require Logger

  test "no lease resource leaks after calls, crashes, dropped checkouts and dead holders" do
    opts = start_pool(pool_size: 2)

    for _ <- 1..50, do: {:ok, _} = NativePool.execute_anonymous(:ping, %{}, opts)
    {:error, _} = NativePool.execute_anonymous(:exit, %{code: 1}, opts)
    {:error, _} = NativePool.execute_anonymous(:fail, %{message: "x"}, opts)

    {:error, {:timeout, _}} =
      NativePool.execute_anonymous(:sleep, %{ms: 1000}, [timeout: 20] ++ opts)

    # A checkout dropped by a process that then exits, and one dropped without checkin.
    {:ok, _} = Task.await(Task.async(fn -> NativePool.checkout(:anonymous, opts) end))
    (fn -> {:ok, _dropped} = NativePool.checkout(:anonymous, opts) end).()

    eventually(fn ->
      # Any process's garbage may still hold a lease resource until its next collection (the
      # task supervisor keeps the start message of an `into:` stream a test before ran).
      Enum.each(Process.list(), &:erlang.garbage_collect/1)
      Native.live_leases() == 0 and status(opts).open_leases == 0
    end)

    eventually(fn -> status(opts).ready == 2 end)
  end

  test "many checkouts leave one monitor per process, and Process.info(:monitored_by) works" do
    # One resource monitor per checkout used to pile up here, and on OTP 25.1
    # Process.info(pid, :monitored_by) (observer, recon, crash reports) then aborted the VM.
    opts = start_pool(pool_size: 1)
    {:monitored_by, before} = Process.info(self(), :monitored_by)

    for _ <- 1..5_000 do
      {:ok, checkout} = NativePool.checkout(:anonymous, opts)
      :ok = NativePool.checkin(checkout)
    end

    {:monitored_by, now} = Process.info(self(), :monitored_by)
    assert length(now) <= length(before) + 1
    {:monitored_by, _} = Process.info(self(), :monitored_by)
    assert {:ok, _} = NativePool.execute_anonymous(:ping, %{}, opts)
  end

  test "worker stderr reaches Logger with the worker id as metadata" do
    opts = start_pool(pool_size: 1)
    test = self()
    handler = :"stderr_handler_#{System.unique_integer([:positive])}"

    :ok =
      :logger.add_handler(handler, __MODULE__.Handler, %{
        config: %{pid: test},
        level: :all
      })

    on_exit(fn -> :logger.remove_handler(handler) end)
    {:ok, _} = NativePool.execute_anonymous(:stderr, %{line: "WARNING hello from python"}, opts)

    assert_receive {:logged, :warning, "WARNING hello from python", %{worker_id: id}}, 2_000
    assert is_integer(id)
  end

  defmodule Handler do
    @moduledoc false
    def log(%{level: level, msg: msg, meta: meta}, %{config: %{pid: pid}}) do
      text =
        case msg do
          {:string, s} -> IO.chardata_to_string(s)
          {:report, r} -> inspect(r)
          {format, args} -> :io_lib.format(format, args) |> IO.chardata_to_string()
        end

      send(pid, {:logged, level, text, meta})
    end
  end

  test "an eager pool whose python does not exist fails to start, saying why" do
    Process.flag(:trap_exit, true)

    assert {:error, {:worker_start_failed, msg}} =
             NativePool.start_link(
               name: :bad_python,
               pool_size: 2,
               lazy: false,
               python: "/nonexistent/python3",
               script: test_worker()
             )

    assert msg =~ "could not start /nonexistent/python3: No such file or directory"
  end

  test "an eager pool whose script raises on import fails to start with the traceback" do
    Process.flag(:trap_exit, true)

    assert {:error, {:worker_start_failed, msg}} =
             NativePool.start_link(
               name: :bad_script,
               pool_size: 1,
               lazy: false,
               script: test_worker(),
               env: [{"TEST_WORKER_FAIL_ON_START", "1"}]
             )

    assert msg =~ "exited during start-up (exit status 1)"
    assert msg =~ "RuntimeError"
  end

  test "options are validated up front" do
    assert_raise ArgumentError, ~r/unknown keys \[:pool_sise\]/, fn ->
      NativePool.start_link(pool_sise: 2)
    end

    assert_raise ArgumentError, ~r/expected :pool_size to be a positive integer, got: 0/, fn ->
      NativePool.start_link(pool_size: 0)
    end

    assert_raise ArgumentError, ~r/:affinity to be :prefer or :strict, got: :sometimes/, fn ->
      NativePool.start_link(affinity: :sometimes)
    end

    assert {:error, {:checkout_failed, "no DSPex.PythonBridge.NativePool named :nope is running"}} =
             NativePool.execute_anonymous(:ping, %{}, pool: :nope)

    assert {:error, {:checkout_failed, _}} = NativePool.checkout(:anonymous, pool: :nope)
    assert {:error, {:unhealthy, {:checkout_failed, _}}} = NativePool.health_check(pool: :nope)

    assert_raise ArgumentError, ~r/no DSPex.PythonBridge.NativePool named :nope/, fn ->
      NativePool.get_pool_status(pool: :nope)
    end
  end

  test "two named pools run side by side; stopping one stops its workers" do
    a = start_pool(pool_size: 1)
    b = start_pool(pool_size: 1)
    [pid_a] = status(a).worker_pids
    [pid_b] = status(b).worker_pids
    assert {:ok, %{"pid" => ^pid_a}} = NativePool.execute_anonymous(:ping, %{}, a)
    assert {:ok, %{"pid" => ^pid_b}} = NativePool.execute_anonymous(:ping, %{}, b)

    :ok = stop_supervised(a[:pool])
    refute alive?(pid_a)
    assert alive?(pid_b)
  end

  test "a checkout of a stopped pool says the pool stopped; checking it in is still :ok" do
    opts = start_pool(pool_size: 1)
    {:ok, checkout} = NativePool.checkout(:anonymous, opts)
    :ok = stop_supervised(opts[:pool])

    # Before: "this checkout's worker was recycled (a request timed out or failed)".
    assert {:error, {:checkout_failed, "the pool is stopping"}} =
             NativePool.call(checkout, :ping, %{})

    assert :ok = NativePool.checkin(checkout)
  end

  test "a %Checkout{} built by hand gets a clear error from call/4 and checkin/1" do
    opts = start_pool(pool_size: 1)
    {:ok, real} = NativePool.checkout(:anonymous, opts)
    forged = %{real | lease: make_ref()}

    # Before: both raised a bare ArgumentError ("argument error") from the NIF.
    assert {:error, {:checkout_failed, "not a checkout made by checkout/2" <> _}} =
             NativePool.call(forged, :ping, %{})

    assert_raise ArgumentError, ~r/not a checkout made by checkout\/2.*got: #Reference/, fn ->
      NativePool.checkin(forged)
    end

    # The real checkout is untouched by either.
    assert {:ok, _} = NativePool.call(real, :ping, %{})
    assert :ok = NativePool.checkin(real)
  end

  test "a request sent to a worker that died while idle runs on its replacement" do
    opts = start_pool(pool_size: 1)

    for _ <- 1..3 do
      [pid] = status(opts).worker_pids
      System.cmd("kill", ["-9", to_string(pid)])
      # Dead, its pipes closed, but perhaps not yet noticed by the pool. Not just a zombie:
      # a killed multi-threaded process's leader shows "Z" while its other threads still
      # exit, holding its descriptors (a request written then is in flight, and fails): wait
      # until no thread but the leader is left.
      eventually(fn ->
        not alive?(pid) and
          File.ls("/proc/#{pid}/task") in [{:ok, [to_string(pid)]}, {:error, :enoent}]
      end)

      assert {:ok, %{"pid" => new_pid}} = NativePool.execute_anonymous(:ping, %{}, opts)
      assert new_pid != pid
    end
  end

  @tag timeout: 60_000
  test "a BEAM killed with SIGKILL leaves no Python worker behind" do
    ebin = :code.lib_dir(:dspex_native_pool) |> Path.join("ebin")

    script = """
    {:ok, _} = DSPex.PythonBridge.NativePool.start_link(pool_size: 3, lazy: false, script: #{inspect(test_worker())})
    pids = DSPex.PythonBridge.NativePool.get_pool_status().worker_pids
    IO.puts("READY \#{System.pid()} " <> Enum.join(pids, ","))
    Process.sleep(:infinity)
    """

    port =
      Port.open({:spawn_executable, System.find_executable("elixir")}, [
        :binary,
        :exit_status,
        {:line, 4096},
        args: ["-pa", ebin, "-e", script]
      ])

    {beam, workers} = await_ready(port)
    assert length(workers) == 3
    # Workers are children of the pool's fork server, itself a child of the VM.
    [server] = workers |> Enum.map(&ppid/1) |> Enum.uniq()
    assert ppid(server) == String.to_integer(beam)
    all = [server | workers]
    assert Enum.all?(all, &alive?/1)

    System.cmd("kill", ["-9", beam])
    assert_receive {^port, {:exit_status, _}}, 10_000
    eventually(fn -> Enum.all?(all, &(not alive?(&1))) end)
  end
end
