defmodule DSPex.PythonBridge.NativePoolForgedCheckoutTest do
  # Not async: starts and stops pools.
  use DSPex.NativePool.PoolCase, async: false

  @not_a_checkout "not a checkout made by checkout/2"
  @big %{blob: String.duplicate("x", 100_000)}

  defp pool_struct(opts), do: elem(DSPex.NativePool.Server.fetch(opts[:pool]), 1)

  # call/4 and execute_stream/4 (as a list) refuse `forged`.
  defp assert_call_and_stream_refused(forged, args) do
    assert {:error, {:checkout_failed, @not_a_checkout <> _}} =
             NativePool.call(forged, :echo, args)

    assert [{:error, {:checkout_failed, @not_a_checkout <> _}}] =
             Enum.to_list(NativePool.execute_stream(forged, :echo, args))
  end

  test "call/4, execute_stream/4 and checkin/1 refuse every kind of hand-built lease" do
    opts = start_pool(pool_size: 1)
    pool = pool_struct(opts)
    {:ok, real} = NativePool.checkout(:anonymous, opts)

    for lease <- [make_ref(), 42, nil, :lease, "lease", pool.resource, self()] do
      forged = %{real | lease: lease}

      for args <- [%{}, @big] do
        assert_call_and_stream_refused(forged, args)

        assert {:error, {:checkout_failed, @not_a_checkout <> _}} =
                 Native.call_dirty(pool.resource, lease, make_ref(), "echo", args, 1_000, true)

        {:ok, ref} = NativePool.execute_stream(forged, :echo, args, into: self())
        assert_receive {^ref, {:error, {:checkout_failed, @not_a_checkout <> _}}}, 5_000
      end

      assert_raise ArgumentError,
                   ~r/#{@not_a_checkout}.*got: #{Regex.escape(inspect(lease))}/,
                   fn ->
                     NativePool.checkin(forged)
                   end
    end

    assert {:ok, _} = NativePool.call(real, :ping, %{})
    assert :ok = NativePool.checkin(real)
  end

  test "a %Checkout{} whose pool is not a pool's record gets the same clear errors" do
    opts = start_pool(pool_size: 1)
    {:ok, real} = NativePool.checkout(:anonymous, opts)

    # Before: a KeyError or BadMapError from call/4, execute_stream/4 and checkin/1.
    for pool <- [nil, %{}, :pool, %{name: :x}] do
      forged = %{real | pool: pool}
      assert_call_and_stream_refused(forged, %{})

      assert_raise ArgumentError, ~r/#{@not_a_checkout}.*got pool: /, fn ->
        NativePool.checkin(forged)
      end
    end

    assert {:ok, _} = NativePool.call(real, :ping, %{})
    assert :ok = NativePool.checkin(real)
  end

  test "a checkout of a stopped pool: big args and streams say the pool is stopping too" do
    opts = start_pool(pool_size: 1)
    {:ok, checkout} = NativePool.checkout(:anonymous, opts)
    :ok = stop_supervised(opts[:pool])

    assert {:error, {:checkout_failed, "the pool is stopping"}} =
             NativePool.call(checkout, :echo, @big)

    assert [{:error, {:checkout_failed, "the pool is stopping"}}] =
             Enum.to_list(NativePool.execute_stream(checkout, :echo, %{}))

    {:ok, ref} = NativePool.execute_stream(checkout, :echo, @big, into: self())
    assert_receive {^ref, {:error, {:checkout_failed, "the pool is stopping"}}}, 5_000

    assert :ok = NativePool.checkin(checkout)
  end

  test "with_checkout/3 whose pool stops inside fun: calls say so, the checkin is :ok" do
    opts = start_pool(pool_size: 1)

    assert {:error, {:checkout_failed, "the pool is stopping"}} =
             NativePool.with_checkout(
               :anonymous,
               fn checkout ->
                 :ok = stop_supervised(opts[:pool])
                 NativePool.call(checkout, :ping, %{})
               end,
               opts
             )
  end

  test "a checkout whose lease is another pool's is refused, and that pool's worker stays" do
    a = start_pool(pool_size: 1)
    b = start_pool(pool_size: 1)
    [pid_b] = status(b).worker_pids
    {:ok, on_a} = NativePool.checkout(:anonymous, a)
    {:ok, on_b} = NativePool.checkout(:anonymous, b)
    mixed = %{on_a | lease: on_b.lease}

    # Before: the request ran on b's worker, its reply was read from a's (so never), and
    # after the timeout b's worker was recycled: {:error, {:timeout, _}} and a dead worker.
    for args <- [%{}, @big] do
      assert {:error, {:checkout_failed, @not_a_checkout <> _}} =
               NativePool.call(mixed, :echo, args, timeout: 2_000)

      assert [{:error, {:checkout_failed, @not_a_checkout <> _}}] =
               Enum.to_list(NativePool.execute_stream(mixed, :echo, args))
    end

    assert_raise ArgumentError, ~r/#{@not_a_checkout}.*got: #Reference/, fn ->
      NativePool.checkin(mixed)
    end

    assert {:ok, %{"pid" => ^pid_b}} = NativePool.call(on_b, :ping, %{})
    assert status(b).counters.recycled == 0
    assert {:ok, _} = NativePool.call(on_a, :ping, %{})
    assert :ok = NativePool.checkin(on_a)
    assert :ok = NativePool.checkin(on_b)
  end
end
