# Structs in arguments against the real Jason, in a child VM (the project does not depend on
# Jason): run by test/dspex/conversion_vm_safety_test.exs when JASON_EBIN names a directory of
# compiled Jason modules, e.g. built from github.com/michalmuskala/jason with
# `elixirc -o $JASON_EBIN lib/*.ex`. Prints "JASON OK" when every check holds.

defmodule JasonCheck.Point do
  @derive {Jason.Encoder, only: [:x, :y]}
  defstruct [:x, :y, :secret]
end

defmodule JasonCheck.Custom do
  defstruct [:v]
end

defimpl Jason.Encoder, for: JasonCheck.Custom do
  def encode(%{v: v}, opts), do: Jason.Encode.map(%{"custom" => v, "on" => ~D[2025-07-01]}, opts)
end

defmodule JasonCheck.Plain do
  defstruct [:a]
end

defmodule JasonCheck do
  alias DSPex.NativePool.{Native, Structs}
  alias DSPex.PythonBridge.NativePool
  alias JasonCheck.{Custom, Plain, Point}

  def run do
    true = Code.ensure_loaded?(Jason)
    now = DateTime.utc_now()

    args = %{
      t: now,
      n: ~N[2025-07-01 10:00:00.123],
      d: ~D[2025-07-01],
      tm: ~T[10:00:00],
      p: [%Point{x: 1, y: %{z: now}, secret: self()}],
      c: [%Custom{v: [1, 2]}]
    }

    # What Jason writes, read back.
    jason = args |> Jason.encode!() |> Jason.decode!()

    {:ok, converted} = Structs.convert(args)
    {:ok, json} = Native.json_encode(converted)
    ^jason = Jason.decode!(json)

    {:error,
     {:invalid_args, "args.a[0] is a struct (JasonCheck.Plain) with no Jason.Encoder" <> _}} =
      Structs.convert(%{a: [%Plain{a: 1}]})

    {:error,
     {:invalid_args, "args.a is a struct (JasonCheck.Point) that Jason cannot encode: " <> _}} =
      Structs.convert(%{a: %Point{x: self()}})

    worker = System.fetch_env!("TEST_WORKER")

    {:ok, _} =
      NativePool.start_link(name: :jason_check, pool_size: 1, lazy: false, script: worker)

    {:ok, ^jason} = NativePool.execute_anonymous(:echo, args, pool: :jason_check)

    {:ok, dirty} =
      NativePool.execute_anonymous(:echo, Map.put(args, :pad, String.duplicate("x", 100_000)),
        pool: :jason_check
      )

    ^jason = Map.delete(dirty, "pad")
    IO.puts("JASON OK")
  end
end

JasonCheck.run()
