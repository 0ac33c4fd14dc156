//! The state machine of `dspex_native_pool`, without the BEAM and without I/O.
//!
//! The pool's logic is a value, [`Core`], changed only by pure transitions
//! ([`Core::step`]: `(&mut Core, Event, now) -> Effects`). Everything the outside must do
//! (write frames, start or signal processes, deliver replies, log) comes back as [`Effect`]s,
//! and every moment the pool must act at is a deadline ([`Core::next_deadline`]), so the
//! executor (the NIF crate's `pool` module: Tokio tasks per worker, one timer task) sleeps until
//! exactly then. The whole pool is therefore tested here deterministically, with a fake clock,
//! including a model test of random event sequences (`tests/model.rs`).
//!
//! Modules, one concept each:
//! * [`api`]: configuration, modes, requests, events, outcomes, status (plain data);
//! * [`state`]: the state and the dispatcher ([`Core::step`]); `audit` checks its consistency;
//! * `leases`: acquire, call, release, dispatch to free workers, growth;
//! * `workers`: a worker's life (start attempts and backoff, recycling, exit, stop);
//! * `replies`: matching frames to requests and what each reply does;
//! * `sessions`: session records, affinity, `end_session`;
//! * `deadlines`: what each timer does when it fires;
//! * [`queue`]: the wait queue (FIFO lanes, O(log n) removal);
//! * [`timers`]: the ordered set of deadlines;
//! * [`effects`]: what transitions ask the outside to do;
//! * [`session`]: what a session created, to re-create it elsewhere;
//! * [`frame`]: encoding requests, decoding responses;
//! * [`json`]: a JSON pull parser without recursion (frames here, terms in the NIF crate);
//! * [`error`]: every error, as data.

pub mod api;
mod audit;
mod deadlines;
pub mod effects;
pub mod error;
pub mod frame;
pub mod json;
mod leases;
pub mod queue;
mod replies;
pub mod session;
mod sessions;
pub mod state;
pub mod timers;
mod workers;

pub use effects::{Delivery, Effect, Level, Signal};
pub use error::{ExitInfo, PoolError};
pub use replies::FrameMatch;
pub use state::{
    Acquired, Core, Counters, Effects, Event, Mode, Outcome, PoolConfig, PoolStatus, Request,
};

pub type WorkerId = u64;
pub type LeaseId = u64;
/// A request sent to a worker; unique in the pool.
pub type RequestId = u64;
/// Identifies the holder of leases; the NIF layer gives each calling process one.
pub type Owner = u64;
