defmodule DSPex.NativePool.ConversionPoolTest do
  # The conversion's limits through the pool's entry points (execute_anonymous,
  # execute_in_session, call), on the normal path and on the dirty one (arguments over the
  # 64 KiB budget), against a real worker.
  use DSPex.NativePool.PoolCase, async: true

  alias DSPex.NativePool.TermGen

  @max_depth 250
  @pad String.duplicate("p", 100_000)

  # The arguments map is the first level: `levels` in all.
  defp nested(shape, levels) do
    wrap =
      case shape do
        :maps -> &%{k: &1}
        :lists -> &[&1]
        :tuples -> &{&1}
        :mixed -> &Enum.random([%{"k" => &1}, [1, &1], {&1, :x}])
      end

    Enum.reduce(1..(levels - 1)//1, "leaf", fn _, acc -> wrap.(acc) end)
  end

  # Every entry point, on the normal (`pad: nil`) and the dirty path.
  defp entry_points(opts) do
    for path <- [:normal, :dirty],
        via <- [:execute_anonymous, :execute_in_session, :call] do
      {"#{via}/#{path}",
       fn args ->
         args = if path == :dirty, do: Map.put(args, :pad, @pad), else: args

         case via do
           :execute_anonymous ->
             NativePool.execute_anonymous(:echo, args, opts)

           :execute_in_session ->
             NativePool.execute_in_session("s", :echo, args, opts)

           :call ->
             NativePool.with_checkout(:anonymous, &NativePool.call(&1, :echo, args), opts)
         end
       end}
    end
  end

  test "a session's own session_id replaces a \"session_id\" key already in the arguments" do
    opts = start_pool(pool_size: 1)
    # With the atom key added next to it, the two would collide once written and be refused.
    args = %{"session_id" => "other", x: 1}
    expected = %{"session_id" => "s", "x" => 1}
    assert {:ok, ^expected} = NativePool.execute_in_session("s", :echo, args, opts)

    assert {:ok, ^expected} =
             NativePool.with_checkout({:session, "s"}, &NativePool.call(&1, :echo, args), opts)

    # Anywhere else the collision is still the caller's to fix.
    assert {:error, {:invalid_args, _}} =
             NativePool.execute_anonymous(:echo, Map.put(args, :session_id, "x"), opts)
  end

  test "one depth limit both ways: at and just under it echoes, just over it is refused" do
    opts = start_pool(pool_size: 1)
    requests = status(opts).counters.requests

    for shape <- [:maps, :lists, :tuples, :mixed], {name, echo} <- entry_points(opts) do
      # 150 came back as {:decode_error, _} before: replies had a lower limit (128) than requests.
      for levels <- [150, @max_depth - 1, @max_depth] do
        d = nested(shape, levels)
        expected = TermGen.json_form(d)
        assert {:ok, %{"d" => ^expected}} = echo.(%{d: d}), "#{shape} #{name} #{levels}"
      end

      assert {:error, {:invalid_args, msg}} = echo.(%{d: nested(shape, @max_depth + 1)})
      assert msg =~ "is nested deeper than #{@max_depth} levels", "#{shape} #{name}"
    end

    assert status(opts).counters.requests == requests + 4 * 6 * 3
    assert status(opts).counters.recycled == 0
  end

  test "integers the worker cannot read exactly are refused, with their path, and nothing is sent" do
    opts = start_pool(pool_size: 1)
    [worker] = status(opts).worker_pids
    int_min = -Integer.pow(2, 63)
    int_max = Integer.pow(2, 64) - 1

    for {_name, echo} <- entry_points(opts) do
      # Sent before, the worker's orjson failed to parse it and it was recycled.
      assert {:error, {:invalid_args, msg}} = echo.(%{x: Integer.pow(2, 1100)})
      assert msg =~ "args.x is an integer outside -9223372036854775808..18446744073709551615"
      assert {:error, {:invalid_args, _}} = echo.(%{l: [1, int_max + 1]})
      assert {:error, {:invalid_args, _}} = echo.(%{l: {int_min - 1}})
      assert {:ok, %{"l" => [^int_min, ^int_max]}} = echo.(%{l: [int_min, int_max]})
    end

    assert status(opts).worker_pids == [worker]
    assert status(opts).counters.recycled == 0
  end

  test "colliding keys are refused; Unicode atoms arrive as their names" do
    opts = start_pool(pool_size: 1)

    for {_name, echo} <- entry_points(opts) do
      assert {:error, {:invalid_args, msg}} = echo.(%{m: %{:a => 1, "a" => 2}})
      assert msg == ~s(args.m has keys :a and "a" that are both "a" in JSON: keep one)

      assert {:ok, %{"日本" => "🎉", "l" => ["é", "ü"]}} = echo.(%{日本: :"🎉", l: [:é, :ü]})
    end
  end

  test "calendar structs arrive as Jason writes them (ISO 8601), others are refused by path" do
    opts = start_pool(pool_size: 1)
    now = DateTime.utc_now()
    iso = DateTime.to_iso8601(now)

    for {name, echo} <- entry_points(opts) do
      args = %{
        timestamp: now,
        nested: [%{on: ~D[2025-07-01], at: ~T[09:30:00.250]}, {~N[2025-07-01 09:30:00]}]
      }

      assert {:ok, reply} = echo.(args), name
      assert reply["timestamp"] == iso

      assert reply["nested"] == [
               %{"on" => "2025-07-01", "at" => "09:30:00.250"},
               ["2025-07-01T09:30:00"]
             ]

      assert {:error, {:invalid_args, msg}} = echo.(%{ok: now, bad: [URI.parse("http://x")]})
      assert msg =~ "args.bad[0] is a struct (URI) with no JSON form", name
    end

    assert status(opts).counters.recycled == 0
  end

  test "arguments over max_frame_size are refused before they are encoded whole" do
    opts = start_pool(pool_size: 1, max_frame_size: 1024 * 1024)
    requests = status(opts).counters.requests

    for {name, echo} <- entry_points(opts) do
      huge = :binary.copy("x", 32 * 1024 * 1024)
      assert {:error, {:invalid_args, msg}} = echo.(%{s: huge}), name
      assert msg =~ "exceed the pool's max_frame_size of 1048576 bytes"
      # Many small items: refused as soon as the JSON passes the limit.
      assert {:error, {:invalid_args, _}} = echo.(%{l: List.duplicate("abcdefgh", 200_000)})
      assert {:ok, _} = echo.(%{s: :binary.copy("x", 900 * 1024)}), name
    end

    assert status(opts).counters.requests == requests + 6
  end
end
