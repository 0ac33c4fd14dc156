defmodule DSPexBench.JSON do
  @moduledoc false
  # A small pure-Elixir JSON codec: the baselines' encoder for small requests (faster than
  # Jason and jiffy there), their decoder when jiffy is missing (for payloads over 16 KiB), the
  # reader of raw_floor.py's output, and the slow reference in DSPexBench.Codec.calibrate/0
  # (it decodes a ping reply ~5x slower than Jason: see bench/codec.ex).
  #
  # Encodes maps (atom or string keys), lists, strings, numbers, booleans, nil and atoms;
  # decodes any JSON into maps with string keys, lists, strings, integers, floats, booleans and
  # nil.

  # ---- encode -------------------------------------------------------------------------------

  @spec encode(term()) :: iodata()
  def encode(nil), do: "null"
  def encode(true), do: "true"
  def encode(false), do: "false"
  def encode(a) when is_atom(a), do: string(Atom.to_string(a))
  def encode(s) when is_binary(s), do: string(s)
  def encode(i) when is_integer(i), do: Integer.to_string(i)
  def encode(f) when is_float(f), do: :erlang.float_to_binary(f, [:short])
  def encode([]), do: "[]"
  def encode([h | t]), do: [?[, encode(h) | Enum.map(t, &[?,, encode(&1)])] ++ [?]]
  def encode(m) when map_size(m) == 0, do: "{}"

  def encode(m) when is_map(m) do
    [{k, v} | rest] = Map.to_list(m)

    [?{, key(k), ?:, encode(v) | Enum.map(rest, fn {k, v} -> [?,, key(k), ?:, encode(v)] end)] ++
      [?}]
  end

  defp key(k) when is_binary(k), do: string(k)
  defp key(k) when is_atom(k), do: string(Atom.to_string(k))
  defp key(k), do: string(to_string(k))

  defp string(s) do
    if clean?(s), do: [?", s, ?"], else: [?", escape(s, []), ?"]
  end

  defp clean?(<<c, rest::binary>>) when c >= 0x20 and c != ?" and c != ?\\, do: clean?(rest)
  defp clean?(<<>>), do: true
  defp clean?(_), do: false

  defp escape(<<?", rest::binary>>, acc), do: escape(rest, [acc | "\\\""])
  defp escape(<<?\\, rest::binary>>, acc), do: escape(rest, [acc | "\\\\"])
  defp escape(<<?\n, rest::binary>>, acc), do: escape(rest, [acc | "\\n"])
  defp escape(<<?\r, rest::binary>>, acc), do: escape(rest, [acc | "\\r"])
  defp escape(<<?\t, rest::binary>>, acc), do: escape(rest, [acc | "\\t"])

  defp escape(<<c, rest::binary>>, acc) when c < 0x20 do
    hex = c |> Integer.to_string(16) |> String.pad_leading(4, "0")
    escape(rest, [acc, "\\u", hex])
  end

  defp escape(<<c, rest::binary>>, acc), do: escape(rest, [acc, c])
  defp escape(<<>>, acc), do: acc

  # ---- decode -------------------------------------------------------------------------------

  @spec decode(binary()) :: {:ok, term()} | {:error, term()}
  def decode(bin) when is_binary(bin) do
    {value, rest} = value(skip(bin))

    case skip(rest) do
      <<>> -> {:ok, value}
      other -> {:error, {:trailing, binary_part(other, 0, min(byte_size(other), 20))}}
    end
  catch
    {:json_error, reason} -> {:error, reason}
  end

  defp skip(<<c, rest::binary>>) when c in [?\s, ?\n, ?\r, ?\t], do: skip(rest)
  defp skip(bin), do: bin

  defp value(<<?{, rest::binary>>), do: object(skip(rest), %{})
  defp value(<<?[, rest::binary>>), do: array(skip(rest), [])
  defp value(<<?", rest::binary>>), do: str(rest, [])
  defp value(<<"true", rest::binary>>), do: {true, rest}
  defp value(<<"false", rest::binary>>), do: {false, rest}
  defp value(<<"null", rest::binary>>), do: {nil, rest}
  defp value(<<c, _::binary>> = bin) when c == ?- or c in ?0..?9, do: number(bin)
  defp value(other), do: fail(other)

  defp object(<<?}, rest::binary>>, acc), do: {acc, rest}

  defp object(<<?", rest::binary>>, acc) do
    {k, rest} = str(rest, [])

    case skip(rest) do
      <<?:, rest::binary>> ->
        {v, rest} = value(skip(rest))
        acc = Map.put(acc, k, v)

        case skip(rest) do
          <<?,, rest::binary>> -> object(skip(rest), acc)
          <<?}, rest::binary>> -> {acc, rest}
          other -> fail(other)
        end

      other ->
        fail(other)
    end
  end

  defp object(other, _), do: fail(other)

  defp array(<<?], rest::binary>>, []), do: {[], rest}

  defp array(bin, acc) do
    {v, rest} = value(bin)

    case skip(rest) do
      <<?,, rest::binary>> -> array(skip(rest), [v | acc])
      <<?], rest::binary>> -> {Enum.reverse([v | acc]), rest}
      other -> fail(other)
    end
  end

  # Copies runs between quotes and escapes in one piece: a byte loop for the first 32 bytes,
  # `:binary.match/2` beyond (long strings stay cheap).
  defp str(bin, acc) do
    n = scan(bin, 0)

    case bin do
      <<chunk::binary-size(n), ?", rest::binary>> ->
        {if(acc == [], do: chunk, else: IO.iodata_to_binary([acc | chunk])), rest}

      <<chunk::binary-size(n), ?\\, rest::binary>> ->
        {char, rest} = unescape(rest)
        str(rest, [acc, chunk | char])

      _ ->
        throw({:json_error, :unterminated_string})
    end
  end

  defp scan(bin, 32) do
    case :binary.match(bin, ["\"", "\\"], scope: {32, byte_size(bin) - 32}) do
      {pos, 1} -> pos
      :nomatch -> byte_size(bin)
    end
  end

  defp scan(bin, n) do
    case bin do
      <<_::binary-size(n), c, _::binary>> when c != ?" and c != ?\\ -> scan(bin, n + 1)
      _ -> n
    end
  end

  defp unescape(<<?", rest::binary>>), do: {"\"", rest}
  defp unescape(<<?\\, rest::binary>>), do: {"\\", rest}
  defp unescape(<<?/, rest::binary>>), do: {"/", rest}
  defp unescape(<<?b, rest::binary>>), do: {"\b", rest}
  defp unescape(<<?f, rest::binary>>), do: {"\f", rest}
  defp unescape(<<?n, rest::binary>>), do: {"\n", rest}
  defp unescape(<<?r, rest::binary>>), do: {"\r", rest}
  defp unescape(<<?t, rest::binary>>), do: {"\t", rest}

  defp unescape(<<?u, a::binary-size(4), "\\u", b::binary-size(4), rest::binary>> = bin) do
    hi = String.to_integer(a, 16)
    lo = String.to_integer(b, 16)

    if hi in 0xD800..0xDBFF and lo in 0xDC00..0xDFFF do
      {<<0x10000 + (hi - 0xD800) * 0x400 + (lo - 0xDC00)::utf8>>, rest}
    else
      <<?u, _::binary-size(4), rest::binary>> = bin
      {<<hi::utf8>>, rest}
    end
  end

  defp unescape(<<?u, a::binary-size(4), rest::binary>>),
    do: {<<String.to_integer(a, 16)::utf8>>, rest}

  defp unescape(other), do: fail(other)

  defp number(bin) do
    {text, rest} = take_number(bin, 0)

    if String.contains?(text, [".", "e", "E"]) do
      case Float.parse(text) do
        {f, ""} -> {f, rest}
        _ -> fail(bin)
      end
    else
      {String.to_integer(text), rest}
    end
  end

  defp take_number(bin, n) do
    case bin do
      <<_::binary-size(n), c, _::binary>> when c in ?0..?9 or c in [?-, ?+, ?., ?e, ?E] ->
        take_number(bin, n + 1)

      <<text::binary-size(n), rest::binary>> ->
        {text, rest}
    end
  end

  defp fail(bin),
    do: throw({:json_error, {:unexpected, binary_part(bin, 0, min(byte_size(bin), 20))}})
end
