//! A pool of Python DSPy workers for Elixir, as a rustler NIF.
//!
//! One module per concept. `runtime`, `protocol`, `json`, `worker`, `session` and `pool` know
//! nothing of the BEAM (the pool's logic is tested against in-process fake workers in
//! `pool_tests`);
//! `term` (term <-> JSON), `checkout` (process monitors, checkout handles), the encoding of
//! `error` and `nif` (the NIF functions) are the BEAM side.

pub mod error;
#[cfg(test)]
pub mod fake;
pub mod json;
pub mod pool;
#[cfg(test)]
mod pool_tests;
pub mod protocol;
pub mod runtime;
pub mod session;
pub mod term;
pub mod worker;

mod checkout;
mod nif;

rustler::init!("Elixir.DSPex.NativePool.Native", load = nif::load);

/// rustler takes the address of `enif_snprintf`, so test binaries (which run outside the BEAM
/// and call no other `enif_*` function) need a definition to start at all.
#[cfg(test)]
#[no_mangle]
pub extern "C" fn enif_snprintf() -> i32 {
    0
}
