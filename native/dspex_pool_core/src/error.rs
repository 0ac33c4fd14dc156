//! Every error the pool can report, as data.
//!
//! The NIF crate encodes each variant as the reason of an `{:error, reason}` tuple, keeping the
//! shapes of DSPex's `SessionPoolV2` where it had one (`{:pool_timeout, _}`,
//! `{:checkout_failed, _}`, `{:decode_error, _}`, `:response_mismatch`, `:malformed_response`,
//! and the bare Python error string for a command that failed in Python). The Elixir moduledoc
//! of `DSPex.PythonBridge.NativePool` lists them for users; keep the three in step.

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
    /// The request took longer than its `:timeout`: a v2 worker was sent a cancel for it, a
    /// one-at-a-time worker was recycled.
    #[error("request timed out after {0} ms")]
    Timeout(u64),
    /// A v2 worker sent nothing at all (not even a heartbeat answer) for this many ms while
    /// the request was in flight; it was recycled.
    #[error("the worker sent nothing for {0} ms (heartbeat timeout); it was recycled")]
    Unresponsive(u64),
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
