//! What the outside must do after a transition: the only way the core acts on the world.
//!
//! Every transition appends [`Effect`]s to a list, in the order they must be performed: frames
//! to write, processes to start or signal, replies to deliver, log lines and lifecycle events.
//! The executor performs them after releasing the lock that guards the state, so nothing slow
//! (a pipe write, a message to a BEAM process, a spawn) ever runs under it. `R` is the
//! executor's reply handle (a BEAM process and reference in production, a channel or a plain
//! id in tests); the core only stores and returns it.

use bytes::Bytes;

use crate::error::PoolError;
use crate::{LeaseId, WorkerId};

/// What the pool tells a lease holder.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// A queued checkout now holds a worker.
    Assigned,
    /// The reply to a request (its result as JSON text), or why the lease failed.
    Reply(Result<Bytes, PoolError>),
}

/// A signal for a worker's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

/// The level of a log line for the pool's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One thing to do, in order.
#[derive(Debug)]
pub enum Effect<R> {
    /// Start the worker's process, then report [`crate::Event::Spawned`] or
    /// [`crate::Event::SpawnFailed`], its frames, and finally [`crate::Event::Exited`].
    Spawn { worker: WorkerId },
    /// Write these bytes (whole frames) to the worker's stdin; report
    /// [`crate::Event::WriteFailed`] if its stdin is closed.
    Write { worker: WorkerId, bytes: Vec<u8> },
    /// Signal the worker's process group (nothing when it has no process yet or any more).
    Signal { worker: WorkerId, signal: Signal },
    /// Hand `delivery` to a lease holder.
    Deliver { to: R, delivery: Delivery },
    /// An intermediate frame (`{"id": N, "event": ...}`, the whole JSON text) for the request
    /// `lease` has in flight: hand it to the holder of that lease's reply handle
    /// ([`crate::Core::reply_of`]) without consuming the handle.
    Event { lease: LeaseId, body: Bytes },
    /// Drop a reply handle that will never be used (the answer was the call's return value).
    Discard(R),
    /// A line for the pool's owner (Logger).
    Log {
        worker: WorkerId,
        level: Level,
        line: String,
    },
    /// A worker answered its start-up ping.
    WorkerStarted {
        worker: WorkerId,
        pid: Option<u32>,
        start_ms: u64,
    },
    /// A started worker's process ended.
    WorkerExited { worker: WorkerId, reason: String },
    /// The pool was stopped and every worker has exited.
    Stopped,
}
