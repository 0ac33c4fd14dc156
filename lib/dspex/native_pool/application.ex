defmodule DSPex.NativePool.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    Supervisor.start_link(
      [
        DSPex.NativePool.Registry,
        # Elixir tools of ReAct agents (Tools) and `into:` stream forwarders (Streaming).
        {Task.Supervisor, name: DSPex.NativePool.TaskSupervisor}
      ],
      strategy: :one_for_one,
      name: DSPex.NativePool.Supervisor
    )
  end
end
