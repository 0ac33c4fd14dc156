//! The pool's state and the one entry point that changes it.
//!
//! [`Core`] holds everything the pool knows: workers and their in-flight requests, leases,
//! the wait queue, session records, timers, counters. It is changed only by
//! [`Core::step`] (or the method each [`Event`] names), a pure transition
//! `(&mut Core, Event, now) -> effects`: no I/O, no clock, no threads. The rules live in
//! `leases` (claiming and dispatch), `workers` (a worker's life), `sessions` (records and
//! affinity) and `deadlines` (what happens when a timer fires).
//!
//! Words: a *lease* is one caller's claim on a worker (an execute, released with its reply, or
//! a checkout, held until checkin); a *request* is one frame sent to a worker and awaiting its
//! reply, keyed by a pool-unique id. A worker has a capacity of in-flight requests: 1, or what
//! it announced in its protocol v2 handshake (capped by `worker_concurrency`). A worker with a
//! capacity over 1 is *shared* by execute leases (up to its capacity at once); a checkout
//! always leases a worker to itself.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::api::{Acquired, Counters, Event, Mode, Outcome, PoolConfig, PoolStatus, Request};
use crate::effects::{Effect, Signal};
use crate::queue::WaitQueue;
use crate::session::SessionRecord;
use crate::timers::{Timer, Timers};
use crate::{LeaseId, Owner, RequestId, WorkerId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// Waiting out a start backoff before its process is started.
    Backoff,
    /// Its process is being started.
    Spawning,
    /// Started; its start-up ping is in flight.
    Starting,
    /// Its start-up failed; killed, waiting for its exit to report why.
    Failing,
    Idle,
    Leased(LeaseId),
    /// Running execute requests of several leases at once (a worker whose capacity is over 1;
    /// checkouts still lease a worker to themselves).
    Shared,
    /// Running internal commands (init, restore, cleanup) with no lease.
    Chores,
    /// Asked to shut down (stop, idle retirement); waiting for its exit.
    Stopping,
    /// Killed (state unknown); waiting for its exit.
    Dead,
}

#[derive(Debug)]
pub(crate) enum PendingKind {
    Handshake,
    /// A heartbeat ping to a v2 worker whose requests take long.
    Heartbeat,
    Chore,
    Restore {
        session: Arc<str>,
        generation: u64,
    },
    Caller {
        lease: LeaseId,
        command: String,
        args: Vec<u8>,
        /// See [`Request::members`].
        members: Option<crate::json::RawObject>,
        timeout: Duration,
        /// Whether a success changes recorded session (or global) state.
        recorded: bool,
        /// The session and the epoch of its record when the request was sent.
        session: Option<(Arc<str>, u64)>,
    },
}

#[derive(Debug)]
pub(crate) struct Pending {
    pub kind: PendingKind,
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone)]
pub(crate) struct Chore {
    pub command: &'static str,
    pub args: Vec<u8>,
}

#[derive(Debug)]
pub(crate) struct Worker {
    pub overflow: bool,
    pub status: Status,
    pub pid: Option<u32>,
    /// Passed its start-up ping: failures from now on are recycling, not start failures.
    pub started: bool,
    /// Requests it may run at once: 1 until its handshake announces protocol v2, then the
    /// smaller of its announced concurrency and `worker_concurrency`.
    pub capacity: u32,
    /// Speaks protocol v2 (replies matched by id, control frames, heartbeat).
    pub v2: bool,
    /// When it last sent a frame, or when its first request of a busy spell was sent (v2).
    pub last_heard: Instant,
    /// Its armed [`Timer::Heartbeat`] deadline.
    pub heartbeat: Option<Instant>,
    /// Requests sent and not answered, by id (ids grow, so the first is the oldest).
    pub inflight: BTreeMap<RequestId, Pending>,
    /// The generation of each session's state this worker holds.
    pub sessions: HashMap<Arc<str>, u64>,
    /// `:strict` sessions living here: an overflow worker is not retired while any does.
    pub strict: HashSet<Arc<str>>,
    pub chores: VecDeque<Chore>,
    pub idle_seq: u64,
    pub spawned_at: Instant,
    /// Why its start-up failed, for the start-failure message.
    pub failure: Option<String>,
    /// Its armed [`Timer::Worker`] deadline.
    pub alarm: Option<Instant>,
    /// Its armed [`Timer::Grace`] deadline and the signal due then.
    pub grace: Option<(Instant, Signal)>,
}

impl Worker {
    /// Can serve (now or once free): not starting, not on its way out.
    pub fn usable(&self) -> bool {
        matches!(
            self.status,
            Status::Idle | Status::Leased(_) | Status::Shared | Status::Chores
        )
    }

    /// Callers' requests in flight.
    pub fn callers_in_flight(&self) -> usize {
        self.inflight.len() - self.chores_in_flight()
    }

    /// Can take one more execute request now: idle, or shared with room and no chores due.
    pub fn has_room(&self) -> bool {
        match self.status {
            Status::Idle => true,
            Status::Shared => {
                self.chores.is_empty() && self.callers_in_flight() < self.capacity as usize
            }
            _ => false,
        }
    }

    /// On its way to serving.
    pub fn starting(&self) -> bool {
        matches!(self.status, Status::Spawning | Status::Starting)
    }

    /// Neither killed nor stopping (a live or coming process that counts toward the size).
    pub fn live(&self) -> bool {
        !matches!(
            self.status,
            Status::Dead | Status::Stopping | Status::Failing
        )
    }
}

#[derive(Debug)]
pub(crate) enum LeaseState {
    Queued {
        deadline: Instant,
        affinity_until: Option<Instant>,
    },
    Holding {
        worker: WorkerId,
    },
}

#[derive(Debug)]
pub(crate) struct Lease<R> {
    pub mode: Mode,
    /// A checkout keeps its worker between requests; an execute lease ends with its reply.
    pub checkout: bool,
    pub owner: Owner,
    pub state: LeaseState,
    /// An execute lease's request, until sent.
    pub once: Option<Request>,
    pub pool_timeout: Duration,
    pub reply: Option<R>,
    /// The request in flight for this lease.
    pub request: Option<(WorkerId, RequestId)>,
}

/// The pool's state. See the module doc.
pub struct Core<R> {
    pub(crate) config: PoolConfig,
    pub(crate) workers: HashMap<WorkerId, Worker>,
    pub(crate) leases: HashMap<LeaseId, Lease<R>>,
    pub(crate) owners: HashMap<Owner, HashSet<LeaseId>>,
    pub(crate) queue: WaitQueue,
    pub(crate) timers: Timers,
    pub(crate) sessions: HashMap<Arc<str>, SessionRecord>,
    /// Queued `:strict` leases by session, to follow the session to its strict home.
    pub(crate) strict_waiting: HashMap<Arc<str>, HashSet<LeaseId>>,
    /// Queued checkouts: while any waits, shared workers take no new request, so that one
    /// drains and a checkout is never starved by a stream of executes.
    pub(crate) checkouts_waiting: HashSet<LeaseId>,
    /// The last waiting checkout left the queue: shared workers take queued executes again
    /// (done at the end of the step).
    pub(crate) refill: bool,
    /// Replayed on every new worker: the global `configure_lm`.
    pub(crate) init: Vec<Chore>,
    /// Idle workers by when they became idle (the last is the most recently used).
    pub(crate) idle: BTreeSet<(u64, WorkerId)>,
    pub(crate) idle_clock: u64,
    pub(crate) next_worker: WorkerId,
    pub(crate) next_request: RequestId,
    pub(crate) next_epoch: u64,
    pub(crate) start_failures_in_a_row: u32,
    pub(crate) last_start_error: Option<String>,
    /// No new start attempt before this.
    pub(crate) backoff_until: Option<Instant>,
    pub(crate) closed: bool,
    pub(crate) stopped_notified: bool,
    pub(crate) counters: Counters,
}

pub type Effects<R> = Vec<Effect<R>>;

impl<R> Core<R> {
    /// A pool; with `lazy: false` its `pool_size` workers start at once.
    pub fn new(config: PoolConfig, now: Instant, fx: &mut Effects<R>) -> Core<R> {
        let mut core = Core {
            config,
            workers: HashMap::new(),
            leases: HashMap::new(),
            owners: HashMap::new(),
            queue: WaitQueue::default(),
            timers: Timers::default(),
            sessions: HashMap::new(),
            strict_waiting: HashMap::new(),
            checkouts_waiting: HashSet::new(),
            refill: false,
            init: Vec::new(),
            idle: BTreeSet::new(),
            idle_clock: 0,
            next_worker: 1,
            next_request: 1,
            next_epoch: 1,
            start_failures_in_a_row: 0,
            last_start_error: None,
            backoff_until: None,
            closed: false,
            stopped_notified: false,
            counters: Counters::default(),
        };
        if !core.config.lazy {
            for _ in 0..core.config.pool_size {
                core.add_worker(false, now, fx);
            }
        }
        core
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Applies one event at `now`.
    pub fn step(&mut self, event: Event<R>, now: Instant, fx: &mut Effects<R>) -> Outcome {
        let outcome = self.dispatch(event, now, fx);
        if std::mem::take(&mut self.refill) {
            self.fill_shared(now, fx);
        }
        outcome
    }

    fn dispatch(&mut self, event: Event<R>, now: Instant, fx: &mut Effects<R>) -> Outcome {
        match event {
            Event::Acquire {
                lease,
                mode,
                once,
                reply,
                pool_timeout,
                owner,
            } => Outcome::Acquired(self.acquire(
                lease,
                mode,
                once,
                reply,
                pool_timeout,
                owner,
                now,
                fx,
            )),
            Event::Call {
                lease,
                request,
                reply,
            } => Outcome::Called(self.call(lease, request, reply, now, fx)),
            Event::Control { lease, body } => Outcome::Called(self.control(lease, &body, fx)),
            Event::Release { lease } => {
                self.release(lease, now, fx);
                Outcome::Done
            }
            Event::ReleaseOwner { owner } => {
                self.release_owner(owner, now, fx);
                Outcome::Done
            }
            Event::EndSession { session } => {
                self.end_session(&session, now, fx);
                Outcome::Done
            }
            Event::Stop => {
                self.stop(now, fx);
                Outcome::Done
            }
            Event::Spawned { worker, pid } => {
                self.spawned(worker, pid, now, fx);
                Outcome::Done
            }
            Event::SpawnFailed { worker, reason } => {
                self.start_failed(worker, reason, now, fx);
                Outcome::Done
            }
            Event::Frame { worker, frame } => {
                self.frame(worker, frame, now, fx);
                Outcome::Done
            }
            Event::StreamError { worker, error } => {
                self.stream_error(worker, error, now, fx);
                Outcome::Done
            }
            Event::WriteFailed { worker } => {
                self.write_failed(worker, now, fx);
                Outcome::Done
            }
            Event::Exited {
                worker,
                exit,
                stderr,
            } => {
                self.exited(worker, exit, stderr, now, fx);
                Outcome::Done
            }
            Event::Tick => {
                self.tick(now, fx);
                Outcome::Done
            }
        }
    }

    /// When the executor must deliver [`Event::Tick`] next; `None`: nothing is timed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Stopped, and every worker has exited: nothing will happen any more.
    pub fn finished(&self) -> bool {
        self.closed && self.workers.is_empty()
    }

    pub fn status(&self) -> PoolStatus {
        let mut out = PoolStatus {
            pool_size: self.config.pool_size,
            max_overflow: self.config.max_overflow,
            ready: 0,
            busy: 0,
            in_flight: 0,
            capacity: 0,
            starting: 0,
            overflow: 0,
            queued: self.queue.len(),
            open_leases: self.leases.len(),
            sessions: self.sessions.len(),
            last_start_error: self.last_start_error.clone(),
            counters: self.counters.clone(),
            worker_pids: Vec::new(),
        };
        for w in self.workers.values() {
            match w.status {
                Status::Backoff | Status::Spawning | Status::Starting => out.starting += 1,
                Status::Idle => out.ready += 1,
                Status::Leased(_) | Status::Shared | Status::Chores => out.busy += 1,
                Status::Failing | Status::Stopping | Status::Dead => continue,
            }
            if w.usable() {
                out.capacity += w.capacity as usize;
                out.in_flight += w.callers_in_flight();
            }
            if w.overflow {
                out.overflow += 1;
            }
            if let Some(pid) = w.pid {
                out.worker_pids.push(pid);
            }
        }
        out
    }

    /// Whether `lease` currently holds a worker.
    pub fn holds_worker(&self, lease: LeaseId) -> bool {
        matches!(
            self.leases.get(&lease).map(|l| &l.state),
            Some(LeaseState::Holding { .. })
        )
    }

    /// The reply handle of `lease` while it waits or has a request in flight (for
    /// [`Effect::Event`]).
    pub fn reply_of(&self, lease: LeaseId) -> Option<&R> {
        self.leases.get(&lease).and_then(|l| l.reply.as_ref())
    }

    /// Callers' requests in flight on `worker` and its capacity (tests).
    pub fn load_of(&self, worker: WorkerId) -> Option<(usize, u32)> {
        self.workers
            .get(&worker)
            .map(|w| (w.callers_in_flight(), w.capacity))
    }

    /// Whether callers wait in the queue for a worker (the pool is saturated).
    pub fn has_waiters(&self) -> bool {
        !self.queue.is_empty()
    }

    /// The one caller request in flight on `worker`, when it has exactly one (its lease and
    /// request id): whoever waits for it may read the worker's replies itself.
    pub fn sole_caller(&self, worker: WorkerId) -> Option<(LeaseId, RequestId)> {
        let w = self.workers.get(&worker)?;
        let mut callers = w.inflight.iter().filter_map(|(rid, p)| match p.kind {
            PendingKind::Caller { lease, .. } => Some((lease, *rid)),
            _ => None,
        });
        let first = callers.next()?;
        callers.next().is_none().then_some(first)
    }

    /// Whether `lease` waits in the queue.
    pub fn is_queued(&self, lease: LeaseId) -> bool {
        self.queue.contains(lease)
    }

    /// Workers in the pool's books (any status, until their exit is reported).
    pub fn worker_ids(&self) -> Vec<WorkerId> {
        let mut ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The worker a lease holds, if any.
    pub fn worker_of(&self, lease: LeaseId) -> Option<WorkerId> {
        match self.leases.get(&lease).map(|l| &l.state) {
            Some(LeaseState::Holding { worker }) => Some(*worker),
            _ => None,
        }
    }

    /// The home worker of a session, if it has a record and one.
    pub fn home_of(&self, session: &str) -> Option<WorkerId> {
        self.sessions.get(session).and_then(|r| r.home)
    }

    /// The worker a session's `:strict` requests run on, if any.
    pub fn strict_home_of(&self, session: &str) -> Option<WorkerId> {
        self.sessions.get(session).and_then(|r| r.strict_home)
    }

    /// Sessions (`:strict` ones) living on `worker`.
    pub fn strict_sessions(&self, worker: WorkerId) -> Vec<Arc<str>> {
        self.workers
            .get(&worker)
            .map(|w| w.strict.iter().cloned().collect())
            .unwrap_or_default()
    }

    // ---- small helpers shared by the rule modules ---------------------------------------------

    pub(crate) fn next_request_id(&mut self) -> RequestId {
        let id = self.next_request;
        self.next_request += 1;
        id
    }

    /// The only way a worker's status changes: keeps the idle set in step.
    pub(crate) fn set_status(&mut self, wid: WorkerId, status: Status) {
        let Some(w) = self.workers.get_mut(&wid) else {
            return;
        };
        if w.status == Status::Idle {
            self.idle.remove(&(w.idle_seq, wid));
        }
        w.status = status;
        if status == Status::Idle {
            self.idle_clock += 1;
            w.idle_seq = self.idle_clock;
            self.idle.insert((w.idle_seq, wid));
        }
    }

    pub(crate) fn set_alarm(&mut self, wid: WorkerId, at: Option<Instant>) {
        if let Some(w) = self.workers.get_mut(&wid) {
            rearm(&mut self.timers, &mut w.alarm, Timer::Worker(wid), at);
        }
    }

    pub(crate) fn set_heartbeat(&mut self, wid: WorkerId, at: Option<Instant>) {
        if let Some(w) = self.workers.get_mut(&wid) {
            rearm(
                &mut self.timers,
                &mut w.heartbeat,
                Timer::Heartbeat(wid),
                at,
            );
        }
    }

    pub(crate) fn set_grace(&mut self, wid: WorkerId, next: Option<(Instant, Signal)>) {
        let Some(w) = self.workers.get_mut(&wid) else {
            return;
        };
        if let Some((old, _)) = w.grace.take() {
            self.timers.disarm(old, Timer::Grace(wid));
        }
        if let Some((at, sig)) = next {
            w.grace = Some((at, sig));
            self.timers.arm(at, Timer::Grace(wid));
        }
    }

    /// Removes a request from its worker, disarming its deadline.
    pub(crate) fn take_pending(&mut self, wid: WorkerId, rid: RequestId) -> Option<Pending> {
        let p = self.workers.get_mut(&wid)?.inflight.remove(&rid)?;
        if let Some(at) = p.deadline {
            self.timers.disarm(at, Timer::Request(wid, rid));
        }
        Some(p)
    }

    /// Removes every request of a worker, oldest first.
    pub(crate) fn take_all_pending(&mut self, wid: WorkerId) -> Vec<(RequestId, Pending)> {
        let Some(w) = self.workers.get_mut(&wid) else {
            return Vec::new();
        };
        let all: Vec<(RequestId, Pending)> = std::mem::take(&mut w.inflight).into_iter().collect();
        for (rid, p) in &all {
            if let Some(at) = p.deadline {
                self.timers.disarm(at, Timer::Request(wid, *rid));
            }
        }
        all
    }

    /// Removes a lease from the lease table and its owner's set.
    pub(crate) fn remove_lease(&mut self, lease: LeaseId) -> Option<Lease<R>> {
        let entry = self.leases.remove(&lease)?;
        if let Some(set) = self.owners.get_mut(&entry.owner) {
            set.remove(&lease);
            if set.is_empty() {
                self.owners.remove(&entry.owner);
            }
        }
        if let LeaseState::Queued {
            deadline,
            affinity_until,
        } = entry.state
        {
            self.unlist_strict(lease, &entry.mode);
            self.queue.remove(lease);
            self.timers.disarm(deadline, Timer::Queue(lease));
            if let Some(u) = affinity_until {
                self.timers.disarm(u, Timer::Affinity(lease));
            }
        }
        Some(entry)
    }

    /// Takes a lease that leaves the queue out of the strict-waiter and checkout indexes.
    pub(crate) fn unlist_strict(&mut self, lease: LeaseId, mode: &Mode) {
        if self.checkouts_waiting.remove(&lease) && self.checkouts_waiting.is_empty() {
            self.refill = true;
        }
        if let Mode::Session { id, strict: true } = mode {
            if let Some(set) = self.strict_waiting.get_mut(id) {
                set.remove(&lease);
                if set.is_empty() {
                    self.strict_waiting.remove(id);
                }
            }
        }
    }

    pub(crate) fn log(
        &self,
        fx: &mut Effects<R>,
        worker: WorkerId,
        level: crate::Level,
        line: String,
    ) {
        fx.push(Effect::Log {
            worker,
            level,
            line,
        });
    }
}

impl Worker {
    /// Internal requests in flight (chores, restores, the handshake): they ride along with
    /// the caller's request and do not count toward the capacity.
    pub(crate) fn chores_in_flight(&self) -> usize {
        self.inflight
            .values()
            .filter(|p| !matches!(p.kind, PendingKind::Caller { .. }))
            .count()
    }
}

/// Moves the deadline kept in `slot` (and armed as `timer`) to `at`, or disarms it.
fn rearm(timers: &mut Timers, slot: &mut Option<Instant>, timer: Timer, at: Option<Instant>) {
    if let Some(old) = slot.take() {
        timers.disarm(old, timer);
    }
    if let Some(at) = at {
        *slot = Some(at);
        timers.arm(at, timer);
    }
}
