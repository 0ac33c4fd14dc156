defmodule DSPex.NativePool.JsonConversionTest do
  # The pool's own term <-> JSON conversion, as used for every request and reply.
  use ExUnit.Case, async: true

  alias DSPex.NativePool.{Native, Structs}

  doctest DSPex.NativePool.Structs

  @max_depth 250
  @int_min -Integer.pow(2, 63)
  @int_max Integer.pow(2, 64) - 1

  defp roundtrip(term) do
    {:ok, json} = Native.json_encode(term)
    {:ok, back} = Native.json_decode(json)
    {json, back}
  end

  test "terms map to JSON as Jason would, with atom keys and tuples accepted" do
    assert {~s({"a":1}), %{"a" => 1}} = roundtrip(%{a: 1})

    assert {"[1,2.5,null,true,false,\"x\",\"é\"]", [1, 2.5, nil, true, false, "x", "é"]} =
             roundtrip([1, 2.5, nil, true, false, :x, "é"])

    assert {"[1,[2,\"b\"]]", [1, [2, "b"]]} = roundtrip({1, {2, :b}})
    assert {~s({"1":"one"}), %{"1" => "one"}} = roundtrip(%{1 => "one"})
    assert {"[]", []} = roundtrip([])
    assert {"{}", %{}} = roundtrip(%{})
    assert {~s("a\\"b\\nc"), "a\"b\nc"} = roundtrip("a\"b\nc")
  end

  test "atoms of any Unicode name encode, as keys and as values" do
    term = %{:日本 => :東京, :é => [:"🎉", :ü], :"with space" => :ok}
    {json, back} = roundtrip(term)
    assert json =~ ~s("日本":"東京")
    assert back == %{"日本" => "東京", "é" => ["🎉", "ü"], "with space" => "ok"}
    assert {:ok, ~s("Ω")} = Native.json_encode(:Ω)
  end

  describe "integers" do
    test "the worker's range (-2^63..2^64-1, what orjson reads exactly) is written exactly" do
      for i <- [@int_min, @int_min + 1, -1, 0, 1, Integer.pow(2, 63), @int_max] do
        assert {json, ^i} = roundtrip(i)
        assert json == Integer.to_string(i)
      end

      assert {~s({"18446744073709551615":1}), _} = roundtrip(%{@int_max => 1})
    end

    test "outside it they are refused with their path, not sent for the worker to choke on" do
      for i <- [@int_min - 1, @int_max + 1, Integer.pow(2, 1100), -Integer.pow(2, 1100)] do
        assert {:error, {:invalid_args, msg}} = Native.json_encode(%{x: [1, %{y: i}]})

        assert msg =~
                 "args.x[1].y is an integer outside -9223372036854775808..18446744073709551615"
      end

      assert {:error, {:invalid_args, msg}} = Native.json_encode(%{m: %{(@int_max + 1) => 1}})
      assert msg =~ "args.m has an integer key outside"
    end

    test "a huge bignum is refused at once, not converted to decimal first" do
      # Converting 2^16M to decimal took 2.6 s on a scheduler before.
      huge = Bitwise.bsl(1, 16_000_000)
      {us, result} = :timer.tc(fn -> Native.json_encode(%{x: huge}) end)
      assert {:error, {:invalid_args, "args.x is an integer outside" <> _}} = result
      # Not a timing margin: the refusal does no work proportional to the number's size.
      assert us < 2_000_000
    end

    test "replies: integers beyond 64 bits read as floats (as orjson), beyond a float's range fail" do
      assert {:ok, 18_446_744_073_709_551_615} = Native.json_decode("18446744073709551615")
      assert {:ok, -9_223_372_036_854_775_808} = Native.json_decode("-9223372036854775808")
      assert {:ok, 1.8446744073709552e19} = Native.json_decode("18446744073709551616")
      assert {:ok, 1.0e300} = Native.json_decode("1e300")
      assert {:error, {:decode_error, msg}} = Native.json_decode("[1e400]")
      assert msg =~ "number out of range"
      assert {:error, {:decode_error, _}} = Native.json_decode("1" <> String.duplicate("0", 400))
    end
  end

  test "replies decode with string keys; duplicate keys keep the last value" do
    assert {:ok, %{"a" => [1, %{"b" => nil}]}} = Native.json_decode(~s({"a": [1, {"b": null}]}))
    assert {:ok, %{"k" => 2}} = Native.json_decode(~s({"k": 1, "k": 2}))
    assert {:ok, "é😀\n"} = Native.json_decode(~s("\\u00e9\\ud83d\\ude00\\n"))
    assert {:error, {:decode_error, _}} = Native.json_decode("{")
    assert {:error, {:decode_error, _}} = Native.json_decode("[1] trailing")
    assert {:error, {:decode_error, _}} = Native.json_decode(~s("\\ud800"))
    assert {:error, {:decode_error, _}} = Native.json_decode(<<?", 0xFF, ?">>)
  end

  test "keys that collide once written are refused, not silently merged" do
    assert {:error, {:invalid_args, msg}} = Native.json_encode(%{:a => 1, "a" => 2})
    assert msg == ~s(args has keys :a and "a" that are both "a" in JSON: keep one)

    assert {:error, {:invalid_args, msg}} =
             Native.json_encode(%{list: [%{}, %{1 => :x, "1" => :y}]})

    assert msg =~ ~s(args.list[1] has keys 1 and "1" that are both "1" in JSON)

    assert {:error, {:invalid_args, _}} = Native.json_encode(%{nil => 1, "nil" => 2})
    # Keys of different kinds that do not collide are fine.
    assert {_, %{"a" => 1, "b" => 2, "3" => 3}} = roundtrip(%{:a => 1, "b" => 2, 3 => 3})
  end

  test "json_decode_small decodes like json_decode on the calling scheduler, up to 16 KiB" do
    reply = ~s({"id":7,"success":true,"result":{"status":"ok","pid":42,"x":[1.5,null]}})
    assert Native.json_decode_small(reply) == Native.json_decode(reply)
    assert {:error, {:decode_error, _}} = Native.json_decode_small("{")

    at_limit = ~s(") <> String.duplicate("a", 16 * 1024 - 2) <> ~s(")
    assert {:ok, text} = Native.json_decode_small(at_limit)
    assert byte_size(text) == 16 * 1024 - 2
    # Larger input is left to the dirty-scheduler json_decode/1.
    assert :dirty = Native.json_decode_small(at_limit <> " ")
  end

  test "what JSON cannot express is refused with its path" do
    assert {:error, {:invalid_args, "args.a[1].b is a pid, which has no JSON form"}} =
             Native.json_encode(%{a: [1, %{b: self()}]})

    assert {:error, {:invalid_args, "args[0] is an improper list"}} =
             Native.json_encode([[1 | 2]])

    assert {:error, {:invalid_args, "args.t[1] is a reference" <> _}} =
             Native.json_encode(%{t: {1, make_ref()}})

    assert {:error, {:invalid_args, "args.k has a map key that is not an atom" <> _}} =
             Native.json_encode(%{k: %{{1} => 2}})
  end

  describe "depth: one limit (250 levels) both ways, on every scheduler" do
    # Each shape wraps a leaf `n` times; `n` levels of containers in all.
    @shapes %{
      maps: &__MODULE__.wrap_map/1,
      lists: &__MODULE__.wrap_list/1,
      tuples: &__MODULE__.wrap_tuple/1,
      mixed: &__MODULE__.wrap_mixed/1
    }

    def wrap_map(acc), do: %{k: acc}
    def wrap_list(acc), do: [acc]
    def wrap_tuple(acc), do: {acc}

    def wrap_mixed(acc) do
      case :erlang.phash2(acc, 3) do
        0 -> %{"k" => acc}
        1 -> [1, acc]
        2 -> {acc, :x}
      end
    end

    def nest(wrap, n), do: Enum.reduce(1..n, "leaf", fn _, acc -> wrap.(acc) end)

    for {name, _} <- @shapes do
      test "#{name}: accepted up to the limit, refused just over it, both directions" do
        wrap = @shapes[unquote(name)]

        for n <- [@max_depth - 1, @max_depth] do
          term = nest(wrap, n)
          assert {:ok, json} = Native.json_encode(term), "#{n} levels"
          assert {:ok, _} = Native.json_decode(json), "#{n} levels"
        end

        over = nest(wrap, @max_depth + 1)
        assert {:error, {:invalid_args, msg}} = Native.json_encode(over)
        assert msg =~ "is nested deeper than 250 levels"

        # The same text, one level deeper, from a worker.
        {:ok, json} = Native.json_encode(nest(wrap, @max_depth))
        assert {:error, {:decode_error, msg}} = Native.json_decode("[" <> json <> "]")
        assert msg =~ "nested deeper than 250 levels"
      end
    end

    test "far deeper terms and texts are refused without touching the stack" do
      # A 185-deep map crashed json_encode (and the VM) before: recursion on a dirty scheduler.
      for n <- [@max_depth + 50, 1_000, 100_000] do
        assert {:error, {:invalid_args, _}} = Native.json_encode(nest(&wrap_map/1, n))
      end

      deep_text = String.duplicate(~s({"k":[), 500_000) <> "1" <> String.duplicate("]}", 500_000)
      assert {:error, {:decode_error, _}} = Native.json_decode(deep_text)
    end
  end

  describe "structs" do
    test "the NIF stops at the first struct and says where; Structs.convert/1 writes it" do
      assert {:error, {:invalid_args, msg}} = Native.json_encode(%{a: [~D[2025-07-01]]})
      assert msg =~ "args.a[0] is a struct (Date)"

      dt = ~U[2025-07-01 12:34:56.789012Z]
      ndt = ~N[2025-07-01 12:34:56.100]

      offset =
        DateTime.from_naive!(~N[2025-07-01 12:00:00], "Etc/UTC")
        |> Map.put(:utc_offset, 3600)
        |> Map.put(:time_zone, "Europe/Paris")
        |> Map.put(:zone_abbr, "CET")

      args = %{at: dt, list: [ndt, {~D[-0001-12-31], ~T[23:59:59]}], nested: %{o: offset}}

      assert {:ok, plain} = Structs.convert(args)

      assert plain == %{
               at: "2025-07-01T12:34:56.789012Z",
               list: ["2025-07-01T12:34:56.100", {"-0001-12-31", "23:59:59"}],
               nested: %{o: DateTime.to_iso8601(offset)}
             }

      assert {:ok, json} = Native.json_encode(plain)
      assert json =~ ~s("at":"2025-07-01T12:34:56.789012Z")
    end

    test "a struct Jason cannot write is refused with its path (Jason is not loaded here)" do
      refute Code.ensure_loaded?(Jason)

      assert {:error, {:invalid_args, msg}} =
               Structs.convert(%{"a" => [1, %{b: URI.parse("http://x")}]})

      assert msg ==
               "args.a[1].b is a struct (URI) with no JSON form: implement Jason.Encoder " <>
                 "for it, with Jason loaded, or convert it to a plain map"
    end

    test "conversion stops at the depth limit, where the NIF refuses" do
      deep = Enum.reduce(1..(@max_depth - 1), ~D[2025-01-01], fn _, acc -> [acc] end)
      assert {:ok, converted} = Structs.convert(deep)
      assert {:ok, _} = Native.json_encode(converted)

      # A struct where a string may be is converted, as the NIF asks; one inside a container
      # over the limit is left for the NIF to refuse.
      assert {:error, {:invalid_args, msg}} = Native.json_encode([deep])
      assert msg =~ "is a struct (Date)"
      assert {:ok, [^converted]} = Structs.convert([deep])
      assert {:ok, _} = Native.json_encode([converted])
      too_deep = [[deep]]
      assert {:ok, ^too_deep} = Structs.convert(too_deep)
      assert {:error, {:invalid_args, msg}} = Native.json_encode(too_deep)
      assert msg =~ "nested deeper than 250 levels"
    end
  end

  test "large terms encode (on a dirty scheduler when called through the pool)" do
    items = for i <- 1..20_000, do: %{id: i, name: "item #{i}", tags: ["a", "b"]}
    {json, back} = roundtrip(%{items: items})
    assert byte_size(json) > 900_000
    assert length(back["items"]) == 20_000

    assert List.last(back["items"]) == %{
             "id" => 20_000,
             "name" => "item 20000",
             "tags" => ["a", "b"]
           }
  end
end
