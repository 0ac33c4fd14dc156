defmodule DSPex.NativePool.ConversionPropertyTest do
  # Random terms through the conversion: the NIF alone (many), and a real echo worker (fewer).
  use DSPex.NativePool.PoolCase, async: true

  alias DSPex.NativePool.TermGen

  @max_depth 250

  setup do
    seed = ExUnit.configuration()[:seed] || System.unique_integer([:positive])
    TermGen.seed(seed)
    %{seed: seed}
  end

  defp roundtrip(term) do
    with {:ok, json} <- Native.json_encode(term), do: Native.json_decode(json)
  end

  test "term -> JSON -> term gives the term's JSON form", %{seed: seed} do
    for i <- 1..2_000 do
      term = TermGen.term(:rand.uniform(60))
      expected = TermGen.json_form(term)

      assert {:ok, ^expected} = roundtrip(term),
             "seed #{seed}, case #{i}: #{inspect(term, limit: :infinity)}"

      # The JSON form is a fixed point.
      assert {:ok, ^expected} = roundtrip(expected)
    end
  end

  test "random nesting around the limit: accepted at or under it, refused over it", %{seed: seed} do
    for i <- 1..200 do
      depth = @max_depth - 5 + :rand.uniform(10)
      term = TermGen.chain(depth)

      if depth <= @max_depth do
        expected = TermGen.json_form(term)
        assert {:ok, ^expected} = roundtrip(term), "seed #{seed}, case #{i}, depth #{depth}"
      else
        assert {:error, {:invalid_args, msg}} = roundtrip(term), "seed #{seed}, case #{i}"
        assert msg =~ "nested deeper than #{@max_depth} levels"
      end
    end
  end

  test "a key that collides once written is always refused", %{seed: seed} do
    for i <- 1..300 do
      base = TermGen.map(40)
      # Two keys written alike ("K" is in none of the generator's character pools).
      {a, b} =
        Enum.random([
          {:"K#{i}", "K#{i}"},
          {i + 1_000_000, "#{i + 1_000_000}"},
          {:"#{i}", i}
        ])

      term = [base |> Map.put(a, 1) |> Map.put(b, 2)]
      assert {:error, {:invalid_args, msg}} = roundtrip(term), "seed #{seed}, case #{i}"
      assert msg =~ "args[0] has keys"
      assert msg =~ "in JSON: keep one"
    end
  end

  test "random terms round-trip through a real worker (normal and dirty paths)", %{seed: seed} do
    opts = start_pool(pool_size: 1)
    pad = String.duplicate("p", 70_000)

    for i <- 1..150 do
      term = TermGen.term(:rand.uniform(40))
      expected = TermGen.json_form(term)
      args = if rem(i, 3) == 0, do: %{v: term, pad: pad}, else: %{v: term}

      assert {:ok, %{"v" => ^expected}} = NativePool.execute_anonymous(:echo, args, opts),
             "seed #{seed}, case #{i}: #{inspect(term, limit: :infinity)}"
    end
  end
end
