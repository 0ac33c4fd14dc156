//! Encoding the pool's errors for Elixir.
//!
//! The errors themselves are data in the core crate ([`dspex_pool_core::PoolError`]); each
//! variant is encoded as the reason of an `{:error, reason}` tuple, keeping the shapes of
//! DSPex's `SessionPoolV2` where it had one (`{:pool_timeout, _}`, `{:checkout_failed, _}`,
//! `{:decode_error, _}`, `:response_mismatch`, `:malformed_response`, and the bare Python error
//! string for a command that failed in Python). The Elixir moduledoc of
//! `DSPex.PythonBridge.NativePool` lists them for users; keep the two in step.

use rustler::{Encoder, Env, Term};

pub use dspex_pool_core::{ExitInfo, PoolError};

mod atoms {
    rustler::atoms! {
        pool_timeout,
        checkout_failed,
        decode_error,
        response_mismatch,
        malformed_response,
        invalid_args,
        timeout,
        worker_exited,
        session_lost,
        worker_unresponsive,
        exit_status,
        signal,
        detail,
    }
}

/// A [`PoolError`] as the reason of an `{:error, reason}` tuple.
pub struct Reason<'e>(pub &'e PoolError);

impl Encoder for Reason<'_> {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let detail = |d: &dyn std::fmt::Display| d.to_string().encode(env);
        match self.0 {
            PoolError::PoolTimeout(_) => {
                (atoms::pool_timeout(), detail(&self.0.to_string())).encode(env)
            }
            PoolError::CheckoutFailed(d) => (atoms::checkout_failed(), detail(d)).encode(env),
            PoolError::Decode(d) => (atoms::decode_error(), detail(d)).encode(env),
            PoolError::ResponseMismatch => atoms::response_mismatch().encode(env),
            PoolError::Malformed => atoms::malformed_response().encode(env),
            PoolError::InvalidArgs(d) => (atoms::invalid_args(), detail(d)).encode(env),
            PoolError::Timeout(_) => (atoms::timeout(), detail(&self.0.to_string())).encode(env),
            PoolError::WorkerExited(info) => {
                let (k, v) = match info {
                    ExitInfo::Code(c) => (atoms::exit_status().encode(env), c.encode(env)),
                    ExitInfo::Signal(s) => (atoms::signal().encode(env), s.encode(env)),
                    ExitInfo::Unknown => (
                        atoms::exit_status().encode(env),
                        rustler::types::atom::nil().encode(env),
                    ),
                };
                let map = Term::map_from_pairs(
                    env,
                    &[
                        (k, v),
                        (atoms::detail().encode(env), detail(&self.0.to_string())),
                    ],
                )
                .expect("distinct keys");
                (atoms::worker_exited(), map).encode(env)
            }
            PoolError::Unresponsive(_) => {
                (atoms::worker_unresponsive(), detail(&self.0.to_string())).encode(env)
            }
            PoolError::SessionLost(_) => {
                (atoms::session_lost(), detail(&self.0.to_string())).encode(env)
            }
            PoolError::Python(msg) => msg.encode(env),
        }
    }
}
