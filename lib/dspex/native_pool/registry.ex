defmodule DSPex.NativePool.Registry do
  @moduledoc false
  # The application's one process. It owns the global session table (sessions are global, as
  # in SessionPoolV2: tracking works with no pool running) and publishes running pools in
  # :persistent_term for callers. Every publish and unpublish goes through here, so they are
  # ordered; and it monitors each pool's owner: when an owner dies without cleaning up (killed),
  # its entries are erased and its native pool stopped, so no pool outlives its owner and a
  # name re-used by a new owner is never erased by the old one's death.

  use GenServer

  alias DSPex.NativePool.Native

  # SessionPoolV2's table, with its rows (`{session_id, info}`): see NativePool's sessions.
  @sessions :dspex_pool_sessions
  @session_tools :dspex_native_pool_session_tools

  def start_link(_opts), do: GenServer.start_link(__MODULE__, :ok, name: __MODULE__)

  @doc "The global session table, starting the application if it is not (a script, `-pa`)."
  def sessions do
    if :ets.whereis(@sessions) == :undefined do
      ensure_started()
      # Created by SessionPoolV2 in this VM, its owner gone since: this process owns it now.
      if :ets.whereis(@sessions) == :undefined, do: GenServer.call(__MODULE__, :sessions_table)
    end

    @sessions
  end

  @doc "The table of the Elixir tools registered per session (`NativePool.register_tools/2`)."
  def session_tools do
    if :ets.whereis(@session_tools) == :undefined, do: ensure_started()
    @session_tools
  end

  @doc "Starts `:dspex_native_pool` (this process) when it is not running."
  def ensure_started do
    if Process.whereis(__MODULE__) == nil do
      {:ok, _} = Application.ensure_all_started(:dspex_native_pool)
    end

    :ok
  end

  @doc """
  Publishes `pool` for callers under `[name | aliases]`, owned by the calling process. `name`
  (the registered name of the caller) always wins; an alias (V2's `:"X_pool"`) never hides a
  pool whose own name it is, and comes back when that pool stops.
  """
  def publish(names, pool), do: GenServer.call(__MODULE__, {:publish, self(), names, pool})

  @doc "Erases what the calling process published; its native pool is the caller's to stop."
  def unpublish, do: GenServer.call(__MODULE__, {:unpublish, self()})

  @doc "The resources of every running pool."
  def pools, do: GenServer.call(__MODULE__, :pools)

  @impl true
  def init(:ok) do
    new_sessions_table()

    :ets.new(@session_tools, [:set, :public, :named_table, read_concurrency: true])

    # owners: pid => {monitor, [name | aliases], pool}; names: name => pid publishing it
    {:ok, %{owners: %{}, names: %{}}}
  end

  @impl true
  def handle_call({:publish, pid, [name | aliases] = names, pool}, _from, state) do
    monitor = Process.monitor(pid)
    # An alias that is another running pool's own name stays that pool's.
    mine = [name | Enum.reject(aliases, &own_name_of_other?(state, &1, pid))]
    Enum.each(mine, &:persistent_term.put({DSPex.PythonBridge.NativePool, &1}, pool))

    state = %{
      owners: Map.put(state.owners, pid, {monitor, names, pool}),
      names: Enum.reduce(mine, state.names, &Map.put(&2, &1, pid))
    }

    {:reply, :ok, state}
  end

  def handle_call({:unpublish, pid}, _from, state) do
    {:reply, :ok, forget(state, pid, false)}
  end

  def handle_call(:sessions_table, _from, state) do
    new_sessions_table()
    {:reply, :ok, state}
  end

  def handle_call(:pools, _from, state) do
    {:reply, for({_, {_, _, pool}} <- state.owners, do: pool.resource), state}
  end

  @impl true
  def handle_info({:DOWN, _, :process, pid, _}, state), do: {:noreply, forget(state, pid, true)}

  defp forget(state, pid, stop?) do
    case Map.pop(state.owners, pid) do
      {nil, _} ->
        state

      {{monitor, names, pool}, owners} ->
        Process.demonitor(monitor, [:flush])
        # A name taken over by a newer owner stays with it.
        mine = Enum.filter(names, &(Map.get(state.names, &1) == pid))
        Enum.each(mine, &:persistent_term.erase({DSPex.PythonBridge.NativePool, &1}))
        if stop?, do: Native.pool_stop(pool.resource)
        state = %{owners: owners, names: Map.drop(state.names, mine)}
        # A freed name that is another pool's alias (its own name took it over) is that pool's
        # again.
        Enum.reduce(mine, state, &restore_alias/2)
    end
  end

  # SessionPoolV2 (in the same VM) may have created it already: then it is used as it is.
  defp new_sessions_table do
    if :ets.whereis(@sessions) == :undefined do
      :ets.new(@sessions, [
        :set,
        :public,
        :named_table,
        read_concurrency: true,
        write_concurrency: true
      ])
    end

    :ok
  end

  defp own_name_of_other?(state, name, pid) do
    case Map.get(state.names, name) do
      nil -> false
      ^pid -> false
      holder -> match?({_, [^name | _], _}, Map.get(state.owners, holder))
    end
  end

  defp restore_alias(name, state) do
    case Enum.find(state.owners, fn {_, {_, [_ | aliases], _}} -> name in aliases end) do
      nil ->
        state

      {pid, {_, _, pool}} ->
        :persistent_term.put({DSPex.PythonBridge.NativePool, name}, pool)
        %{state | names: Map.put(state.names, name, pid)}
    end
  end
end
