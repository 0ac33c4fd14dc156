//! A pool of Python DSPy workers for Elixir, as a rustler NIF.
//!
//! The pool's logic (state, queue, sessions, timers, effects) is the rustler-free crate
//! `dspex_pool_core`. Here: `runtime`, `protocol` (the frame codec), `worker` (processes),
//! `zygote` (the client of the fork server that starts workers), `reader` (a worker's stdout
//! polled by the BEAM, read by whoever it wakes) and `pool` (the I/O executor that runs the
//! core) know nothing of the BEAM and are tested against in-process fake workers (`fake`,
//! `pool_tests`); `term` (term <-> JSON), `checkout` (process monitors, checkout handles),
//! `error` (encoding errors), `logs` (worker stderr batched to the owner), `beam_poll`
//! (`enif_select`, sends from inside a NIF) and `nif` (the NIF functions) are the BEAM side.

pub mod error;
#[cfg(test)]
pub mod fake;
mod logs;
pub mod pool;
#[cfg(test)]
mod pool_defect_tests;
#[cfg(test)]
mod pool_tests;
pub mod protocol;
pub mod reader;
pub mod runtime;
pub mod term;
pub mod worker;
pub mod zygote;

// The BEAM side is left out of test builds: test binaries run without a BEAM, and with it out
// nothing references the `enif_*` symbols only the BEAM provides, so they link as they are.
#[cfg(not(test))]
mod beam_poll;
#[cfg(not(test))]
mod checkout;
#[cfg(not(test))]
mod nif;

#[cfg(not(test))]
rustler::init!("Elixir.DSPex.NativePool.Native", load = nif::load);
