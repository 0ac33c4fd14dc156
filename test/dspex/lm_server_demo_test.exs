defmodule DSPex.NativePool.LMServerDemoTest do
  # The local OpenAI-compatible LM server as the demo and the bench start it, and the demo
  # itself end to end on it (a separate VM, as a user runs it).
  use DSPex.NativePool.PoolCase, async: true

  alias DSPex.NativePool.LMServer

  @moduletag timeout: 240_000

  test "LMServer starts the server, reports its counters and stops it" do
    assert {:ok, %LMServer{port: port, port_number: n} = server} = LMServer.start(latency: 0.0)
    assert n > 0
    {:os_pid, os_pid} = Port.info(port, :os_pid)

    assert LMServer.lm_config(server) == %{
             provider: "openai",
             model: "test",
             api_base: "http://127.0.0.1:#{n}/v1",
             api_key: "x"
           }

    assert {:ok, %{"served" => 0, "peak_in_flight" => 0}} = LMServer.stats(server)

    assert :ok = LMServer.stop(server)
    # The server exits on stdin EOF.
    assert eventually(fn -> not File.exists?("/proc/#{os_pid}") end, 10_000)
    assert {:error, _} = LMServer.stats(server)
  end

  @tag :dspy
  test "the demo runs on the HTTP LM server: every call answered, a worker killed, 0 errors" do
    {out, status} =
      System.cmd(
        "mix",
        ~w(dspex_native_pool.demo --offline --sessions 6 --programs 1 --executions 2 --pool-size 2 --latency-ms 200),
        stderr_to_stdout: true,
        env: [{"MIX_ENV", "test"}]
      )

    assert status == 0, out
    assert out =~ "local OpenAI-compatible LM server"
    assert out =~ ~r/^errors\s+0$/m
    assert out =~ ~r/^workers replaced\s+1$/m
    # 6 sessions x 2 executions reached the server (more if some ran again after the kill).
    [served] = Regex.run(~r/^LM requests served \(HTTP\)\s+(\d+)$/m, out, capture: :all_but_first)
    assert String.to_integer(served) >= 12
    assert [_] = Regex.run(~r/^LM requests at once \(server peak\)\s+\d+$/m, out)
  end
end
