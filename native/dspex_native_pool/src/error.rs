//! Every error the pool can hand to Elixir, as data.
//!
//! Each variant is encoded as the reason of an `{:error, reason}` tuple, keeping the shapes of
//! DSPex's `SessionPoolV2` where it had one (`{:pool_timeout, _}`, `{:checkout_failed, _}`,
//! `{:decode_error, _}`, `:response_mismatch`, `:malformed_response`, and the bare Python error
//! string for a command that failed in Python). The Elixir moduledoc of
//! `DSPex.PythonBridge.NativePool` lists them for users; keep the two in step.

use rustler::{Encoder, Env, Term};

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
        exit_status,
        signal,
        detail,
    }
}

/// How a worker process ended, as far as the OS told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    /// Exited with this status code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// The status could not be collected.
    Unknown,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit status {c}"),
            ExitInfo::Signal(s) => write!(f, "killed by signal {s}"),
            ExitInfo::Unknown => write!(f, "unknown exit status"),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum PoolError {
    /// No worker became free within the caller's `:pool_timeout`.
    #[error("no worker became available within {0} ms")]
    PoolTimeout(u64),
    /// The pool cannot serve: it is stopping, or no worker can be started.
    #[error("checkout failed: {0}")]
    CheckoutFailed(String),
    /// The worker's reply could not be decoded (garbage on stdout, bad JSON, oversized frame).
    #[error("decode error: {0}")]
    Decode(String),
    /// The worker answered with another request's id.
    #[error("response id does not match the request")]
    ResponseMismatch,
    /// The worker's reply is JSON but not a protocol response.
    #[error("malformed response")]
    Malformed,
    /// The arguments cannot be encoded as JSON; nothing was sent.
    #[error("invalid args: {0}")]
    InvalidArgs(String),
    /// The request took longer than its `:timeout`; the worker was recycled.
    #[error("request timed out after {0} ms")]
    Timeout(u64),
    /// The worker process ended while the request was in flight.
    #[error("worker exited while the request was in flight ({0})")]
    WorkerExited(ExitInfo),
    /// A `:strict` session's worker is gone, and with it the session's Python state.
    #[error("the worker holding session {0:?} exited; its Python state is lost")]
    SessionLost(String),
    /// The command failed in Python: the worker's error string.
    #[error("{0}")]
    Python(String),
}

impl Encoder for PoolError {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let detail = |d: &dyn std::fmt::Display| d.to_string().encode(env);
        match self {
            PoolError::PoolTimeout(_) => {
                (atoms::pool_timeout(), detail(&self.to_string())).encode(env)
            }
            PoolError::CheckoutFailed(d) => (atoms::checkout_failed(), detail(d)).encode(env),
            PoolError::Decode(d) => (atoms::decode_error(), detail(d)).encode(env),
            PoolError::ResponseMismatch => atoms::response_mismatch().encode(env),
            PoolError::Malformed => atoms::malformed_response().encode(env),
            PoolError::InvalidArgs(d) => (atoms::invalid_args(), detail(d)).encode(env),
            PoolError::Timeout(_) => (atoms::timeout(), detail(&self.to_string())).encode(env),
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
                        (atoms::detail().encode(env), detail(&self.to_string())),
                    ],
                )
                .expect("distinct keys");
                (atoms::worker_exited(), map).encode(env)
            }
            PoolError::SessionLost(_) => {
                (atoms::session_lost(), detail(&self.to_string())).encode(env)
            }
            PoolError::Python(msg) => msg.encode(env),
        }
    }
}
