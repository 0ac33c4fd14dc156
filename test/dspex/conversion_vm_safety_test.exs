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
    # Built before the monitor starts; 60 MiB fits the default 64 MiB frame, 100 MiB does not.
    fits = :binary.copy("x", 60 * 1024 * 1024)
    too_big = :binary.copy("x", 100 * 1024 * 1024)
    huge_int = Bitwise.bsl(1, 16_000_000)
    me = self()

    # Before: 60 MiB held a scheduler 174 ms, 2^16M 2.6 s. Dirty schedulers are not reported.
    :erlang.system_monitor(me, long_schedule: 100)

    try do
      assert {:ok, %{"n" => 1}} =
               NativePool.execute_anonymous(:echo, %{s: fits, n: 1}, opts)
               |> then(fn {:ok, r} -> {:ok, Map.delete(r, "s")} end)

      assert {:error, {:invalid_args, msg}} =
               NativePool.execute_anonymous(:echo, %{s: too_big}, opts)

      assert msg =~ "max_frame_size"

      assert {:error, {:invalid_args, "args.i is an integer outside" <> _}} =
               NativePool.execute_anonymous(:echo, %{i: huge_int}, opts)

      {:ok, checkout} = NativePool.checkout(:anonymous, opts)
      assert {:error, {:invalid_args, _}} = NativePool.call(checkout, :echo, %{s: too_big})
      assert {:error, {:invalid_args, _}} = NativePool.call(checkout, :echo, %{i: huge_int})
      NativePool.checkin(checkout)
    after
      :erlang.system_monitor(:undefined)
    end

    refute_received {:monitor, ^me, :long_schedule, _}
  end
end
