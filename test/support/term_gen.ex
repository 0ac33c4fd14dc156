defmodule DSPex.NativePool.TermGen do
  @moduledoc false
  # Random Elixir terms for property tests of the term <-> JSON conversion (StreamData is on
  # hex, which cannot be reached), and the JSON form each should come back as.
  #
  # Randomness comes from the process's `:rand` state: call `seed/1` first, with a seed the
  # test prints on failure, so a failing case can be replayed.

  @atoms [:a, :b, :key, :Ok, :"with space", :é, :ü, :日本, :"🎉", :"a\"q", :"back\\slash"]
  @literals [nil, true, false]

  @int_min -Integer.pow(2, 63)
  @int_max Integer.pow(2, 64) - 1

  def seed(seed), do: :rand.seed(:exsss, {seed, seed * 31 + 7, seed * 17 + 3})

  @doc "A random term that JSON can hold, of about `size` nodes at most."
  def term(size) when size <= 1, do: scalar()

  def term(size) do
    case :rand.uniform(10) do
      n when n <= 4 -> scalar()
      5 -> list(size)
      6 -> list(size) |> List.to_tuple()
      _ -> map(size)
    end
  end

  def scalar do
    case :rand.uniform(7) do
      1 -> Enum.random(@literals)
      2 -> Enum.random(@atoms)
      3 -> int()
      4 -> float()
      _ -> string()
    end
  end

  def int do
    case :rand.uniform(4) do
      1 ->
        :rand.uniform(200) - 100

      2 ->
        Enum.random([@int_min, @int_min + 1, @int_max, @int_max - 1, Integer.pow(2, 63), -1, 0])

      3 ->
        :rand.uniform(@int_max + 1) - 1

      4 ->
        @int_min + :rand.uniform(Integer.pow(2, 63)) - 1
    end
  end

  def float do
    case :rand.uniform(4) do
      1 ->
        Enum.random([0.0, -0.0, 1.0, -1.5, 1.0e300, -1.0e-300, 5.0e-324, 1.7976931348623157e308])

      2 ->
        (:rand.uniform() - 0.5) * :math.pow(10, :rand.uniform(40) - 20)

      _ ->
        :rand.uniform() * 1000
    end
  end

  # Characters a JSON encoder must get right: escapes, controls, multi-byte, astral.
  @pools [
    Enum.to_list(?a..?z),
    [?", ?\\, ?/, ?\n, ?\r, ?\t, 0, 1, 0x1F, 0x7F],
    Enum.to_list(0xA0..0xFF),
    [0x2028, 0x2029, 0xFEFF, 0x4E2D, 0x65E5],
    [0x1F389, 0x1F600, 0x10FFFF]
  ]

  def string do
    len = :rand.uniform(12) - 1
    for _ <- 1..len//1, into: "", do: <<Enum.random(Enum.random(@pools))::utf8>>
  end

  def list(size) do
    n = :rand.uniform(5) - 1
    for _ <- 1..n//1, do: term(div(size, max(n, 1)) - 1)
  end

  @doc "A map whose keys stay distinct once written as JSON object keys."
  def map(size) do
    n = :rand.uniform(5) - 1

    keys =
      Enum.map(1..n//1, fn _ ->
        case :rand.uniform(3) do
          1 -> Enum.random(@atoms)
          2 -> string()
          3 -> int()
        end
      end)
      |> Enum.uniq_by(&key_text/1)

    Map.new(keys, &{&1, term(div(size, max(n, 1)) - 1)})
  end

  @doc "`depth` nested containers of random kinds around a scalar."
  def chain(depth) do
    Enum.reduce(1..depth//1, scalar(), fn _, acc ->
      case :rand.uniform(3) do
        1 -> [acc]
        2 -> {int(), acc}
        3 -> %{Enum.random(@atoms) => acc}
      end
    end)
  end

  @doc "What `term` becomes after a trip through JSON (as `Jason.decode/1` would give it)."
  def json_form(term) when term in @literals, do: term
  def json_form(term) when is_atom(term), do: Atom.to_string(term)
  def json_form(term) when is_list(term), do: Enum.map(term, &json_form/1)
  def json_form(term) when is_tuple(term), do: term |> Tuple.to_list() |> json_form()

  def json_form(term) when is_map(term),
    do: Map.new(term, fn {k, v} -> {key_text(k), json_form(v)} end)

  def json_form(term), do: term

  def key_text(k) when is_atom(k), do: Atom.to_string(k)
  def key_text(k) when is_integer(k), do: Integer.to_string(k)
  def key_text(k) when is_binary(k), do: k

  @doc "Levels of nested containers in `term`."
  def depth(term) when is_list(term), do: 1 + Enum.reduce(term, 0, &max(depth(&1), &2))
  def depth(term) when is_tuple(term), do: term |> Tuple.to_list() |> depth()
  def depth(term) when is_map(term), do: term |> Map.values() |> depth()
  def depth(_), do: 0
end
