defmodule DSPexBench.Codec do
  @moduledoc false
  # The JSON codec of every baseline (bare Port, V1, V2, poolboy). It must be at least as fast
  # as what DSPex's users run (Jason: ~0.55 µs to decode a ping reply), or the baselines look
  # slower than they are. It runs in the calling process on a normal scheduler, as Jason does:
  #
  #   * decode, up to 16 KiB: the library's serde decoder through `Native.json_decode_small/1`,
  #     a NIF on the calling (normal) scheduler (~0.3-0.5 µs for a ping reply). Debian's
  #     erlang-jiffy decodes a ping reply in ~1 µs, twice Jason's time, so it is not used for
  #     small payloads;
  #   * decode, larger: jiffy (`erlang-jiffy`, installed with apt-get like poolboy), which
  #     yields to the scheduler on long input; without jiffy, the pure-Elixir DSPexBench.JSON;
  #   * encode, small arguments (a flat map of scalars: every request of scenarios 1-5):
  #     DSPexBench.JSON (~0.4 µs, faster than Jason and jiffy for a request this small);
  #   * encode, anything else: jiffy (DSPexBench.JSON without it).
  #
  # `calibrate/0` measures these in the run, next to the pure-Elixir codec, for the report.

  alias DSPex.NativePool.Native
  alias DSPexBench.JSON

  @jiffy_decode [:return_maps, {:null_term, nil}]

  @doc "Puts jiffy on the code path, installing erlang-jiffy when missing. :ok | {:error, why}."
  def ensure_loaded do
    case :persistent_term.get({__MODULE__, :jiffy}, nil) do
      nil ->
        ok = DSPexBench.Debian.ensure(:jiffy, "erlang-jiffy") == :ok and jiffy_works?()
        :persistent_term.put({__MODULE__, :jiffy}, ok)
        if ok, do: :ok, else: {:error, "erlang-jiffy is not usable"}

      true ->
        :ok

      false ->
        {:error, "erlang-jiffy is not usable"}
    end
  end

  defp jiffy_works? do
    :jiffy.decode(~s({"a":[1,null]}), @jiffy_decode) == %{"a" => [1, nil]}
  rescue
    _ -> false
  catch
    _, _ -> false
  end

  defp jiffy?, do: :persistent_term.get({__MODULE__, :jiffy}, false)

  @doc "A JSON binary."
  def encode(term) do
    if small?(term) or not jiffy?(),
      do: IO.iodata_to_binary(JSON.encode(term)),
      else: :jiffy.encode(term, [:use_nil])
  end

  # The request envelope around small arguments: `%{"id" => _, "command" => _, "args" => args}`.
  defp small?(%{"args" => args} = m) when map_size(m) == 3, do: flat?(args)
  defp small?(other), do: flat?(other)

  defp flat?(m) when is_map(m) and map_size(m) <= 16,
    do: Enum.all?(m, fn {_, v} -> scalar?(v) end)

  defp flat?(_), do: false

  defp scalar?(v) when is_binary(v), do: byte_size(v) <= 256
  defp scalar?(v), do: is_number(v) or is_atom(v)

  @doc "{:ok, term} | {:error, reason}."
  def decode(bin) when byte_size(bin) <= 16_384 do
    case Native.json_decode_small(bin) do
      {:ok, _} = ok -> ok
      {:error, _} = e -> e
      :dirty -> decode_large(bin)
    end
  end

  def decode(bin), do: decode_large(bin)

  defp decode_large(bin) do
    if jiffy?() do
      try do
        {:ok, :jiffy.decode(bin, @jiffy_decode)}
      catch
        _, reason -> {:error, reason}
      end
    else
      JSON.decode(bin)
    end
  end

  @doc "What the codec is, for the report."
  def describe do
    large = if jiffy?(), do: "jiffy #{jiffy_vsn()}", else: "the pure-Elixir DSPexBench.JSON"

    "decode: the library's serde decoder as a NIF on the calling (normal) scheduler up to " <>
      "16 KiB, #{large} above; encode: the pure-Elixir encoder for small flat arguments, " <>
      "#{large} otherwise"
  end

  defp jiffy_vsn do
    case Application.spec(:jiffy, :vsn) do
      nil ->
        case Path.wildcard("/usr/lib/erlang/lib/jiffy-*") do
          [dir | _] -> dir |> Path.basename() |> String.replace_prefix("jiffy-", "")
          _ -> "?"
        end

      vsn ->
        to_string(vsn)
    end
  end

  @ping_reply ~s({"id":123456,"success":true,"result":{"status":"ok","worker_id":"0","pid":4297}})

  @doc """
  µs per decode of a ping reply (median of 5 batches of 20,000), with this codec, jiffy and
  the pure-Elixir codec; and per encode of a ping request. Wall time: on a busy machine all
  grow alike, the ratios stay.
  """
  def calibrate do
    req = %{"id" => 123_456, "command" => "ping", "args" => %{}}

    %{
      decode: per_op(fn -> decode(@ping_reply) end),
      decode_jiffy: if(jiffy?(), do: per_op(fn -> :jiffy.decode(@ping_reply, @jiffy_decode) end)),
      decode_pure: per_op(fn -> JSON.decode(@ping_reply) end),
      encode: per_op(fn -> encode(req) end),
      encode_jiffy: if(jiffy?(), do: per_op(fn -> :jiffy.encode(req, [:use_nil]) end))
    }
  end

  defp per_op(f) do
    n = 20_000
    loop(f, 1_000)

    1..5
    |> Enum.map(fn _ ->
      t0 = System.monotonic_time()
      loop(f, n)
      DSPexBench.Stats.native_to_us(System.monotonic_time() - t0) / n
    end)
    |> DSPexBench.Stats.median()
  end

  defp loop(_f, 0), do: :ok

  defp loop(f, n) do
    f.()
    loop(f, n - 1)
  end
end

defmodule DSPexBench.Debian do
  @moduledoc false
  # Erlang applications from Debian packages (hex.pm is out of reach): put their ebin on the
  # code path, installing the package with apt-get when missing.

  def ensure(module, package) do
    if Code.ensure_loaded?(module) do
      :ok
    else
      app = package |> String.replace_prefix("erlang-", "")

      ebin =
        case Path.wildcard("/usr/lib/erlang/lib/#{app}-*/ebin") do
          [] ->
            Mix.shell().info("#{package} is missing: apt-get install -y #{package}")
            System.cmd("apt-get", ["install", "-y", package], stderr_to_stdout: true)
            Path.wildcard("/usr/lib/erlang/lib/#{app}-*/ebin")

          found ->
            found
        end

      Enum.each(ebin, &Code.prepend_path/1)

      if Code.ensure_loaded?(module),
        do: :ok,
        else: {:error, "#{package} is not installed (apt-get install -y #{package})"}
    end
  end
end
