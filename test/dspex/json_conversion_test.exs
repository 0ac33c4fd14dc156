defmodule DSPex.NativePool.JsonConversionTest do
  # The pool's own term <-> JSON conversion, as used for every request and reply.
  use ExUnit.Case, async: true

  alias DSPex.NativePool.Native

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

  test "integers beyond 64 bits are written exactly" do
    big = 123_456_789_012_345_678_901_234_567_890
    assert {:ok, "123456789012345678901234567890"} = Native.json_encode(big)
    assert {:ok, "-18446744073709551617"} = Native.json_encode(-18_446_744_073_709_551_617)
    assert {:ok, "18446744073709551615"} = Native.json_encode(18_446_744_073_709_551_615)
    assert {:ok, 18_446_744_073_709_551_615} = Native.json_decode("18446744073709551615")
  end

  test "replies decode with string keys; duplicate keys keep the last value" do
    assert {:ok, %{"a" => [1, %{"b" => nil}]}} = Native.json_decode(~s({"a": [1, {"b": null}]}))
    assert {:ok, %{"k" => 2}} = Native.json_decode(~s({"k": 1, "k": 2}))
    assert {:ok, 1.0e300} = Native.json_decode("1e300")
    assert {:error, {:decode_error, _}} = Native.json_decode("{")
    assert {:error, {:decode_error, _}} = Native.json_decode("[1] trailing")
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

    deep = Enum.reduce(1..300, 1, fn _, acc -> [acc] end)
    assert {:error, {:invalid_args, msg}} = Native.json_encode(deep)
    assert msg =~ "nested deeper than 256 levels"
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
