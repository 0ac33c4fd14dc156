//! The pool's vocabulary for the outside: configuration, modes, requests, events, outcomes,
//! status. Plain data; the rules are in the other modules.

use crate::json::RawObject;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{ExitInfo, PoolError};
use crate::frame::{Response, DEFAULT_MAX_FRAME};
use crate::{LeaseId, Owner, WorkerId};

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub pool_size: usize,
    pub max_overflow: usize,
    pub lazy: bool,
    pub max_frame_size: usize,
    pub start_timeout: Duration,
    pub overflow_idle: Duration,
    pub affinity_wait: Duration,
    pub shutdown_grace: Duration,
    /// Caps the requests one worker runs at once. A worker that speaks protocol v2 announces
    /// its concurrency in its handshake; its capacity is the smaller of the two (`None`: what
    /// it announces). A worker that announces nothing (v1) runs one at a time.
    pub worker_concurrency: Option<u32>,
    /// A v2 worker with requests in flight that sends nothing at all (not even the answer to a
    /// heartbeat ping, sent after a third of this) for this long is recycled.
    pub heartbeat_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            pool_size: 2,
            max_overflow: 2,
            lazy: false,
            max_frame_size: DEFAULT_MAX_FRAME,
            start_timeout: Duration::from_secs(60),
            overflow_idle: Duration::from_secs(10),
            affinity_wait: Duration::from_millis(10),
            shutdown_grace: Duration::from_secs(2),
            worker_concurrency: None,
            heartbeat_timeout: Duration::from_secs(30),
        }
    }
}

/// Which worker a lease may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Anonymous,
    /// `strict`: only the worker that holds the session's Python state; never re-created.
    Session {
        id: Arc<str>,
        strict: bool,
    },
}

/// One request, its arguments already encoded as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: String,
    pub args: Vec<u8>,
    pub timeout: Duration,
    /// The arguments' top-level members, for a command whose success the pool records
    /// ([`crate::session::is_recorded`]: session state, `configure_lm`). Leave `None`: the pool reads them as the request
    /// enters it, on the thread that submitted it (a dirty scheduler for large arguments), so
    /// recording the reply never reads large arguments on whichever thread reads the reply.
    pub members: Option<RawObject>,
    /// The request's frame, its id to be set when it is sent. Leave `None`: the pool builds it
    /// as the request enters it (on the submitting thread, as `members`), so sending it later,
    /// wherever the request leaves the queue, copies none of its arguments.
    pub frame: Option<Vec<u8>>,
}

impl Request {
    /// `members` read when the command is one the pool records, and the frame built.
    ///
    /// # Errors
    /// [`PoolError::InvalidArgs`] when the frame would exceed `max_frame`.
    pub(crate) fn prepared(mut self, max_frame: usize) -> Result<Request, PoolError> {
        if self.members.is_none() && crate::session::is_recorded(&self.command) {
            self.members = RawObject::parse(&self.args);
        }
        if self.frame.is_none() {
            self.frame = Some(crate::frame::encode_request_template(
                &self.command,
                &self.args,
                max_frame,
            )?);
        }
        Ok(self)
    }
}

/// How an acquisition went.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Acquired {
    /// A worker was free: a checkout holds it now; an execute's request is on its way.
    Now(LeaseId),
    /// Queued; the holder is told by a delivery.
    Queued(LeaseId),
}

#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    pub requests: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub pool_timeouts: u64,
    pub recycled: u64,
    pub worker_starts: u64,
    pub start_failures: u64,
    pub restores: u64,
    /// Requests cancelled with a control frame (v2: timed out, or their caller left).
    pub cancelled: u64,
}

/// A snapshot for `get_pool_status/0`.
#[derive(Debug, Clone)]
pub struct PoolStatus {
    pub pool_size: usize,
    pub max_overflow: usize,
    pub ready: usize,
    pub busy: usize,
    /// Callers' requests in flight on all workers.
    pub in_flight: usize,
    /// Requests the usable workers can run at once (the sum of their capacities).
    pub capacity: usize,
    pub starting: usize,
    pub overflow: usize,
    pub queued: usize,
    pub open_leases: usize,
    pub sessions: usize,
    pub last_start_error: Option<String>,
    pub counters: Counters,
    pub worker_pids: Vec<u32>,
}

/// Everything that can happen to a pool.
#[derive(Debug)]
pub enum Event<R> {
    /// A caller claims a worker; with `once`, its request is sent as soon as it has one.
    Acquire {
        lease: LeaseId,
        mode: Mode,
        once: Option<Request>,
        reply: R,
        pool_timeout: Duration,
        owner: Owner,
    },
    /// A request on a held checkout.
    Call {
        lease: LeaseId,
        request: Request,
        reply: R,
    },
    /// A control frame for the request `lease` has in flight (protocol v2): `body` is a JSON
    /// object (e.g. `{"control":"tool_result",...}`); the pool adds the request's `id`.
    Control {
        lease: LeaseId,
        body: Vec<u8>,
    },
    /// Checkin, a dropped checkout, or a holder that died.
    Release {
        lease: LeaseId,
    },
    /// Every lease of a process that died.
    ReleaseOwner {
        owner: Owner,
    },
    EndSession {
        session: String,
    },
    Stop,
    /// The executor started the worker's process.
    Spawned {
        worker: WorkerId,
        pid: Option<u32>,
    },
    /// The worker's process could not be started.
    SpawnFailed {
        worker: WorkerId,
        reason: String,
    },
    /// A frame from the worker, decoded (or not) by the executor.
    Frame {
        worker: WorkerId,
        frame: Result<Response, PoolError>,
    },
    /// The worker's stdout is no longer a frame stream (already put as an error).
    StreamError {
        worker: WorkerId,
        error: PoolError,
    },
    /// A write found the worker's stdin closed.
    WriteFailed {
        worker: WorkerId,
    },
    /// The worker's process has exited and been reaped; `stderr`: the last lines it wrote.
    Exited {
        worker: WorkerId,
        exit: ExitInfo,
        stderr: String,
    },
    /// Deadlines up to `now` have passed.
    Tick,
}

/// What a step returns to its caller, besides effects.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Done,
    Acquired(Result<Acquired, PoolError>),
    Called(Result<(), PoolError>),
}
