defmodule DSPex.NativePool.Native do
  @moduledoc false
  # The NIF stubs. Every function returns at once; replies come as `{ref, result}` messages.

  @on_load :load_nif

  def load_nif do
    path = :filename.join(:code.priv_dir(:dspex_native_pool), ~c"native/dspex_native_pool")
    :erlang.load_nif(path, 0)
  end

  def pool_start(_config), do: :erlang.nif_error(:nif_not_loaded)
  def pool_stop(_pool), do: :erlang.nif_error(:nif_not_loaded)

  # `reads`: the caller handles `{ref, {:"$dspex_readable", worker, lease}}` with read/3.
  def execute(_pool, _ref, _mode, _command, _args, _pool_timeout, _timeout, _reads),
    do: :erlang.nif_error(:nif_not_loaded)

  def execute_dirty(_pool, _ref, _mode, _command, _args, _pool_timeout, _timeout, _reads),
    do: :erlang.nif_error(:nif_not_loaded)

  def checkout(_pool, _ref, _mode, _pool_timeout), do: :erlang.nif_error(:nif_not_loaded)

  def call(_pool, _lease, _ref, _command, _args, _timeout, _reads),
    do: :erlang.nif_error(:nif_not_loaded)

  def call_dirty(_pool, _lease, _ref, _command, _args, _timeout, _reads),
    do: :erlang.nif_error(:nif_not_loaded)

  def read(_pool, _worker, _lease), do: :erlang.nif_error(:nif_not_loaded)
  def drain(_pool, _worker), do: :erlang.nif_error(:nif_not_loaded)
  def control(_pool, _lease, _body), do: :erlang.nif_error(:nif_not_loaded)
  def control_dirty(_pool, _lease, _body), do: :erlang.nif_error(:nif_not_loaded)
  def checkin(_pool, _lease), do: :erlang.nif_error(:nif_not_loaded)
  def end_session(_pool, _session_id), do: :erlang.nif_error(:nif_not_loaded)
  def status(_pool), do: :erlang.nif_error(:nif_not_loaded)
  def live_leases, do: :erlang.nif_error(:nif_not_loaded)
  def json_encode(_term), do: :erlang.nif_error(:nif_not_loaded)
  def json_decode(_json), do: :erlang.nif_error(:nif_not_loaded)
  def log_ack(_ack), do: :erlang.nif_error(:nif_not_loaded)
  def json_decode_small(_json), do: :erlang.nif_error(:nif_not_loaded)
end
