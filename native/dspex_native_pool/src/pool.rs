//! The pool: workers, the queue of callers, leases, sessions, timeouts.
//!
//! All state sits behind one mutex. Every entry point takes the lock, changes the state and
//! collects the side effects ([`Effects`]: frames to write, processes to signal or start,
//! replies to deliver), then performs them after unlocking. Nothing awaits while holding it.
//!
//! A *lease* is one caller's claim on a worker: an `execute` (one request, released when its
//! reply arrives) or a `checkout` (any number of requests until checkin). A lease is queued
//! (FIFO, with an optional preference for a session's home worker) until a worker is free.
//!
//! A worker whose state is unknown (a request timed out, a frame could not be decoded, a reply
//! carried the wrong id, its holder died mid-request) is killed and replaced, never reused: a
//! late reply therefore cannot reach another caller.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use tokio_util::codec::FramedRead;

use crate::error::{ExitInfo, PoolError};
use crate::protocol;
use crate::session::{self, SessionRecord};
use crate::worker::{self, Conn, Spawner};

pub type WorkerId = u64;
pub type LeaseId = u64;
/// Identifies the holder of leases; the NIF layer gives each calling process one.
pub type Owner = u64;

/// What the pool tells a lease holder.
#[derive(Debug)]
pub enum Delivery {
    /// A queued checkout now holds a worker.
    Assigned,
    /// The reply to a request (its result as JSON text), or why the lease failed.
    Reply(Result<Bytes, PoolError>),
}

/// Where a [`Delivery`] goes: a BEAM process in production, a channel in tests.
pub trait ReplySink: Send + 'static {
    fn deliver(self: Box<Self>, delivery: Delivery);

    /// Drops a sink that will never be needed (a checkout served at once), without a reply.
    fn discard(self: Box<Self>) {}
}

/// Worker logs and lifecycle events for the pool's owner.
pub trait EventSink: Send + Sync + 'static {
    fn log(&self, worker: WorkerId, level: &'static str, line: String);
    fn worker_started(&self, worker: WorkerId, pid: Option<u32>, start_ms: u64);
    fn worker_exited(&self, worker: WorkerId, reason: String);
    fn stopped(&self);
}

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
    pub tick: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            pool_size: 2,
            max_overflow: 2,
            lazy: false,
            max_frame_size: protocol::DEFAULT_MAX_FRAME,
            start_timeout: Duration::from_secs(60),
            overflow_idle: Duration::from_secs(10),
            affinity_wait: Duration::from_millis(10),
            shutdown_grace: Duration::from_secs(2),
            tick: Duration::from_millis(5),
        }
    }
}

/// Which worker a lease may take.
#[derive(Clone, Debug)]
pub enum Mode {
    Anonymous,
    /// `strict`: only the worker that holds the session's Python state; never re-created.
    Session {
        id: Arc<str>,
        strict: bool,
    },
}

/// One request, its arguments already encoded as JSON.
#[derive(Debug)]
pub struct Request {
    pub command: String,
    pub args: Vec<u8>,
    pub timeout: Duration,
}

enum LeaseState {
    Queued {
        deadline: Instant,
        pool_timeout: Duration,
        prefer: Option<(WorkerId, Instant)>,
    },
    Holding {
        worker: WorkerId,
    },
}

struct LeaseEntry {
    mode: Mode,
    /// A checkout keeps its worker between requests; an execute lease ends with its reply.
    checkout: bool,
    state: LeaseState,
    /// An execute lease's request; `None` for checkouts.
    once: Option<Request>,
    pool_timeout: Duration,
    reply: Option<Box<dyn ReplySink>>,
    /// Who holds the lease (an opaque id: the NIF layer's id of the caller's process), so
    /// [`Pool::release_owner`] can end every lease of a process that died.
    owner: Owner,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Starting,
    Idle,
    Leased(LeaseId),
    /// Running internal commands (init, restore, cleanup) with no lease.
    Chores,
    /// Killed or exited; waiting to be reaped.
    Dead,
}

#[derive(Debug)]
enum PendingKind {
    Handshake,
    Chore,
    Restore {
        session: Arc<str>,
        generation: u64,
    },
    Caller {
        lease: LeaseId,
        command: String,
        args: Vec<u8>,
        timeout: Duration,
        /// Whether a success changes recorded session (or global) state.
        recorded: bool,
    },
}

struct Pending {
    id: u64,
    kind: PendingKind,
}

struct Chore {
    command: &'static str,
    args: Vec<u8>,
}

struct WorkerEntry {
    overflow: bool,
    status: Status,
    conn: Option<Arc<Conn>>,
    inflight: VecDeque<Pending>,
    deadline: Option<(Instant, Duration)>,
    sessions: HashMap<Arc<str>, u64>,
    chores: VecDeque<Chore>,
    idle_since: Instant,
    spawned_at: Instant,
    /// Why a starting worker was killed, for the start-failure message.
    failure: Option<String>,
}

impl WorkerEntry {
    fn live(&self) -> bool {
        self.status != Status::Dead
    }
}

#[derive(Default, Debug, Clone)]
pub struct Counters {
    pub requests: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub pool_timeouts: u64,
    pub recycled: u64,
    pub worker_starts: u64,
    pub start_failures: u64,
    pub restores: u64,
}

/// A snapshot for `get_pool_status/0`.
#[derive(Debug, Clone)]
pub struct PoolStatus {
    pub pool_size: usize,
    pub max_overflow: usize,
    pub ready: usize,
    pub busy: usize,
    pub starting: usize,
    pub overflow: usize,
    pub queued: usize,
    pub open_leases: usize,
    pub sessions: usize,
    pub last_start_error: Option<String>,
    pub counters: Counters,
    pub worker_pids: Vec<u32>,
}

struct State {
    workers: HashMap<WorkerId, WorkerEntry>,
    leases: HashMap<LeaseId, LeaseEntry>,
    queue: VecDeque<LeaseId>,
    sessions: HashMap<Arc<str>, SessionRecord>,
    /// Replayed on every new worker: the global `configure_lm`.
    init: Vec<Chore>,
    next_worker: WorkerId,
    start_failures_in_a_row: u32,
    last_start_error: Option<String>,
    closed: bool,
    stopped_notified: bool,
    /// The earliest moment a queued lease's pool timeout or affinity wait runs out: the tick
    /// scans the queue only then, so 10,000 waiters cost nothing per tick.
    queue_check_at: Option<Instant>,
    counters: Counters,
}

#[derive(Default)]
struct Effects {
    writes: Vec<(WorkerId, Arc<Conn>, Vec<u8>)>,
    signals: Vec<(Arc<Conn>, i32)>,
    spawns: Vec<(WorkerId, Duration)>,
    deliveries: Vec<(Box<dyn ReplySink>, Delivery)>,
    stopped: bool,
}

pub(crate) struct Shared {
    config: PoolConfig,
    spawner: Box<dyn Spawner>,
    events: Box<dyn EventSink>,
    state: Mutex<State>,
    next_id: AtomicU64,
    me: Weak<Shared>,
}

/// A handle to a pool. Dropping the last handle stops the pool.
pub struct Pool {
    shared: Arc<Shared>,
}

/// How an acquisition went.
#[derive(Debug, PartialEq, Eq)]
pub enum Acquired {
    /// A worker was free: a checkout holds it now; an execute's request is on its way.
    Now(LeaseId),
    /// Queued; the holder is told by a [`Delivery`].
    Queued(LeaseId),
}

impl Pool {
    /// Starts a pool; with `lazy: false` it starts `pool_size` workers concurrently.
    pub fn start(
        config: PoolConfig,
        spawner: Box<dyn Spawner>,
        events: Box<dyn EventSink>,
    ) -> Pool {
        let shared = Arc::new_cyclic(|me| Shared {
            config,
            spawner,
            events,
            state: Mutex::new(State {
                workers: HashMap::new(),
                leases: HashMap::new(),
                queue: VecDeque::new(),
                sessions: HashMap::new(),
                init: Vec::new(),
                next_worker: 1,
                start_failures_in_a_row: 0,
                last_start_error: None,
                closed: false,
                stopped_notified: false,
                queue_check_at: None,
                counters: Counters::default(),
            }),
            next_id: AtomicU64::new(1),
            me: me.clone(),
        });
        let mut fx = Effects::default();
        {
            let mut st = shared.lock();
            if !shared.config.lazy {
                for _ in 0..shared.config.pool_size {
                    shared.add_worker(&mut st, false, Duration::ZERO, &mut fx);
                }
            }
        }
        shared.perform(fx);
        let weak = Arc::downgrade(&shared);
        let tick = shared.config.tick;
        crate::runtime::spawn(ticker(weak, tick));
        Pool { shared }
    }

    /// A fresh id for [`Pool::acquire`].
    pub fn new_lease_id(&self) -> LeaseId {
        self.shared.next_request_id()
    }

    /// Claims a worker for `mode`. With `once`, the request is sent as soon as a worker is
    /// claimed and the lease ends with its reply (the execute fast path).
    ///
    /// # Errors
    /// [`PoolError::CheckoutFailed`] when the pool is stopping or no worker can start,
    /// [`PoolError::SessionLost`] for a strict session whose worker is gone.
    pub fn acquire(
        &self,
        lease: LeaseId,
        mode: Mode,
        once: Option<Request>,
        reply: Box<dyn ReplySink>,
        pool_timeout: Duration,
        owner: Owner,
    ) -> Result<Acquired, PoolError> {
        let s = &self.shared;
        let mut fx = Effects::default();
        let result = {
            let mut st = s.lock();
            s.acquire(
                &mut st,
                lease,
                mode,
                once,
                reply,
                pool_timeout,
                owner,
                &mut fx,
            )
        };
        s.perform(fx);
        result
    }

    /// Sends a request on a held checkout.
    ///
    /// # Errors
    /// [`PoolError::CheckoutFailed`] when the lease holds no worker (checked in, recycled after a
    /// timeout) or a request is still in flight on it.
    pub fn call(
        &self,
        lease: LeaseId,
        request: Request,
        reply: Box<dyn ReplySink>,
    ) -> Result<(), PoolError> {
        let s = &self.shared;
        let mut fx = Effects::default();
        let result = {
            let mut st = s.lock();
            s.call(&mut st, lease, request, reply, &mut fx)
        };
        s.perform(fx);
        result
    }

    /// Ends a lease: checkin, a dropped checkout, or a holder that died. Idempotent.
    pub fn release(&self, lease: LeaseId) {
        self.shared.release(lease)
    }

    /// Ends every lease of `owner` (its process died): queued ones leave the queue, held
    /// workers return, workers with a request in flight are recycled.
    pub fn release_owner(&self, owner: Owner) {
        let leases: Vec<LeaseId> = {
            let st = self.shared.lock();
            st.leases
                .iter()
                .filter(|(_, l)| l.owner == owner)
                .map(|(id, _)| *id)
                .collect()
        };
        for lease in leases {
            self.shared.release(lease);
        }
    }

    /// Forgets a session and frees its programs in every worker that holds them.
    pub fn end_session(&self, session: &str) {
        let s = &self.shared;
        let mut fx = Effects::default();
        {
            let mut st = s.lock();
            st.sessions.remove(session);
            let args = serde_json::to_vec(&serde_json::json!({ "session_id": session })).unwrap();
            let holders: Vec<WorkerId> = st
                .workers
                .iter()
                .filter(|(_, w)| w.live() && w.sessions.contains_key(session))
                .map(|(id, _)| *id)
                .collect();
            for wid in holders {
                let w = st.workers.get_mut(&wid).unwrap();
                w.sessions.remove(session);
                w.chores.push_back(Chore {
                    command: "cleanup_session",
                    args: args.clone(),
                });
                if w.status == Status::Idle {
                    s.worker_free(&mut st, wid, &mut fx);
                }
            }
        }
        s.perform(fx);
    }

    pub fn status(&self) -> PoolStatus {
        let st = self.shared.lock();
        let mut out = PoolStatus {
            pool_size: self.shared.config.pool_size,
            max_overflow: self.shared.config.max_overflow,
            ready: 0,
            busy: 0,
            starting: 0,
            overflow: 0,
            queued: st.queue.len(),
            open_leases: st.leases.len(),
            sessions: st.sessions.len(),
            last_start_error: st.last_start_error.clone(),
            counters: st.counters.clone(),
            worker_pids: Vec::new(),
        };
        for w in st.workers.values() {
            match w.status {
                Status::Starting => out.starting += 1,
                Status::Idle => out.ready += 1,
                Status::Leased(_) | Status::Chores => out.busy += 1,
                Status::Dead => continue,
            }
            if w.overflow {
                out.overflow += 1;
            }
            if let Some(pid) = w.conn.as_ref().and_then(|c| c.pid) {
                out.worker_pids.push(pid);
            }
        }
        out
    }

    /// Stops the pool: queued callers fail, idle workers get `shutdown`, then SIGTERM, then
    /// SIGKILL after `shutdown_grace` each. [`EventSink::stopped`] fires when all have exited.
    pub fn stop(&self) {
        self.shared.stop()
    }

    /// Whether `lease` currently holds a worker.
    #[cfg(test)]
    pub fn holds_worker(&self, lease: LeaseId) -> bool {
        matches!(
            self.shared.lock().leases.get(&lease).map(|l| &l.state),
            Some(LeaseState::Holding { .. })
        )
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

async fn ticker(pool: Weak<Shared>, every: Duration) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(shared) = pool.upgrade() else { return };
        if shared.tick() {
            return;
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state is still the best we have.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &self,
        st: &mut State,
        lease: LeaseId,
        mode: Mode,
        once: Option<Request>,
        reply: Box<dyn ReplySink>,
        pool_timeout: Duration,
        owner: Owner,
        fx: &mut Effects,
    ) -> Result<Acquired, PoolError> {
        // Errors returned here are the NIF's return value: the sink must not answer too.
        if st.closed {
            reply.discard();
            return Err(PoolError::CheckoutFailed("the pool is stopping".into()));
        }
        if let Some(err) = self.start_failure(st) {
            reply.discard();
            return Err(err);
        }
        let now = Instant::now();
        let mut prefer = None;
        let mut target = None;
        if let Mode::Session { id, strict } = &mode {
            let record = st.sessions.entry(id.clone()).or_default();
            let home = record.home;
            let home_alive = home
                .and_then(|h| st.workers.get(&h))
                .is_some_and(|w| w.live());
            match (home, home_alive, *strict) {
                (Some(_), false, true) => {
                    record.home = None;
                    // Its Python state died with the worker: start afresh, everywhere.
                    record.forget();
                    reply.discard();
                    return Err(PoolError::SessionLost(id.to_string()));
                }
                (Some(h), true, _) => {
                    if st.workers[&h].status == Status::Idle {
                        target = Some(h);
                    } else {
                        let until = if *strict {
                            far_future(now)
                        } else {
                            now + self.config.affinity_wait
                        };
                        prefer = Some((h, until));
                    }
                }
                _ => {}
            }
        }
        if target.is_none() && prefer.is_none_or(|(_, until)| until <= now) {
            target = self.pick_idle(st);
        }
        st.leases.insert(
            lease,
            LeaseEntry {
                mode,
                checkout: once.is_none(),
                pool_timeout,
                state: LeaseState::Queued {
                    deadline: now + pool_timeout,
                    pool_timeout,
                    prefer,
                },
                once,
                reply: Some(reply),
                owner,
            },
        );
        match target {
            Some(wid) => {
                self.assign(st, lease, wid, false, fx);
                Ok(Acquired::Now(lease))
            }
            None => {
                st.queue.push_back(lease);
                let until = prefer.map(|(_, until)| until);
                let due = until.map_or(now + pool_timeout, |u| u.min(now + pool_timeout));
                st.queue_check_at = Some(st.queue_check_at.map_or(due, |t| t.min(due)));
                self.grow(st, fx);
                Ok(Acquired::Queued(lease))
            }
        }
    }

    /// When no worker can be started, callers learn why at once instead of at their timeout.
    fn start_failure(&self, st: &State) -> Option<PoolError> {
        let usable = st
            .workers
            .values()
            .any(|w| !matches!(w.status, Status::Starting | Status::Dead));
        match (&st.last_start_error, usable) {
            (Some(e), false) if st.start_failures_in_a_row > 0 => Some(PoolError::CheckoutFailed(
                format!("no worker could be started: {e}"),
            )),
            _ => None,
        }
    }

    /// The most recently used idle worker: keeps hot workers hot and lets overflow ones retire.
    fn pick_idle(&self, st: &State) -> Option<WorkerId> {
        st.workers
            .iter()
            .filter(|(_, w)| w.status == Status::Idle)
            .max_by_key(|(id, w)| (w.idle_since, **id))
            .map(|(id, _)| *id)
    }

    fn assign(
        &self,
        st: &mut State,
        lease: LeaseId,
        wid: WorkerId,
        was_queued: bool,
        fx: &mut Effects,
    ) {
        let entry = st.leases.get_mut(&lease).expect("lease exists");
        entry.state = LeaseState::Holding { worker: wid };
        st.workers.get_mut(&wid).expect("worker exists").status = Status::Leased(lease);
        if let Mode::Session { id, .. } = &entry.mode {
            if let Some(r) = st.sessions.get_mut(id) {
                r.home = Some(wid);
            }
        }
        let entry = st.leases.get_mut(&lease).unwrap();
        match entry.once.take() {
            Some(req) => {
                let reply = entry.reply.take().expect("execute lease has a reply sink");
                self.send(st, lease, wid, req, reply, fx);
            }
            None if was_queued => {
                let reply = entry.reply.take().expect("checkout lease has a reply sink");
                fx.deliveries.push((reply, Delivery::Assigned));
            }
            // Served at once: the NIF's return value says so, no message is due.
            None => {
                if let Some(reply) = entry.reply.take() {
                    reply.discard();
                }
            }
        }
    }

    fn call(
        &self,
        st: &mut State,
        lease: LeaseId,
        req: Request,
        reply: Box<dyn ReplySink>,
        fx: &mut Effects,
    ) -> Result<(), PoolError> {
        let wid = match st.leases.get(&lease).map(|l| &l.state) {
            Some(LeaseState::Holding { worker }) => *worker,
            _ => {
                reply.discard();
                return Err(PoolError::CheckoutFailed(
                    "this checkout holds no worker (checked in, or its worker was recycled)".into(),
                ));
            }
        };
        if !st.workers.get(&wid).is_some_and(|w| w.live()) {
            reply.discard();
            return Err(PoolError::CheckoutFailed(
                "this checkout's worker was recycled (a request timed out or failed); check in and check out again".into(),
            ));
        }
        if !st.workers[&wid].inflight.is_empty() {
            reply.discard();
            return Err(PoolError::CheckoutFailed(
                "a request is already in flight on this checkout".into(),
            ));
        }
        self.send(st, lease, wid, req, reply, fx);
        Ok(())
    }

    /// Writes a caller's request, preceded by a `restore_session` when the worker's copy of
    /// the session is behind the record.
    fn send(
        &self,
        st: &mut State,
        lease: LeaseId,
        wid: WorkerId,
        req: Request,
        reply: Box<dyn ReplySink>,
        fx: &mut Effects,
    ) {
        let mode = st.leases[&lease].mode.clone();
        let mut frames = Vec::new();
        let mut pending = Vec::new();
        if let Mode::Session { id, strict } = &mode {
            let record = st.sessions.entry(id.clone()).or_default();
            let current = st.workers[&wid].sessions.get(id) == Some(&record.generation);
            // A strict session is never re-created; the worker is still marked as holding it,
            // so that end_session frees it there.
            if !current && !strict && record.has_state() {
                let rid = self.next_request_id();
                let args = record.restore_args(id);
                let generation = record.generation;
                frames.extend(
                    protocol::encode_request(rid, "restore_session", &args, usize::MAX).unwrap(),
                );
                pending.push(Pending {
                    id: rid,
                    kind: PendingKind::Restore {
                        session: id.clone(),
                        generation,
                    },
                });
                st.counters.restores += 1;
            } else if !current {
                // Nothing to re-create: this worker is as current as any.
                let g = record.generation;
                st.workers
                    .get_mut(&wid)
                    .unwrap()
                    .sessions
                    .insert(id.clone(), g);
            }
        }
        let rid = self.next_request_id();
        match protocol::encode_request(rid, &req.command, &req.args, self.config.max_frame_size) {
            Ok(frame) => frames.extend(frame),
            Err(e) => {
                fx.deliveries.push((reply, Delivery::Reply(Err(e))));
                self.finish_lease_request(st, lease, wid, fx);
                return;
            }
        }
        let recorded = matches!(mode, Mode::Session { .. }) && session::is_recorded(&req.command)
            || session::is_global_config(&req.command, &req.args);
        pending.push(Pending {
            id: rid,
            kind: PendingKind::Caller {
                lease,
                command: req.command,
                args: req.args,
                timeout: req.timeout,
                recorded,
            },
        });
        st.leases.get_mut(&lease).unwrap().reply = Some(reply);
        st.counters.requests += 1;
        let w = st.workers.get_mut(&wid).unwrap();
        w.inflight.extend(pending);
        w.deadline = Some((Instant::now() + req.timeout, req.timeout));
        fx.writes.push((
            wid,
            w.conn.clone().expect("a leased worker is connected"),
            frames,
        ));
    }

    /// After a request of `lease` on `wid` completed: an execute lease ends, a checkout keeps
    /// its worker.
    fn finish_lease_request(
        &self,
        st: &mut State,
        lease: LeaseId,
        wid: WorkerId,
        fx: &mut Effects,
    ) {
        if st.leases.get(&lease).is_some_and(|l| !l.checkout) {
            self.end_lease(st, lease);
            self.worker_free(st, wid, fx);
        }
    }

    fn end_lease(&self, st: &mut State, lease: LeaseId) {
        st.leases.remove(&lease);
    }

    fn release(&self, lease: LeaseId) {
        let mut fx = Effects::default();
        {
            let mut st = self.lock();
            let Some(entry) = st.leases.remove(&lease) else {
                return;
            };
            match entry.state {
                LeaseState::Queued { .. } => st.queue.retain(|l| *l != lease),
                LeaseState::Holding { worker } => {
                    let busy = st
                        .workers
                        .get(&worker)
                        .is_some_and(|w| !w.inflight.is_empty());
                    if busy {
                        // Its holder is gone mid-request: the worker's state is unknown.
                        self.recycle(
                            &mut st,
                            worker,
                            "its holder left with a request in flight",
                            &mut fx,
                        );
                    } else {
                        self.worker_free(&mut st, worker, &mut fx);
                    }
                }
            }
        }
        self.perform(fx);
    }

    /// Hands a worker that just became free to its chores, a waiter, or the idle set.
    fn worker_free(&self, st: &mut State, wid: WorkerId, fx: &mut Effects) {
        let Some(w) = st.workers.get_mut(&wid) else {
            return;
        };
        if w.status == Status::Dead {
            return;
        }
        w.deadline = None;
        if st.closed {
            w.status = Status::Idle;
            self.shutdown_worker(st, wid, fx);
            return;
        }
        if !w.chores.is_empty() {
            let mut frames = Vec::new();
            while let Some(chore) = w.chores.pop_front() {
                let rid = self.next_request_id();
                frames.extend(
                    protocol::encode_request(rid, chore.command, &chore.args, usize::MAX).unwrap(),
                );
                w.inflight.push_back(Pending {
                    id: rid,
                    kind: PendingKind::Chore,
                });
            }
            w.status = Status::Chores;
            w.deadline = Some((
                Instant::now() + self.config.start_timeout,
                self.config.start_timeout,
            ));
            fx.writes.push((wid, w.conn.clone().unwrap(), frames));
            return;
        }
        w.status = Status::Idle;
        w.idle_since = Instant::now();
        let now = Instant::now();
        let preference = |l: &LeaseId| match st.leases.get(l).map(|e| &e.state) {
            Some(LeaseState::Queued { prefer, .. }) => *prefer,
            _ => None,
        };
        // A waiter whose session lives on this worker goes first if it is near the head of the
        // queue (a bounded look-ahead keeps the queue fair); otherwise FIFO among waiters that
        // accept any worker.
        let lookahead = 2 * self.config.pool_size.max(1);
        let pick = st
            .queue
            .iter()
            .take(lookahead)
            .position(|l| matches!(preference(l), Some((home, _)) if home == wid))
            .or_else(|| {
                st.queue.iter().position(|l| match preference(l) {
                    Some((home, until)) => home == wid || until <= now,
                    None => true,
                })
            });
        if let Some(pos) = pick {
            let lease = st.queue.remove(pos).unwrap();
            self.assign(st, lease, wid, true, fx);
        }
    }

    /// Starts a worker when callers wait and none is free.
    fn grow(&self, st: &mut State, fx: &mut Effects) {
        if st.closed {
            return;
        }
        let live = |w: &&WorkerEntry| w.live();
        let permanent = st
            .workers
            .values()
            .filter(live)
            .filter(|w| !w.overflow)
            .count();
        let overflow = st
            .workers
            .values()
            .filter(live)
            .filter(|w| w.overflow)
            .count();
        let starting = st
            .workers
            .values()
            .filter(|w| w.status == Status::Starting)
            .count();
        let idle = st
            .workers
            .values()
            .filter(|w| w.status == Status::Idle)
            .count();
        let mut wanted = st.queue.len().saturating_sub(starting + idle);
        let delay = self.backoff(st);
        let mut p = permanent;
        while wanted > 0 && p < self.config.pool_size {
            self.add_worker(st, false, delay, fx);
            p += 1;
            wanted -= 1;
        }
        // Overflow only once every permanent worker is up and busy.
        let mut o = overflow;
        while wanted > 0
            && p >= self.config.pool_size
            && starting == 0
            && o < self.config.max_overflow
        {
            self.add_worker(st, true, delay, fx);
            o += 1;
            wanted -= 1;
        }
    }

    fn backoff(&self, st: &State) -> Duration {
        match st.start_failures_in_a_row {
            0 => Duration::ZERO,
            n => Duration::from_millis(100u64 << (n - 1).min(6)).min(Duration::from_secs(5)),
        }
    }

    fn add_worker(&self, st: &mut State, overflow: bool, delay: Duration, fx: &mut Effects) {
        let wid = st.next_worker;
        st.next_worker += 1;
        let now = Instant::now();
        st.workers.insert(
            wid,
            WorkerEntry {
                overflow,
                status: Status::Starting,
                conn: None,
                inflight: VecDeque::new(),
                deadline: Some((
                    now + delay + self.config.start_timeout,
                    self.config.start_timeout,
                )),
                sessions: HashMap::new(),
                chores: VecDeque::new(),
                idle_since: now,
                spawned_at: now,
                failure: None,
            },
        );
        fx.spawns.push((wid, delay));
    }

    /// Kills a worker whose state is unknown and fails whatever it still owed.
    fn recycle(&self, st: &mut State, wid: WorkerId, why: &str, fx: &mut Effects) {
        self.kill_worker(st, wid, why, fx, |_| {
            PoolError::CheckoutFailed(why.to_owned())
        });
    }

    fn kill_worker(
        &self,
        st: &mut State,
        wid: WorkerId,
        why: &str,
        fx: &mut Effects,
        error: impl Fn(&PendingKind) -> PoolError,
    ) {
        let Some(w) = st.workers.get_mut(&wid) else {
            return;
        };
        if w.status == Status::Dead {
            return;
        }
        w.status = Status::Dead;
        w.deadline = None;
        st.counters.recycled += 1;
        if let Some(conn) = &w.conn {
            fx.signals.push((conn.clone(), libc::SIGKILL));
        }
        self.events
            .log(wid, "warning", format!("recycling worker {wid}: {why}"));
        let owed: Vec<Pending> = w.inflight.drain(..).collect();
        for p in owed {
            if let PendingKind::Caller { lease, .. } = &p.kind {
                let err = error(&p.kind);
                self.fail_request(st, *lease, err, fx);
            }
        }
        // A checkout that loses its worker stays Holding it: `call` then reports it has none.
        self.lose_sessions(st, wid, fx);
    }

    fn lose_sessions(&self, st: &mut State, wid: WorkerId, fx: &mut Effects) {
        // Strict waiters of this worker's sessions can never be served now.
        let waiting: Vec<LeaseId> = st
            .queue
            .iter()
            .copied()
            .filter(|l| {
                matches!(st.leases.get(l), Some(LeaseEntry {
                    mode: Mode::Session { strict: true, .. },
                    state: LeaseState::Queued { prefer: Some((home, _)), .. }, ..
                }) if *home == wid)
            })
            .collect();
        for lease in waiting {
            st.queue.retain(|l| *l != lease);
            if let Some(mut entry) = st.leases.remove(&lease) {
                if let Mode::Session { id, .. } = &entry.mode {
                    if let Some(r) = st.sessions.get_mut(id) {
                        r.home = None;
                    }
                    if let Some(reply) = entry.reply.take() {
                        fx.deliveries.push((
                            reply,
                            Delivery::Reply(Err(PoolError::SessionLost(id.to_string()))),
                        ));
                    }
                }
            }
        }
    }

    fn fail_request(&self, st: &mut State, lease: LeaseId, err: PoolError, fx: &mut Effects) {
        st.counters.errors += 1;
        let Some(entry) = st.leases.get_mut(&lease) else {
            return;
        };
        if let Some(reply) = entry.reply.take() {
            fx.deliveries.push((reply, Delivery::Reply(Err(err))));
        }
        if !entry.checkout {
            self.end_lease(st, lease);
        }
    }

    // ---- events from worker tasks ------------------------------------------------------

    fn on_spawned(&self, wid: WorkerId, conn: Arc<Conn>) -> bool {
        let mut fx = Effects::default();
        let keep = {
            let mut st = self.lock();
            let st = &mut *st;
            let Some(w) = st.workers.get_mut(&wid) else {
                return false;
            };
            if w.status == Status::Dead {
                false
            } else {
                w.conn = Some(conn.clone());
                let rid = self.next_request_id();
                let mut frames = protocol::encode_request(rid, "ping", b"{}", usize::MAX).unwrap();
                w.inflight.push_back(Pending {
                    id: rid,
                    kind: PendingKind::Handshake,
                });
                for chore in &st.init {
                    let rid = self.next_request_id();
                    frames.extend(
                        protocol::encode_request(rid, chore.command, &chore.args, usize::MAX)
                            .unwrap(),
                    );
                    w.inflight.push_back(Pending {
                        id: rid,
                        kind: PendingKind::Chore,
                    });
                }
                fx.writes.push((wid, conn, frames));
                true
            }
        };
        self.perform(fx);
        keep
    }

    fn on_start_failed(&self, wid: WorkerId, reason: String) {
        let mut fx = Effects::default();
        {
            let mut st = self.lock();
            let Some(w) = st.workers.remove(&wid) else {
                return;
            };
            st.counters.start_failures += 1;
            st.start_failures_in_a_row += 1;
            st.last_start_error = Some(reason.clone());
            self.events.log(
                wid,
                "error",
                format!("worker {wid} failed to start: {reason}"),
            );
            if let Some(conn) = w.conn {
                fx.signals.push((conn, libc::SIGKILL));
            }
            // Nobody can serve the queue: tell callers why now rather than at their timeout.
            if let Some(err) = self.start_failure(&st) {
                let starting = st.workers.values().any(|w| w.status == Status::Starting);
                if !starting {
                    let queued: Vec<LeaseId> = st.queue.drain(..).collect();
                    for lease in queued {
                        self.fail_request(&mut st, lease, err.clone(), &mut fx);
                        self.end_lease(&mut st, lease);
                    }
                }
            }
            self.replace(&mut st, w.overflow, true, &mut fx);
            self.check_stopped(&mut st, &mut fx);
        }
        self.perform(fx);
    }

    /// Keeps the pool at `pool_size`: a permanent worker that ends is replaced (after a
    /// backoff while start-ups fail); a lazy pool retries a failed start only on demand.
    fn replace(&self, st: &mut State, overflow: bool, after_start_failure: bool, fx: &mut Effects) {
        if st.closed {
            return;
        }
        let permanent = st
            .workers
            .values()
            .filter(|w| w.live() && !w.overflow)
            .count();
        let wanted = !after_start_failure || !self.config.lazy || !st.queue.is_empty();
        if !overflow && permanent < self.config.pool_size && wanted {
            let delay = self.backoff(st);
            self.add_worker(st, false, delay, fx);
        } else {
            self.grow(st, fx);
        }
    }

    /// A write found the worker's stdin closed: the process is gone and read nothing of it.
    /// Execute requests go back to the head of the queue (they never ran); a checkout is bound
    /// to its worker, so its request fails as if the worker had died mid-request.
    fn on_write_failed(&self, wid: WorkerId) {
        let mut fx = Effects::default();
        {
            let mut st = self.lock();
            let st = &mut *st;
            let owed: Vec<Pending> = match st.workers.get_mut(&wid) {
                Some(w) if w.status != Status::Dead => w.inflight.drain(..).collect(),
                _ => return,
            };
            let now = Instant::now();
            let mut unsent = VecDeque::new();
            for p in owed.into_iter().rev() {
                let requeue = match &p.kind {
                    PendingKind::Caller { lease, .. } => {
                        st.leases.get(lease).is_some_and(|l| !l.checkout)
                    }
                    _ => false,
                };
                match p.kind {
                    PendingKind::Caller {
                        lease,
                        command,
                        args,
                        timeout,
                        ..
                    } if requeue => {
                        let entry = st.leases.get_mut(&lease).unwrap();
                        entry.once = Some(Request {
                            command,
                            args,
                            timeout,
                        });
                        entry.state = LeaseState::Queued {
                            deadline: now + entry.pool_timeout,
                            pool_timeout: entry.pool_timeout,
                            prefer: None,
                        };
                        st.queue.push_front(lease);
                        st.queue_check_at = Some(now + entry.pool_timeout);
                    }
                    kind => unsent.push_front(Pending { id: p.id, kind }),
                }
            }
            st.workers.get_mut(&wid).unwrap().inflight = unsent;
            self.kill_worker(st, wid, "its stdin is closed (it exited)", &mut fx, |_| {
                PoolError::WorkerExited(ExitInfo::Unknown)
            });
            let idle: Vec<WorkerId> = st
                .workers
                .iter()
                .filter(|(_, w)| w.status == Status::Idle)
                .map(|(id, _)| *id)
                .collect();
            for other in idle {
                self.worker_free(st, other, &mut fx);
            }
            self.grow(st, &mut fx);
        }
        self.perform(fx);
    }

    fn on_frame(&self, wid: WorkerId, body: Bytes) {
        // Parse before locking: a large reply must not hold up callers (BEAM schedulers among
        // them) that wait for the lock.
        let decoded = protocol::decode_response(&body);
        let mut fx = Effects::default();
        {
            let mut st = self.lock();
            self.handle_frame(&mut st, wid, decoded, &mut fx);
        }
        self.perform(fx);
    }

    fn handle_frame(
        &self,
        st: &mut State,
        wid: WorkerId,
        decoded: Result<protocol::Response, PoolError>,
        fx: &mut Effects,
    ) {
        let Some(w) = st.workers.get_mut(&wid) else {
            return;
        };
        if w.status == Status::Dead {
            return;
        }
        let Some(expected) = w.inflight.front().map(|p| p.id) else {
            return self.recycle(st, wid, "it wrote a frame nobody asked for", fx);
        };
        let response = match decoded {
            Ok(r) if r.id == expected => r,
            Ok(_) => {
                return self.kill_worker(
                    st,
                    wid,
                    "it answered with another request's id",
                    fx,
                    |_| PoolError::ResponseMismatch,
                )
            }
            Err(e) => {
                let why = format!("its reply could not be decoded: {e}");
                return self.kill_worker(st, wid, &why, fx, move |_| e.clone());
            }
        };
        let pending = w.inflight.pop_front().unwrap();
        let done = w.inflight.is_empty();
        match pending.kind {
            PendingKind::Handshake => {
                if let Err(e) = response.outcome {
                    let why = format!("its start-up ping failed: {e}");
                    return self.recycle(st, wid, &why, fx);
                }
                st.start_failures_in_a_row = 0;
                st.last_start_error = None;
                st.counters.worker_starts += 1;
                let w = &st.workers[&wid];
                let ms = w.spawned_at.elapsed().as_millis() as u64;
                self.events
                    .worker_started(wid, w.conn.as_ref().and_then(|c| c.pid), ms);
                if done {
                    self.worker_free(st, wid, fx);
                } else {
                    st.workers.get_mut(&wid).unwrap().status = Status::Chores;
                }
            }
            PendingKind::Chore => {
                if let Err(e) = response.outcome {
                    self.events.log(
                        wid,
                        "warning",
                        format!("internal command failed on worker {wid}: {e}"),
                    );
                }
                if done && st.workers[&wid].status == Status::Chores {
                    self.worker_free(st, wid, fx);
                }
            }
            PendingKind::Restore {
                session,
                generation,
            } => match response.outcome {
                Ok(_) => {
                    st.workers
                        .get_mut(&wid)
                        .unwrap()
                        .sessions
                        .insert(session, generation);
                }
                Err(e) => {
                    self.events.log(
                        wid,
                        "warning",
                        format!("could not re-create session {session:?}: {e}"),
                    );
                }
            },
            PendingKind::Caller {
                lease,
                command,
                args,
                recorded,
                ..
            } => {
                let outcome = response.outcome;
                if outcome.is_ok() && matches!(command.as_str(), "cleanup" | "reset_state") {
                    // Every session this worker held is gone from it; reset_state also
                    // forgot the global LM, which is configured again.
                    let init: Vec<Chore> = st
                        .init
                        .iter()
                        .map(|c| Chore {
                            command: c.command,
                            args: c.args.clone(),
                        })
                        .collect();
                    let w = st.workers.get_mut(&wid).unwrap();
                    w.sessions.clear();
                    if command == "reset_state" {
                        w.chores.extend(init);
                    }
                }
                if let (Ok(result), true) = (&outcome, recorded) {
                    self.record(st, wid, lease, &command, &args, result, fx);
                }
                if outcome.is_err() {
                    st.counters.errors += 1;
                }
                if let Some(entry) = st.leases.get_mut(&lease) {
                    if let Some(reply) = entry.reply.take() {
                        fx.deliveries.push((reply, Delivery::Reply(outcome)));
                    }
                }
                st.workers.get_mut(&wid).unwrap().deadline = None;
                if st.leases.contains_key(&lease) {
                    self.finish_lease_request(st, lease, wid, fx);
                } else {
                    // Released while in flight was handled by recycling; nothing to do.
                }
            }
        }
    }

    /// Records a successful state-changing command of a session, or a global configuration.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        st: &mut State,
        wid: WorkerId,
        lease: LeaseId,
        command: &str,
        args: &[u8],
        result: &[u8],
        fx: &mut Effects,
    ) {
        if session::is_global_config(command, args) {
            st.init.retain(|c| c.command != "configure_lm");
            st.init.push(Chore {
                command: "configure_lm",
                args: args.to_vec(),
            });
            let others: Vec<WorkerId> = st
                .workers
                .iter()
                .filter(|(id, w)| **id != wid && w.live())
                .map(|(id, _)| *id)
                .collect();
            for other in others {
                let w = st.workers.get_mut(&other).unwrap();
                w.chores.push_back(Chore {
                    command: "configure_lm",
                    args: args.to_vec(),
                });
                if w.status == Status::Idle {
                    self.worker_free(st, other, fx);
                }
            }
            return;
        }
        let Some(Mode::Session { id, .. }) = st.leases.get(&lease).map(|l| l.mode.clone()) else {
            return;
        };
        let result: Value = serde_json::from_slice(result).unwrap_or(Value::Null);
        let record = st.sessions.entry(id.clone()).or_default();
        let was_current = st.workers[&wid].sessions.get(&id) == Some(&record.generation);
        if record.apply(command, args, &result) && was_current {
            let g = record.generation;
            st.workers.get_mut(&wid).unwrap().sessions.insert(id, g);
        }
    }

    fn on_stream_error(&self, wid: WorkerId, err: std::io::Error) {
        let mut fx = Effects::default();
        {
            let mut st = self.lock();
            let e = PoolError::Decode(if err.kind() == std::io::ErrorKind::InvalidData {
                format!(
                    "the worker wrote a frame header announcing more than max_frame_size ({} bytes): \
                     an oversized reply, or bytes that are not a frame (a stray write to stdout)",
                    self.config.max_frame_size
                )
            } else {
                format!("unreadable output from worker: {err}")
            });
            let why = e.to_string();
            self.kill_worker(&mut st, wid, &why, &mut fx, move |_| e.clone());
        }
        self.perform(fx);
    }

    fn on_exit(&self, wid: WorkerId, exit: ExitInfo, stderr: String) {
        let mut fx = Effects::default();
        {
            let mut st = self.lock();
            let Some(w) = st.workers.get(&wid) else {
                return;
            };
            let (status, overflow) = (w.status, w.overflow);
            if status == Status::Starting {
                let why = w
                    .failure
                    .clone()
                    .unwrap_or_else(|| format!("it exited during start-up ({exit})"));
                drop(st);
                let tail = if stderr.is_empty() {
                    String::new()
                } else {
                    format!("; its stderr ends with:\n{stderr}")
                };
                return self.on_start_failed(wid, format!("{why}{tail}"));
            }
            if status != Status::Dead {
                self.kill_worker(
                    &mut st,
                    wid,
                    &format!("it exited ({exit})"),
                    &mut fx,
                    |_| PoolError::WorkerExited(exit),
                );
            }
            st.workers.remove(&wid);
            self.events.worker_exited(wid, exit.to_string());
            self.replace(&mut st, overflow, false, &mut fx);
            self.check_stopped(&mut st, &mut fx);
        }
        self.perform(fx);
    }

    /// Expires queue waits, request deadlines and idle overflow workers. True once stopped.
    fn tick(&self) -> bool {
        let mut fx = Effects::default();
        let done = {
            let mut st = self.lock();
            let now = Instant::now();
            if st.queue_check_at.is_some_and(|t| t <= now) {
                self.expire_queue(&mut st, now, &mut fx);
            }
            // Requests and start-ups past their deadline.
            let late: Vec<(WorkerId, Status, Duration)> = st
                .workers
                .iter()
                .filter_map(|(id, w)| match w.deadline {
                    Some((d, t)) if d <= now && w.live() => Some((*id, w.status, t)),
                    _ => None,
                })
                .collect();
            for (wid, status, t) in late {
                if status == Status::Starting {
                    let conn = st.workers.get(&wid).and_then(|w| w.conn.clone());
                    if let Some(c) = conn {
                        fx.signals.push((c, libc::SIGKILL));
                    }
                    // Its exit reports the failure, with the stderr tail.
                    let w = st.workers.get_mut(&wid).unwrap();
                    w.deadline = None;
                    w.failure = Some(format!(
                        "it did not answer its start-up ping within {} ms",
                        t.as_millis()
                    ));
                } else {
                    st.counters.timeouts += 1;
                    let ms = t.as_millis() as u64;
                    self.kill_worker(
                        &mut st,
                        wid,
                        &format!("a request took longer than {ms} ms"),
                        &mut fx,
                        |_| PoolError::Timeout(ms),
                    );
                }
            }
            // Overflow workers idle for too long retire.
            let retire: Vec<WorkerId> = st
                .workers
                .iter()
                .filter(|(_, w)| {
                    w.overflow
                        && w.status == Status::Idle
                        && now.duration_since(w.idle_since) >= self.config.overflow_idle
                })
                .map(|(id, _)| *id)
                .collect();
            for wid in retire {
                self.shutdown_worker(&mut st, wid, &mut fx);
            }
            st.closed && st.workers.is_empty()
        };
        self.perform(fx);
        done
    }

    /// Fails waiters past their pool timeout, lets waiters whose affinity wait ran out take an
    /// idle worker, and computes when the queue next needs a look.
    fn expire_queue(&self, st: &mut State, now: Instant, fx: &mut Effects) {
        let expired: Vec<(LeaseId, Duration)> = st
            .queue
            .iter()
            .filter_map(|l| match st.leases.get(l).map(|e| &e.state) {
                Some(LeaseState::Queued {
                    deadline,
                    pool_timeout,
                    ..
                }) if *deadline <= now => Some((*l, *pool_timeout)),
                _ => None,
            })
            .collect();
        if !expired.is_empty() {
            // One pass over the queue, however many expire at once.
            let gone: std::collections::HashSet<LeaseId> =
                expired.iter().map(|(l, _)| *l).collect();
            st.queue.retain(|l| !gone.contains(l));
        }
        for (lease, waited) in expired {
            st.counters.pool_timeouts += 1;
            self.fail_request(
                st,
                lease,
                PoolError::PoolTimeout(waited.as_millis() as u64),
                fx,
            );
            self.end_lease(st, lease);
        }
        while let Some(wid) = self.pick_idle(st) {
            let ready = st.queue.iter().position(|l| {
                matches!(
                    st.leases.get(l).map(|e| &e.state),
                    Some(LeaseState::Queued { prefer: Some((_, until)), .. }) if *until <= now
                )
            });
            match ready {
                Some(pos) => {
                    let lease = st.queue.remove(pos).unwrap();
                    self.assign(st, lease, wid, true, fx);
                }
                None => break,
            }
        }
        st.queue_check_at = st
            .queue
            .iter()
            .filter_map(|l| match st.leases.get(l).map(|e| &e.state) {
                Some(LeaseState::Queued {
                    deadline, prefer, ..
                }) => {
                    let until = prefer.map(|(_, u)| u).filter(|u| *u > now);
                    Some(until.map_or(*deadline, |u| u.min(*deadline)))
                }
                _ => None,
            })
            .min();
    }

    fn shutdown_worker(&self, st: &mut State, wid: WorkerId, fx: &mut Effects) {
        let Some(w) = st.workers.get_mut(&wid) else {
            return;
        };
        if w.status != Status::Idle {
            return;
        }
        w.status = Status::Dead;
        if let Some(conn) = w.conn.clone() {
            let rid = self.next_request_id();
            fx.writes.push((
                wid,
                conn.clone(),
                protocol::encode_request(rid, "shutdown", b"{}", usize::MAX).unwrap(),
            ));
            let grace = self.config.shutdown_grace;
            crate::runtime::spawn(async move {
                tokio::time::sleep(grace).await;
                conn.signal(libc::SIGTERM);
                tokio::time::sleep(grace).await;
                conn.signal(libc::SIGKILL);
            });
        }
    }

    fn stop(&self) {
        let mut fx = Effects::default();
        {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            let queued: Vec<LeaseId> = st.queue.drain(..).collect();
            for lease in queued {
                self.fail_request(
                    &mut st,
                    lease,
                    PoolError::CheckoutFailed("the pool is stopping".into()),
                    &mut fx,
                );
                self.end_lease(&mut st, lease);
            }
            let ids: Vec<WorkerId> = st.workers.keys().copied().collect();
            for wid in ids {
                let w = &st.workers[&wid];
                match w.status {
                    Status::Idle => self.shutdown_worker(&mut st, wid, &mut fx),
                    Status::Dead => {}
                    _ => {
                        // Busy or starting: give it the grace period, then SIGTERM, then SIGKILL.
                        if let Some(conn) = w.conn.clone() {
                            let grace = self.config.shutdown_grace;
                            crate::runtime::spawn(async move {
                                tokio::time::sleep(grace).await;
                                conn.signal(libc::SIGTERM);
                                tokio::time::sleep(grace).await;
                                conn.signal(libc::SIGKILL);
                            });
                        }
                    }
                }
            }
            self.check_stopped(&mut st, &mut fx);
        }
        self.perform(fx);
    }

    fn check_stopped(&self, st: &mut State, fx: &mut Effects) {
        if st.closed && st.workers.is_empty() && !st.stopped_notified {
            st.stopped_notified = true;
            fx.stopped = true;
        }
    }

    fn perform(&self, fx: Effects) {
        for (wid, conn, frames) in fx.writes {
            if !conn.write(frames) {
                self.on_write_failed(wid);
            }
        }
        for (conn, sig) in fx.signals {
            conn.signal(sig);
        }
        for (wid, delay) in fx.spawns {
            let weak = self.weak_self();
            crate::runtime::spawn(run_worker(weak, wid, delay));
        }
        for (sink, delivery) in fx.deliveries {
            sink.deliver(delivery);
        }
        if fx.stopped {
            self.events.stopped();
        }
    }

    fn weak_self(&self) -> Weak<Shared> {
        self.me.clone()
    }
}

fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// Runs one worker: spawn, handshake, read frames until it exits, report the exit.
async fn run_worker(pool: Weak<Shared>, wid: WorkerId, delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let Some(shared) = pool.upgrade() else { return };
    let spawned = match shared.spawner.spawn(wid) {
        Ok(s) => s,
        Err(e) => return shared.on_start_failed(wid, e.to_string()),
    };
    let conn = Arc::new(Conn::new(spawned.pid, spawned.stdin, spawned.signal));
    let stderr_task = spawned.stderr.map(|stderr| {
        let conn = conn.clone();
        let pool = pool.clone();
        crate::runtime::spawn(worker::drain_stderr(stderr, move |line| {
            conn.remember_stderr(&line);
            if let Some(p) = pool.upgrade() {
                p.events.log(wid, worker::level_of(&line), line);
            }
        }))
    });
    if !shared.on_spawned(wid, conn.clone()) {
        conn.signal(libc::SIGKILL);
    }
    let max_frame = shared.config.max_frame_size;
    drop(shared);
    let mut frames = FramedRead::new(spawned.stdout, protocol::codec(max_frame));
    let mut exit_fut = spawned.exit;
    let exit = loop {
        tokio::select! {
            biased;
            frame = frames.next() => match frame {
                Some(Ok(body)) => match pool.upgrade() {
                    Some(p) => p.on_frame(wid, body.freeze()),
                    None => conn.signal(libc::SIGKILL),
                },
                Some(Err(e)) => {
                    if let Some(p) = pool.upgrade() {
                        p.on_stream_error(wid, e);
                    }
                    conn.signal(libc::SIGKILL);
                    break exit_fut.await;
                }
                None => {
                    // stdout closed: the process is exiting, or it closed fd 1 and can no
                    // longer answer. Either way it is done.
                    match tokio::time::timeout(Duration::from_millis(500), &mut exit_fut).await {
                        Ok(exit) => break exit,
                        Err(_) => {
                            conn.signal(libc::SIGKILL);
                            break exit_fut.await;
                        }
                    }
                }
            },
            exit = &mut exit_fut => {
                // Replies written just before exiting are still in the pipe.
                while let Ok(Some(Ok(body))) = tokio::time::timeout(Duration::from_millis(50), frames.next()).await {
                    if let Some(p) = pool.upgrade() {
                        p.on_frame(wid, body.freeze());
                    }
                }
                break exit;
            }
        }
    };
    if let Some(task) = stderr_task {
        let _ = tokio::time::timeout(Duration::from_millis(500), task).await;
    }
    if let Some(p) = pool.upgrade() {
        p.on_exit(wid, exit, conn.stderr_summary());
    }
}
