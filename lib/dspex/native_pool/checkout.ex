defmodule DSPex.NativePool.Checkout do
  @moduledoc """
  A worker checked out by one process (see `DSPex.PythonBridge.NativePool.checkout/2`).

  Holds the native lease resource: it is monitored, so the worker returns to the pool when the
  holder exits or drops it, as well as on `checkin/1`.
  """
  @enforce_keys [:lease, :pool]
  defstruct [:lease, :pool, :session_id]

  @type t :: %__MODULE__{lease: reference(), pool: map(), session_id: String.t() | nil}
end
