defmodule DSPex.NativePool.LMServer do
  @moduledoc """
  The project's OpenAI-compatible LM server (`priv/python/lm_server.py`), started from Elixir:
  every DSPy signature answered after `latency ± jitter` seconds, offline, so the whole path
  (DSPy -> LiteLLM -> HTTP) runs as with a real provider. Used by the demo and the bench.

  The server is a Port owned by the calling process: it exits when `stop/1` closes it or when
  its owner dies (it ends on stdin EOF).

      {:ok, server} = LMServer.start(latency: 0.5, jitter: 0.1)
      NativePool.execute_anonymous(:configure_lm, LMServer.lm_config(server))
      LMServer.stats(server)  #=> {:ok, %{"served" => 12, "peak_in_flight" => 8, ...}}
      LMServer.stop(server)
  """

  alias DSPex.NativePool.{Native, Python}

  defstruct [:port, :port_number]

  @doc """
  Starts the server. Options: `:latency` and `:jitter` (seconds, default 0.5 and 0.0),
  `:python` (default: the project's interpreter), `:start_timeout` (ms, default 30_000).
  """
  def start(opts \\ []) do
    python = Keyword.get(opts, :python) || Python.default_python()
    script = Path.join(:code.priv_dir(:dspex_native_pool), "python/lm_server.py")

    args =
      [script, "--port", "0", "--exit-on-stdin-eof"] ++
        ["--latency", num(Keyword.get(opts, :latency, 0.5))] ++
        ["--jitter", num(Keyword.get(opts, :jitter, 0.0))]

    port =
      Port.open({:spawn_executable, python}, [:binary, :exit_status, {:line, 1024}, args: args])

    receive do
      {^port, {:data, {:eol, line}}} ->
        {:ok, %__MODULE__{port: port, port_number: line |> String.trim() |> String.to_integer()}}

      {^port, {:exit_status, status}} ->
        {:error, {:lm_server_exited, status}}
    after
      Keyword.get(opts, :start_timeout, 30_000) ->
        stop(%__MODULE__{port: port})
        {:error, :lm_server_start_timeout}
    end
  end

  @doc "The `configure_lm` arguments that point DSPy at this server."
  def lm_config(%__MODULE__{port_number: n}, model \\ "test") do
    %{provider: "openai", model: model, api_base: "http://127.0.0.1:#{n}/v1", api_key: "x"}
  end

  @doc "The server's counters (`GET /v1/stats`): `served`, `peak_in_flight`, ..."
  def stats(%__MODULE__{port_number: n}) do
    request = "GET /v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"

    with {:ok, sock} <-
           :gen_tcp.connect({127, 0, 0, 1}, n, [:binary, active: false, packet: :raw], 5_000),
         :ok <- :gen_tcp.send(sock, request),
         {:ok, response} <- recv_all(sock, []),
         [_head, body] <- :binary.split(response, "\r\n\r\n"),
         {:ok, stats} when is_map(stats) <- Native.json_decode(body) do
      {:ok, stats}
    else
      {:error, _} = error -> error
      other -> {:error, {:bad_stats_response, other}}
    end
  end

  defp recv_all(sock, acc) do
    case :gen_tcp.recv(sock, 0, 5_000) do
      {:ok, data} ->
        recv_all(sock, [acc | data])

      {:error, :closed} ->
        {:ok, IO.iodata_to_binary(acc)}

      {:error, _} = error ->
        :gen_tcp.close(sock)
        error
    end
  end

  @doc "Stops the server (closing its stdin ends it)."
  def stop(%__MODULE__{port: port}) do
    Port.close(port)
    :ok
  rescue
    ArgumentError -> :ok
  end

  defp num(x) when is_number(x), do: to_string(x / 1)
end
