//! Deadlines: one ordered set of every moment the pool must act at, and nothing else.
//!
//! The core never polls. Each deadline (a queued caller's pool timeout, the end of a
//! session's affinity wait, a request's timeout, a start-up deadline, the end of a start
//! backoff, an overflow worker's idle retirement, a shutdown's grace period) is one entry here,
//! inserted when it is armed and removed when it is disarmed, both O(log n). The executor sleeps
//! until [`Timers::next`] exactly (or until a transition arms an earlier one) and then delivers
//! [`crate::Event::Tick`]; an idle pool has no entry and wakes nobody.

use std::collections::BTreeSet;
use std::time::Instant;

use crate::{LeaseId, RequestId, WorkerId};

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// A queued lease's pool timeout.
    Queue(LeaseId),
    /// A queued session lease stops waiting for its busy home worker.
    Affinity(LeaseId),
    /// A request (caller's or internal) past its timeout.
    Request(WorkerId, RequestId),
    /// The worker's own alarm: start backoff over, start deadline, idle retirement.
    Worker(WorkerId),
    /// The next step of a stopping worker's shutdown (SIGTERM, then SIGKILL).
    Grace(WorkerId),
    /// A v2 worker with requests in flight: time to ping it, or to give up on it.
    Heartbeat(WorkerId),
}

#[derive(Debug, Default)]
pub struct Timers {
    set: BTreeSet<(Instant, Timer)>,
}

impl Timers {
    pub fn arm(&mut self, at: Instant, timer: Timer) {
        self.set.insert((at, timer));
    }

    /// Disarms a timer armed for `at` (a no-op when it is not armed).
    pub fn disarm(&mut self, at: Instant, timer: Timer) {
        self.set.remove(&(at, timer));
    }

    /// The earliest armed deadline.
    pub fn next(&self) -> Option<Instant> {
        self.set.first().map(|(at, _)| *at)
    }

    /// Removes and returns the earliest timer due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, Timer)> {
        match self.set.first() {
            Some((at, _)) if *at <= now => self.set.pop_first(),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}
