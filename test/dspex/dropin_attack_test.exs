defmodule DSPex.PythonBridge.DropInAttackTest do
  # Issue 9, tried as a DSPex user switching from SessionPoolV2/PythonPoolV2: the edges of the
  # drop-in surface (names and pids, options, structs as arguments, the adapter's bad input).
  # Not async: sessions are global.
  use DSPex.NativePool.PoolCase, async: false

  import ExUnit.CaptureLog

  alias DSPex.Adapters.PythonPoolNative

  defp unique_name, do: :"attack9_#{System.unique_integer([:positive])}"

  defp start(name, extra \\ []) do
    opts = [name: name, pool_size: 1, script: test_worker(), shutdown_grace: 200] ++ extra
    start_supervised!({NativePool, opts}, id: name)
  end

  defp worker_pid(name), do: hd(NativePool.get_pool_status(name).worker_pids)

  describe "names" do
    test "a pool named like another's V2 pool name (:\"X_pool\") does not take its calls" do
      a = unique_name()
      a_pool = :"#{a}_pool"
      start(a)
      start(a_pool)

      # The pool named a_pool answers for a_pool; get_pool_name_for(a) is the same atom, and
      # V2's name loses to a real one rather than misrouting silently to the other pool.
      assert {:ok, %{"pid" => pid}} = NativePool.execute_anonymous(:ping, %{}, pool: a_pool)
      assert pid == worker_pid(a_pool)
      assert {:ok, %{"pid" => pid}} = NativePool.execute_anonymous(:ping, %{}, pool: a)
      assert pid == worker_pid(a)
      assert pid != worker_pid(a_pool)
    end

    test "a pool started after one named like its V2 pool name leaves that one reachable" do
      a = unique_name()
      a_pool = :"#{a}_pool"
      start(a_pool)
      start(a)

      assert {:ok, %{"pid" => pid}} = NativePool.execute_anonymous(:ping, %{}, pool: a_pool)
      assert pid == worker_pid(a_pool)

      # Stopping `a` must not unpublish the pool that really is named a_pool.
      :ok = stop_supervised(a)
      assert {:ok, %{"pid" => ^pid}} = NativePool.execute_anonymous(:ping, %{}, pool: a_pool)

      # Started again, then the pool named a_pool stopped: V2's name reaches `a` once more.
      start(a)
      a_worker = worker_pid(a)
      :ok = stop_supervised(a_pool)

      assert {:ok, %{"pid" => ^a_worker}} =
               NativePool.execute_anonymous(:ping, %{}, pool_name: a_pool)
    end

    test "V2's GenServer calls take a pid, as SessionPoolV2's did" do
      name = unique_name()
      pid = start(name)

      assert %{pool_size: 1, session_affinity: %{}} = NativePool.get_pool_status(pid)
      assert {:ok, :healthy} = NativePool.health_check(pid)
      assert NativePool.get_pool_name_for(pid) == :"#{name}_pool"
    end

    test "a call or cast the pool does not know is refused; the pool and its workers stay" do
      name = unique_name()
      pid = start(name)
      worker = worker_pid(name)

      assert capture_log(fn ->
               assert {:error, {:unknown_call, :get_stats}} = GenServer.call(name, :get_stats)
               GenServer.cast(name, {:execute_in_session, "s", :ping, %{}})
               assert %{pool_size: 1} = GenServer.call(name, :get_status)
             end) =~ "unknown cast"

      assert Process.whereis(name) == pid
      assert {:ok, %{"pid" => ^worker}} = NativePool.execute_anonymous(:ping, %{}, pool: name)
    end

    test "a pid or name of no pool: ArgumentError / {:error, _}, never FunctionClauseError" do
      stranger = spawn(fn -> Process.sleep(:infinity) end)

      assert_raise ArgumentError, ~r/no DSPex.PythonBridge.NativePool .*is running/, fn ->
        NativePool.get_pool_status(stranger)
      end

      assert {:error, {:unhealthy, {:checkout_failed, _}}} = NativePool.health_check(stranger)

      assert_raise ArgumentError, ~r/no DSPex.PythonBridge.NativePool .*is running/, fn ->
        NativePool.get_pool_name_for(stranger)
      end

      Process.exit(stranger, :kill)

      # An unknown name: as get_pool_status/1 (it exited with :noproc).
      assert_raise ArgumentError, ~r/no DSPex.PythonBridge.NativePool named :nope_9/, fn ->
        NativePool.get_pool_name_for(:nope_9)
      end
    end
  end

  describe "options" do
    test "a name no process can be registered under raises, not {:already_started, :undefined}" do
      assert_raise ArgumentError, ~r/expected :name to be an atom.*got: :undefined/, fn ->
        NativePool.start_link(name: :undefined, script: test_worker())
      end
    end

    test "unknown start keys raise ArgumentError with got:" do
      assert_raise ArgumentError, ~r/unknown keys \[:foo\].*got: /s, fn ->
        NativePool.start_link(foo: 1, script: test_worker())
      end
    end

    test "call options as a map with string keys: V2 ignored them; a known name says so" do
      name = unique_name()
      start(name)

      # Keys that are not options are ignored, as V2's Keyword.get ignored them.
      assert {:ok, _} = NativePool.execute_anonymous(:ping, %{}, %{"x" => 1, pool: name})

      # An option spelled as a string would silently go to the default pool: refused instead.
      assert_raise ArgumentError,
                   ~r/got: %\{"pool_name" => .*"pool_name" must be an atom key/,
                   fn ->
                     NativePool.execute_anonymous(:ping, %{}, %{"pool_name" => name})
                   end
    end
  end

  describe "sessions" do
    test "the table is SessionPoolV2's: DSPex's test clean-up clears it; V2 reads its rows" do
      id = "attack9_cleanup_#{System.unique_integer([:positive])}"
      :ok = NativePool.track_session(id)
      :ok = NativePool.update_session_activity(id)

      # What SessionPoolV2.get_session_info/0 does with the table.
      infos = :dspex_pool_sessions |> :ets.tab2list() |> Enum.map(fn {_id, info} -> info end)

      assert %{operations: 1, started_at: _, last_activity: _} =
               Enum.find(infos, &(&1.session_id == id))

      # DSPex's test on_exit (its older tests call it without checking the table exists).
      :ets.delete_all_objects(:dspex_pool_sessions)
      refute Enum.any?(NativePool.get_session_info(), &(&1.session_id == id))
    end

    test "concurrent activity on one session loses no operation" do
      id = "attack9_busy_#{System.unique_integer([:positive])}"

      1..20
      |> Enum.map(fn _ ->
        Task.async(fn -> for _ <- 1..50, do: :ok = NativePool.update_session_activity(id) end)
      end)
      |> Enum.each(&Task.await/1)

      assert %{operations: 1000} =
               Enum.find(NativePool.get_session_info(), &(&1.session_id == id))

      :ok = NativePool.end_session(id)
    end
  end

  describe "structs" do
    test "a struct as the whole args is refused, not sent as a JSON string" do
      name = unique_name()
      start(name)

      for args <- [~D[2025-07-01], DateTime.utc_now(), ~T[10:00:00]] do
        assert {:error, {:invalid_args, detail}} =
                 NativePool.execute_in_session("s", :echo, args, pool: name)

        assert detail =~ "got: "

        assert {:error, {:invalid_args, _}} =
                 NativePool.execute_anonymous(:echo, args, pool: name)

        assert [{:error, {:invalid_args, _}}] =
                 Enum.to_list(NativePool.execute_stream(:anonymous, :echo, args, pool: name))
      end
    end
  end

  describe "structs at the depth limit" do
    test "a Date where its string may be is written, as the string would be" do
      name = unique_name()
      start(name)
      wrap = fn leaf -> Enum.reduce(1..249, %{d: leaf}, fn _, acc -> %{a: acc} end) end

      assert {:ok, _} = NativePool.execute_anonymous(:echo, wrap.("2025-07-01"), pool: name)
      assert {:ok, _} = NativePool.execute_anonymous(:echo, wrap.(~D[2025-07-01]), pool: name)

      # One level deeper, both are refused alike.
      assert {:error, {:invalid_args, too_deep}} =
               NativePool.execute_anonymous(:echo, %{x: wrap.(~D[2025-07-01])}, pool: name)

      assert too_deep =~ "nested deeper than 250 levels"
    end
  end

  describe "the adapter's bad input" do
    test "options or configs that are not a map or keyword list raise ArgumentError with got:" do
      for fun <- [
            fn -> PythonPoolNative.create_program("bad") end,
            fn -> PythonPoolNative.execute_program("p", %{}, "bad") end,
            fn -> PythonPoolNative.execute_program("p", %{}, [1, 2]) end,
            fn -> PythonPoolNative.list_programs(:bad) end,
            fn -> PythonPoolNative.get_program_info("p", 3) end,
            fn -> PythonPoolNative.session_adapter("s", "a_pool") end
          ] do
        assert_raise ArgumentError, ~r/got: /, fun
      end
    end
  end

  test "mix dspex_native_pool.doctor refuses pool sizes no pool takes" do
    for args <- [["--pool-size", "-3"], ["--pool-size", "0"], ["--max-overflow", "-1"]] do
      assert_raise Mix.Error, ~r/got: -?\d/, fn -> Mix.Tasks.DspexNativePool.Doctor.run(args) end
    end
  end

  test "the doctor's fix for a NIF that does not load is a command that runs here" do
    # This project is not its own dependency (`mix deps.compile dspex_native_pool` fails here).
    assert Mix.Tasks.DspexNativePool.Doctor.nif_fix() == "mix compile --force"
  end
end
