//! A pool of Python DSPy workers for Elixir, as a rustler NIF.
//!
//! One module per concept; `nif` is the only one that speaks to the BEAM's NIF API.

pub mod error;
#[cfg(test)]
pub mod fake;
pub mod pool;
pub mod protocol;
pub mod runtime;
pub mod session;
pub mod term;
pub mod worker;

mod checkout;
mod nif;

rustler::init!("Elixir.DSPex.NativePool.Native", load = nif::load);
