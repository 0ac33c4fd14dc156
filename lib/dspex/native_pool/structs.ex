defmodule DSPex.NativePool.Structs do
  @moduledoc """
  Structs in arguments, written as Jason writes them.

  The NIF encodes plain terms itself and stops at the first struct (`:structs`); the call then
  passes its arguments through `convert/1` once and is sent again, so arguments without
  structs never pay for this walk. Conversions, as `Jason.Encoder` does them:

    * `DateTime`, `NaiveDateTime`, `Date`, `Time`: their ISO 8601 string
      (`~U[2025-07-01 12:00:00Z]` -> `"2025-07-01T12:00:00Z"`), with or without Jason
    * any other struct, when Jason is loaded (it is not a dependency): what its
      `Jason.Encoder` implementation writes (`@derive Jason.Encoder`, `Decimal`, ...)
    * otherwise: `{:error, {:invalid_args, "args.path is a struct (Module) ..."}}`

  Containers nested deeper than the pool's depth limit (250) are left as they are, for the
  NIF to refuse.
  """

  alias DSPex.NativePool.Native

  # The NIF's `term::MAX_DEPTH`: a container enclosed by this many others is refused there.
  @max_depth 250

  @calendar [DateTime, NaiveDateTime, Date, Time]

  @doc """
  Replaces every struct in `term` by its JSON form (see the moduledoc).

      iex> DSPex.NativePool.Structs.convert(%{at: ~D[2025-07-01], n: [~T[12:30:00.120]]})
      {:ok, %{at: "2025-07-01", n: ["12:30:00.120"]}}
  """
  @spec convert(term()) :: {:ok, term()} | {:error, {:invalid_args, String.t()}}
  def convert(term) do
    {:ok, walk(term, [], 0)}
  catch
    {__MODULE__, path, what} -> {:error, {:invalid_args, "#{format_path(path)} #{what}"}}
  end

  # `path` is reversed: the innermost key or index first; only formatted for an error.
  # A struct is converted at any depth a value may have (a DateTime where its string would be
  # accepted); containers are walked only up to the limit.
  defp walk(%module{} = struct, _path, _depth) when module in @calendar,
    do: module.to_iso8601(struct)

  defp walk(%module{} = struct, path, _depth) when is_atom(module), do: via_jason(struct, path)

  defp walk(term, _path, depth) when depth >= @max_depth, do: term

  defp walk(map, path, depth) when is_map(map),
    do: Map.new(map, fn {k, v} -> {k, walk(v, [{:key, k} | path], depth + 1)} end)

  defp walk(list, path, depth) when is_list(list), do: walk_list(list, 0, path, depth + 1)

  defp walk(tuple, path, depth) when is_tuple(tuple) do
    tuple |> Tuple.to_list() |> walk_list(0, path, depth + 1) |> List.to_tuple()
  end

  defp walk(other, _path, _depth), do: other

  defp walk_list([head | tail], i, path, depth),
    do: [walk(head, [{:index, i} | path], depth) | walk_list(tail, i + 1, path, depth)]

  # [] or an improper tail, which the NIF refuses with its path.
  defp walk_list(tail, _i, _path, _depth), do: tail

  defp via_jason(%module{} = struct, path) do
    name = inspect(module)

    if Code.ensure_loaded?(Jason) do
      # apply/3: Jason is optional, and this module must compile without it.
      with {:ok, json} <- apply(Jason, :encode, [struct]),
           {:ok, plain} <- Native.json_decode(json) do
        plain
      else
        {:error, %Protocol.UndefinedError{value: ^struct}} ->
          refuse(
            path,
            "is a struct (#{name}) with no Jason.Encoder implementation: derive one " <>
              "(@derive Jason.Encoder) or convert it to a plain map"
          )

        {:error, %{__exception__: true} = e} ->
          # Jason's first line: what inside the struct it could not encode.
          [line | _] = String.split(Exception.message(e), "\n", parts: 2)
          refuse(path, "is a struct (#{name}) that Jason cannot encode: #{line}")

        {:error, reason} ->
          refuse(path, "is a struct (#{name}) whose JSON is unusable: #{inspect(reason)}")
      end
    else
      refuse(
        path,
        "is a struct (#{name}) with no JSON form: implement Jason.Encoder for it, " <>
          "with Jason loaded, or convert it to a plain map"
      )
    end
  end

  defp refuse(path, what), do: throw({__MODULE__, path, what})

  defp format_path(path) do
    path
    |> Enum.reverse()
    |> Enum.map(fn
      {:index, i} -> "[#{i}]"
      {:key, k} when is_atom(k) -> ".#{k}"
      {:key, k} when is_binary(k) -> ".#{k}"
      {:key, k} -> ".#{inspect(k)}"
    end)
    |> then(&IO.iodata_to_binary(["args" | &1]))
  end
end
