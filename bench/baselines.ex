defmodule DSPexBench.Proto do
  @moduledoc false
  # The worker protocol for the baselines. Ports opened with `{:packet, 4}` add and strip the
  # length header; JSON is encoded and decoded in the calling process by DSPexBench.Codec (as
  # fast as Jason, which DSPex's Protocol used), as DSPex's Protocol did.

  alias DSPexBench.Codec

  # DSPex's Protocol.encode_request/3 returned a binary (Jason.encode!).
  def encode_request(id, command, args) do
    Codec.encode(%{"id" => id, "command" => to_string(command), "args" => args})
  end

  # V2's Protocol.decode_response/1 shape.
  def decode_response(data) do
    case Codec.decode(data) do
      {:ok, %{"id" => id} = response} -> {:ok, id, response}
      {:ok, _} -> {:error, :malformed_response}
      {:error, reason} -> {:error, reason}
    end
  end

  def result(%{"success" => true, "result" => result}), do: {:ok, result}
  def result(%{"success" => false, "error" => error}), do: {:error, error}
  def result(_), do: {:error, :malformed_response}

  @doc "Opens a worker Port owned by the calling process, stderr discarded."
  def open_port(python, script, worker_id) do
    # `exec` replaces the shell, so the Port speaks to Python itself. Worker stderr (its
    # "ready" log line) would otherwise land on the terminal.
    Port.open({:spawn_executable, "/bin/sh"}, [
      :binary,
      :exit_status,
      {:packet, 4},
      {:args,
       [
         "-c",
         ~s(exec "$0" "$@" 2>/dev/null),
         python,
         script,
         "--mode",
         "pool-worker",
         "--worker-id",
         to_string(worker_id)
       ]}
    ])
  end

  @doc "One request/reply on a Port the calling process is connected to."
  def round_trip(port, command, args, timeout \\ 30_000) do
    id = System.unique_integer([:positive, :monotonic])
    send(port, {self(), {:command, encode_request(id, command, args)}})

    receive do
      {^port, {:data, data}} ->
        case decode_response(data) do
          {:ok, ^id, response} -> result(response)
          {:ok, _other, _} -> {:error, :response_mismatch}
          {:error, reason} -> {:error, {:decode_error, reason}}
        end

      {^port, {:exit_status, status}} ->
        {:error, {:port_exited, status}}
    after
      timeout -> {:error, :timeout}
    end
  end

  @doc "Opens a Port and waits for its first ping (what PoolWorkerV2.init_worker does)."
  def start_worker(python, script, worker_id) do
    port = open_port(python, script, worker_id)

    case round_trip(port, "ping", %{initialization: true}, 60_000) do
      {:ok, _} ->
        port

      error ->
        close(port)
        raise "worker #{worker_id} did not start: #{inspect(error)}"
    end
  end

  def close(port) do
    Port.close(port)
  rescue
    ArgumentError -> :ok
  end
end

defmodule DSPexBench.BarePort do
  @moduledoc false
  # The floor on the BEAM side: a Port owned by the caller, nothing in between.

  alias DSPexBench.Proto

  def open(python, script), do: Proto.start_worker(python, script, 0)
  def call(port, command, args), do: Proto.round_trip(port, command, args)
  def close(port), do: Proto.close(port)
end

defmodule DSPexBench.V2Pool do
  @moduledoc false
  # DSPex's SessionPoolV2 + PoolWorkerV2 on NimblePool, rebuilt without hex: a pool process
  # that owns the Ports and hands one to the caller (`Port.connect`); the caller sends the
  # request and waits for the reply in its own process, then checks the worker in.
  #
  # The pool side follows NimblePool 1.x message for message: the checkout is a `$gen_call`
  # tagged with the caller's monitor of the pool, the pool monitors the caller, and
  # checkin/cancel are plain messages. The client follows SessionPoolV2.execute_anonymous/3.
  #
  # One change from V2, the one CONTRACT.md §6.5 asks for: before checking in, the caller
  # connects the Port back to the pool (as NimblePool's own PortPool example does). V2 never
  # did, so the Port stayed owned by (and linked to) the last caller.

  use GenServer

  alias DSPexBench.Proto

  defstruct [
    :python,
    :script,
    resources: :queue.new(),
    queue: :queue.new(),
    requests: %{},
    monitors: %{},
    ports: MapSet.new(),
    next_id: 1
  ]

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  def stop(pool), do: GenServer.stop(pool, :normal, 30_000)

  # ---- client side (SessionPoolV2.execute_anonymous/3) --------------------------------

  def execute_anonymous(pool, command, args, opts \\ []) do
    pool_timeout = Keyword.get(opts, :pool_timeout, 60_000)
    operation_timeout = Keyword.get(opts, :timeout, 60_000)
    request_id = System.unique_integer([:positive, :monotonic])
    request_payload = Proto.encode_request(request_id, command, args)

    try do
      checkout!(
        pool,
        :anonymous,
        fn {pool_pid, _}, port ->
          send(port, {self(), {:command, request_payload}})

          receive do
            {^port, {:data, data}} ->
              case Proto.decode_response(data) do
                {:ok, ^request_id, response} ->
                  case Proto.result(response) do
                    {:error, :malformed_response} = e -> {e, :close}
                    result -> {result, connect_back(port, pool_pid)}
                  end

                {:ok, _other, _} ->
                  {{:error, :response_mismatch}, :close}

                {:error, reason} ->
                  {{:error, {:decode_error, reason}}, :close}
              end

            {^port, {:exit_status, status}} ->
              exit({:port_died, status})
          after
            operation_timeout -> exit({:timeout, "Operation timed out"})
          end
        end,
        pool_timeout
      )
    catch
      :exit, reason -> {:error, reason}
    end
  end

  @doc "Checkout + checkin with no Python call (scenario 4)."
  def checkout_checkin(pool, timeout \\ 60_000) do
    checkout!(
      pool,
      :anonymous,
      fn {pool_pid, _}, port -> {:ok, connect_back(port, pool_pid)} end,
      timeout
    )
  end

  # The fix: the pool owns the Port again before it is handed to the next caller.
  defp connect_back(port, pool_pid) do
    Port.connect(port, pool_pid)
    Process.unlink(port)
    :ok
  rescue
    _ -> :close
  end

  # NimblePool.checkout!/4
  def checkout!(pool, command, function, timeout) do
    ref = Process.monitor(pool)
    deadline = System.monotonic_time() + System.convert_time_unit(timeout, :millisecond, :native)
    send(pool, {:"$gen_call", {self(), ref}, {:checkout, command, deadline}})

    receive do
      {^ref, client_state} ->
        Process.demonitor(ref, [:flush])

        try do
          function.({pool, ref}, client_state)
        catch
          kind, reason ->
            send(pool, {__MODULE__, :cancel, ref, kind})
            :erlang.raise(kind, reason, __STACKTRACE__)
        else
          {result, checkin_state} ->
            send(pool, {__MODULE__, :checkin, ref, checkin_state})
            result
        end

      {:DOWN, ^ref, _, _, reason} ->
        exit({reason, {__MODULE__, :checkout, [pool]}})
    after
      timeout ->
        send(pool, {__MODULE__, :cancel, ref, :timeout})
        Process.demonitor(ref, [:flush])
        exit({:timeout, {__MODULE__, :checkout, [pool]}})
    end
  end

  # ---- pool side (NimblePool + PoolWorkerV2 callbacks) ---------------------------------

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    state = %__MODULE__{python: opts[:python], script: opts[:script]}

    # NimblePool starts its workers one after another in init (lazy: false).
    state = Enum.reduce(1..opts[:size], state, fn _, st -> add_worker(st) end)
    {:ok, state}
  end

  defp add_worker(state) do
    port = Proto.start_worker(state.python, state.script, "v2_#{state.next_id}")

    %{
      state
      | resources: :queue.in(port, state.resources),
        ports: MapSet.put(state.ports, port),
        next_id: state.next_id + 1
    }
  end

  @impl true
  def handle_call({:checkout, command, deadline}, {pid, ref} = from, state) do
    mon_ref = Process.monitor(pid)
    requests = Map.put(state.requests, ref, {pid, mon_ref, :command, command, deadline})
    monitors = Map.put(state.monitors, mon_ref, ref)
    state = %{state | requests: requests, monitors: monitors}

    case :queue.out(state.resources) do
      {{:value, port}, resources} ->
        {:noreply, maybe_checkout(port, from, command, deadline, %{state | resources: resources})}

      {:empty, _} ->
        {:noreply, %{state | queue: :queue.in(from, state.queue)}}
    end
  end

  @impl true
  def handle_info({__MODULE__, :checkin, ref, checkin_state}, state) do
    case Map.pop(state.requests, ref) do
      {{_pid, mon_ref, :state, port}, requests} ->
        Process.demonitor(mon_ref, [:flush])
        state = %{state | requests: requests, monitors: Map.delete(state.monitors, mon_ref)}
        {:noreply, checkin(port, checkin_state, state)}

      {nil, _} ->
        {:noreply, state}
    end
  end

  def handle_info({__MODULE__, :cancel, ref, _reason}, state) do
    {:noreply, cancel(ref, state)}
  end

  def handle_info({:DOWN, mon_ref, :process, _pid, _reason}, state) do
    case Map.pop(state.monitors, mon_ref) do
      {nil, _} -> {:noreply, state}
      {ref, monitors} -> {:noreply, cancel(ref, %{state | monitors: monitors})}
    end
  end

  # PoolWorkerV2.handle_info: a dead Port is replaced.
  def handle_info({port, {:exit_status, _}}, state) when is_port(port) do
    {:noreply, replace(port, state)}
  end

  def handle_info({:EXIT, _, _}, state), do: {:noreply, state}
  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    Enum.each(state.ports, &Proto.close/1)
  end

  defp cancel(ref, state) do
    case Map.pop(state.requests, ref) do
      {{_pid, mon_ref, :state, port}, requests} ->
        Process.demonitor(mon_ref, [:flush])
        state = %{state | requests: requests, monitors: Map.delete(state.monitors, mon_ref)}
        # A worker whose state is unknown is not reused.
        replace(port, state)

      {{_pid, mon_ref, :command, _, _}, requests} ->
        Process.demonitor(mon_ref, [:flush])
        %{state | requests: requests, monitors: Map.delete(state.monitors, mon_ref)}

      {nil, _} ->
        state
    end
  end

  # PoolWorkerV2.handle_checkin: `:close` removes the worker.
  defp checkin(port, :close, state), do: replace(port, state)
  defp checkin(port, _ok, state), do: next_checkout(port, state)

  defp replace(port, state) do
    Proto.close(port)
    state = %{state | ports: MapSet.delete(state.ports, port)}
    state = add_worker(state)
    {{:value, fresh}, resources} = :queue.out_r(state.resources)
    next_checkout(fresh, %{state | resources: resources})
  end

  # Hands `port` to the oldest waiting caller whose request is still live, else parks it.
  defp next_checkout(port, state) do
    case :queue.out(state.queue) do
      {{:value, {_pid, ref} = from}, queue} ->
        state = %{state | queue: queue}

        case state.requests do
          %{^ref => {_, _, :command, command, deadline}} ->
            maybe_checkout(port, from, command, deadline, state)

          _ ->
            next_checkout(port, state)
        end

      {:empty, _} ->
        %{state | resources: :queue.in(port, state.resources)}
    end
  end

  defp maybe_checkout(port, {pid, ref} = from, _command, deadline, state) do
    if System.monotonic_time() > deadline do
      # NimblePool skips callers whose deadline passed while they queued.
      {{_, mon_ref, _, _, _}, requests} = Map.pop(state.requests, ref)
      Process.demonitor(mon_ref, [:flush])
      state = %{state | requests: requests, monitors: Map.delete(state.monitors, mon_ref)}
      next_checkout(port, state)
    else
      # PoolWorkerV2.handle_anonymous_checkout: the Port is handed to the caller.
      Port.connect(port, pid)
      {^pid, mon_ref, :command, _, _} = Map.fetch!(state.requests, ref)
      GenServer.reply(from, port)
      %{state | requests: Map.put(state.requests, ref, {pid, mon_ref, :state, port})}
    end
  end
end

defmodule DSPexBench.V1Pool do
  @moduledoc false
  # DSPex's SessionPool V1: every call is a GenServer.call to one manager process, which
  # checks a worker out (here from the V2 pool process, as V1 did from NimblePool), does the
  # round trip itself and replies. Calls are serialised by the manager.

  use GenServer

  alias DSPexBench.V2Pool

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  def stop(server), do: GenServer.stop(server, :normal, 30_000)

  def execute_anonymous(server, command, args) do
    GenServer.call(server, {:execute_anonymous, command, args}, :infinity)
  end

  @impl true
  def init(opts) do
    {:ok, pool} = V2Pool.start_link(opts)
    {:ok, %{pool: pool}}
  end

  @impl true
  def handle_call({:execute_anonymous, command, args}, _from, state) do
    {:reply, V2Pool.execute_anonymous(state.pool, command, args), state}
  end

  @impl true
  def terminate(_reason, state), do: V2Pool.stop(state.pool)
end

defmodule DSPexBench.PoolboyWorker do
  @moduledoc false
  # A poolboy worker: a GenServer that owns one Port and does the round trip in handle_call.

  use GenServer

  alias DSPexBench.Proto

  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  def call(worker, command, args, timeout \\ 60_000) do
    GenServer.call(worker, {:call, command, args}, timeout)
  end

  @impl true
  def init(args) do
    Process.flag(:trap_exit, true)
    id = System.unique_integer([:positive])
    {:ok, %{port: Proto.start_worker(args[:python], args[:script], "poolboy_#{id}")}}
  end

  @impl true
  def handle_call({:call, command, args}, _from, state) do
    {:reply, Proto.round_trip(state.port, command, args), state}
  end

  @impl true
  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    {:stop, {:port_exited, status}, state}
  end

  def handle_info(_msg, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state), do: Proto.close(state.port)
end

defmodule DSPexBench.Poolboy do
  @moduledoc false
  # poolboy (Debian's erlang-poolboy, not a mix dependency) around DSPexBench.PoolboyWorker.

  alias DSPexBench.PoolboyWorker

  @doc "Puts poolboy's ebin on the code path, installing erlang-poolboy if it is missing."
  def ensure_loaded, do: DSPexBench.Debian.ensure(:poolboy, "erlang-poolboy")

  def start_link(opts) do
    :poolboy.start_link(
      [worker_module: PoolboyWorker, size: opts[:size], max_overflow: 0],
      python: opts[:python],
      script: opts[:script]
    )
  end

  def stop(pool), do: :poolboy.stop(pool)

  def execute_anonymous(pool, command, args) do
    :poolboy.transaction(pool, &PoolboyWorker.call(&1, command, args), 60_000)
  end

  def checkout_checkin(pool) do
    worker = :poolboy.checkout(pool, true, 60_000)
    :poolboy.checkin(pool, worker)
  end
end
