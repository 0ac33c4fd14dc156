defmodule DSPex.NativePool.ConversionVMSafetyTest do
  # Inputs that crashed the VM or held a normal scheduler for seconds. Not async: one test
  # takes the VM's single system monitor.
  use DSPex.NativePool.PoolCase, async: false

  @deep_map_script ~S"""
  alias DSPex.PythonBridge.NativePool
  alias DSPex.NativePool.Native

  opts = [pool: :child_pool]
  worker = System.fetch_env!("TEST_WORKER")
  {:ok, _} = NativePool.start_link(name: :child_pool, pool_size: 1, lazy: false, script: worker)
  deep = fn n -> Enum.reduce(1..n, "leaf", fn _, acc -> %{k: acc} end) end
  big = :binary.copy("a", 100_000)

  results = [
    # The issue's repro: args over the 64 KiB budget, so encoded on a dirty scheduler.
    NativePool.execute_anonymous(:ping, %{a: big, b: deep.(185)}, opts),
    NativePool.execute_anonymous(:echo, %{a: big, b: deep.(249)}, opts),
    NativePool.with_checkout(:anonymous, &NativePool.call(&1, :echo, %{a: big, b: deep.(249)}), opts),
    NativePool.execute_anonymous(:echo, %{a: big, b: deep.(100_000)}, opts),
    Native.json_encode(deep.(250)),
    Native.json_encode(deep.(100_000)),
    Native.json_decode(String.duplicate(~s({"k":), 1_000_000) <> "1" <> String.duplicate("}", 1_000_000))
  ]

  IO.puts("RESULTS " <> inspect(Enum.map(results, &elem(&1, 0))))
  """

  test "deep maps on the dirty path (a SIGSEGV before) are handled: checked in a child VM" do
    ebin = :code.lib_dir(:dspex_native_pool, :ebin) |> to_string()

    {out, status} =
      System.cmd("elixir", ["-pa", ebin, "-e", @deep_map_script],
        env: [{"TEST_WORKER", test_worker()}],
        stderr_to_stdout: true
      )

    # 139 (SIGSEGV) before the fix.
    assert status == 0, out
    assert out =~ "RESULTS [:ok, :ok, :ok, :error, :ok, :error, :error]"
  end

  test "a large binary or integer never holds a normal scheduler" do
    opts = start_pool(pool_size: 1)
    # 60 MiB fits the default 64 MiB frame (it goes to a dirty scheduler), 100 MiB does not.
    fits = :binary.copy("é", 30 * 1024 * 1024)
    too_big = :binary.copy("x", 100 * 1024 * 1024)
    huge_int = Bitwise.bsl(1, 16_000_000)

    calls = fn ->
      {:ok, checkout} = NativePool.checkout(:anonymous, opts)

      results = [
        NativePool.execute_anonymous(:echo, %{s: fits, n: 1}, opts),
        NativePool.execute_anonymous(:echo, %{s: too_big}, opts),
        NativePool.execute_anonymous(:echo, %{i: huge_int}, opts),
        NativePool.call(checkout, :echo, %{s: too_big}),
        NativePool.call(checkout, :echo, %{i: huge_int})
      ]

      NativePool.checkin(checkout)
      results
    end

    # The monitor does not report the process that set it: the calls run in a task. Before,
    # 60 MiB held a normal scheduler ~200 ms and 2^16M ~8 s (the integer went to decimal).
    :erlang.system_monitor(self(), long_schedule: 100)
    task = Task.async(calls)

    results =
      try do
        Task.await(task, 60_000)
      after
        :erlang.system_monitor(:undefined)
      end

    task_pid = task.pid
    refute_received {:monitor, ^task_pid, :long_schedule, _}

    assert [{:ok, %{"s" => ^fits, "n" => 1}}, {:error, {:invalid_args, frame}}, int | calls] =
             results

    assert frame =~ "max_frame_size"
    assert {:error, {:invalid_args, "args.i is an integer outside" <> _}} = int
    assert [{:error, {:invalid_args, _}}, {:error, {:invalid_args, _}}] = calls
  end

  # Jason is no dependency: this runs against a compiled Jason when one is at hand.
  @tag skip: if(System.get_env("JASON_EBIN"), do: false, else: "set JASON_EBIN to run")
  test "other structs go through the real Jason.Encoder (child VM with Jason loaded)" do
    ebin = :code.lib_dir(:dspex_native_pool, :ebin) |> to_string()
    script = Path.expand("../support/jason_check.exs", __DIR__)

    {out, status} =
      System.cmd("elixir", ["-pa", System.fetch_env!("JASON_EBIN"), "-pa", ebin, script],
        env: [{"TEST_WORKER", test_worker()}],
        stderr_to_stdout: true
      )

    assert status == 0, out
    assert out =~ "JASON OK"
  end
end
