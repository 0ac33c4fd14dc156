//! The pool's I/O executor: the core's state machine behind one mutex, and the tasks that do
//! what it asks.
//!
//! Every entry point locks, applies one transition of [`dspex_pool_core::Core`], unlocks, and
//! then performs the effects it returned, in order: writes to worker pipes (from the calling
//! thread when the pipe takes them at once), signals, spawns, replies, log lines and lifecycle
//! events. Nothing slow runs under the lock. Per worker, one Tokio task spawns the process and
//! reads its frames until it exits (frames are decoded before locking); one timer task sleeps
//! until exactly the core's next deadline, woken earlier when a transition arms an earlier one,
//! and not at all while nothing is timed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::codec::FramedRead;

pub use dspex_pool_core::{
    Acquired, Counters, Delivery, LeaseId, Mode, Owner, PoolConfig, PoolStatus, Request, RequestId,
    WorkerId,
};
use dspex_pool_core::{Core, Effect, Event, Outcome};

use crate::error::PoolError;
use crate::protocol;
use crate::reader::{Armed, Next, Poller, Reader, Slot, Watch};
use crate::worker::{self, Conn, ExitFuture, Spawner, Stdout};

/// Where a [`Delivery`] goes: a BEAM process in production, a channel in tests.
pub trait ReplySink: Send + 'static {
    fn deliver(self: Box<Self>, delivery: Delivery);

    /// Drops a sink that will never be needed (the answer was the call's return value).
    fn discard(self: Box<Self>) {}

    /// Prepares the delivery of an intermediate frame (`{"id": N, "event": ...}`, its JSON
    /// text) of the request this sink waits for, without consuming the sink. Runs under the
    /// pool's lock, so it must be quick; the closure it returns runs after the lock is
    /// released. `None`: this sink takes no events (they are dropped).
    fn event(&self, body: bytes::Bytes) -> Option<Box<dyn FnOnce() + Send>> {
        let _ = body;
        None
    }

    /// Whether the process behind this sink reads its worker's replies itself when the
    /// poller tells it to (see [`crate::reader`]).
    fn reads_itself(&self) -> bool {
        false
    }

    /// Arms `watch` (once) for this sink's process, naming `worker`. Runs under the pool's
    /// lock. False when it could not.
    fn arm(&self, watch: &dyn Watch, worker: WorkerId) -> bool {
        let _ = (watch, worker);
        false
    }
}

/// Worker logs and lifecycle events for the pool's owner.
pub trait EventSink: Send + Sync + 'static {
    fn log(&self, worker: WorkerId, level: &'static str, line: String);
    fn worker_started(&self, worker: WorkerId, pid: Option<u32>, start_ms: u64);
    fn worker_exited(&self, worker: WorkerId, reason: String);
    fn stopped(&self);
}

type Reply = Box<dyn ReplySink>;

struct Inner {
    core: Core<Reply>,
    /// The pipes and signal of each worker whose process runs.
    conns: HashMap<WorkerId, Arc<Conn>>,
    /// The deadline the timer task sleeps until (`None`: it waits to be woken).
    timer_at: Option<Instant>,
    /// Workers whose stdout the BEAM polls, and who it is armed for.
    readers: HashMap<WorkerId, Slot>,
}

/// An effect with its worker's connection resolved (under the lock).
enum Action {
    Write(WorkerId, Arc<Conn>, Vec<u8>),
    Signal(Arc<Conn>, i32),
    Spawn(WorkerId),
    Deliver(Reply, Delivery),
    Discard(Reply),
    Event(Box<dyn FnOnce() + Send>),
    Log(WorkerId, &'static str, String),
    Started(WorkerId, Option<u32>, u64),
    Exited(WorkerId, String),
    Stopped,
}

pub(crate) struct Shared {
    spawner: Box<dyn Spawner>,
    /// Polls real workers' stdout (the BEAM); `None`: Tokio tasks read every worker.
    poller: Option<Box<dyn Poller>>,
    events: Box<dyn EventSink>,
    max_frame_size: usize,
    inner: Mutex<Inner>,
    wake: Arc<Notify>,
    next_lease: AtomicU64,
    me: Weak<Shared>,
    /// Set while stopping: keeps the pool alive until its workers have exited, even once every
    /// handle is gone (its grace timers must still fire).
    keep_alive: Mutex<Option<Arc<Shared>>>,
}

/// A handle to a pool. Dropping the last handle stops the pool.
pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    /// Starts a pool; with `lazy: false` it starts `pool_size` workers concurrently.
    pub fn start(
        config: PoolConfig,
        spawner: Box<dyn Spawner>,
        events: Box<dyn EventSink>,
    ) -> Pool {
        Pool::start_polled(config, spawner, events, None)
    }

    /// [`Pool::start`], with workers' stdout (when a file descriptor) polled by `poller`.
    pub fn start_polled(
        config: PoolConfig,
        spawner: Box<dyn Spawner>,
        events: Box<dyn EventSink>,
        poller: Option<Box<dyn Poller>>,
    ) -> Pool {
        let mut fx = Vec::new();
        let max_frame_size = config.max_frame_size;
        let core = Core::new(config, Instant::now(), &mut fx);
        let shared = Arc::new_cyclic(|me| Shared {
            spawner,
            poller,
            events,
            max_frame_size,
            inner: Mutex::new(Inner {
                core,
                conns: HashMap::new(),
                timer_at: None,
                readers: HashMap::new(),
            }),
            wake: Arc::new(Notify::new()),
            next_lease: AtomicU64::new(1),
            me: me.clone(),
            keep_alive: Mutex::new(None),
        });
        crate::runtime::spawn(timer_loop(Arc::downgrade(&shared), shared.wake.clone()));
        let actions = {
            let mut inner = shared.lock();
            shared.resolve(&mut inner, fx)
        };
        shared.perform(actions);
        Pool { shared }
    }

    /// A fresh id for [`Pool::acquire`].
    pub fn new_lease_id(&self) -> LeaseId {
        self.shared.next_lease.fetch_add(1, Ordering::Relaxed)
    }

    /// Claims a worker for `mode`. With `once`, the request is sent as soon as a worker is
    /// claimed and the lease ends with its reply (the execute fast path).
    ///
    /// # Errors
    /// [`PoolError::CheckoutFailed`] when the pool is stopping or nothing can serve,
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
        let event = Event::Acquire {
            lease,
            mode,
            once,
            reply,
            pool_timeout,
            owner,
        };
        match self.shared.step(event) {
            Outcome::Acquired(r) => r,
            other => unreachable!("acquire answered {other:?}"),
        }
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
        let event = Event::Call {
            lease,
            request,
            reply,
        };
        match self.shared.step(event) {
            Outcome::Called(r) => r,
            other => unreachable!("call answered {other:?}"),
        }
    }

    /// Writes a control frame for the request `lease` has in flight (protocol v2 only): `body`
    /// is a JSON object such as `{"control":"tool_result","call_id":1,"ok":true,"result":3}`;
    /// the pool adds the request's id.
    ///
    /// # Errors
    /// [`PoolError::InvalidArgs`] for a body that is not a JSON object, [`PoolError::CheckoutFailed`]
    /// when the lease has no request in flight on a v2 worker.
    pub fn control(&self, lease: LeaseId, body: Vec<u8>) -> Result<(), PoolError> {
        match self.shared.step(Event::Control { lease, body }) {
            Outcome::Called(r) => r,
            other => unreachable!("control answered {other:?}"),
        }
    }

    /// Reads what `worker` wrote (the poller said its stdout is readable) and handles each
    /// frame. `on_scheduler`: called from a NIF on a normal scheduler, which takes a bounded
    /// amount and hands large frames to a Tokio task.
    pub fn drain(&self, worker: WorkerId, on_scheduler: bool) {
        let how = if on_scheduler {
            Drain::Scheduler
        } else {
            Drain::Tokio
        };
        self.shared.drain(worker, how)
    }

    /// Ends a lease: checkin, a dropped checkout, or a holder that died. Idempotent.
    pub fn release(&self, lease: LeaseId) {
        self.shared.step(Event::Release { lease });
    }

    /// Ends every lease of `owner` (its process died): queued ones leave the queue, held
    /// workers return, a request in flight is cancelled (protocol 2) or its one-at-a-time
    /// worker recycled.
    pub fn release_owner(&self, owner: Owner) {
        self.shared.step(Event::ReleaseOwner { owner });
    }

    /// Forgets a session and frees its programs in every worker that holds them.
    pub fn end_session(&self, session: &str) {
        self.shared.step(Event::EndSession {
            session: session.to_owned(),
        });
    }

    pub fn status(&self) -> PoolStatus {
        self.shared.lock().core.status()
    }

    /// Stops the pool: queued callers fail, idle workers get `shutdown`, then SIGTERM, then
    /// SIGKILL after `shutdown_grace` each. [`EventSink::stopped`] fires when all have exited.
    pub fn stop(&self) {
        self.shared.stop()
    }

    /// Whether `lease` currently holds a worker.
    #[cfg(test)]
    pub fn holds_worker(&self, lease: LeaseId) -> bool {
        self.shared.lock().core.holds_worker(lease)
    }

    /// Checks the core's internal consistency (tests).
    #[cfg(test)]
    pub fn audit(&self) -> Result<(), String> {
        self.shared.lock().core.audit()
    }

    /// The deadline the timer task sleeps until (tests).
    #[cfg(test)]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.shared.lock().core.next_deadline()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

/// Sleeps until the core's next deadline, then delivers [`Event::Tick`].
async fn timer_loop(pool: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = pool.upgrade() else { return };
            let mut inner = shared.lock();
            if inner.core.finished() {
                return;
            }
            let next = inner.core.next_deadline();
            inner.timer_at = next;
            next
        };
        match next {
            Some(at) => {
                let at = tokio::time::Instant::from_std(at);
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = wake.notified() => continue,
                }
            }
            None => {
                wake.notified().await;
                continue;
            }
        }
        let Some(shared) = pool.upgrade() else { return };
        shared.step(Event::Tick);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug; the state is still the best we have.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One transition: lock, step, resolve, unlock, perform.
    fn step(&self, event: Event<Reply>) -> Outcome {
        self.step_with(|_| {}, event)
    }

    /// Like [`Shared::step`], with `before` run under the same lock first.
    fn step_with(&self, before: impl FnOnce(&mut Inner), event: Event<Reply>) -> Outcome {
        let mut fx = Vec::new();
        let (outcome, actions) = {
            let mut inner = self.lock();
            before(&mut inner);
            let outcome = inner.core.step(event, Instant::now(), &mut fx);
            (outcome, self.resolve(&mut inner, fx))
        };
        self.perform(actions);
        outcome
    }

    /// Turns effects into actions (connections looked up) and wakes the timer task when an
    /// earlier deadline was armed. Runs under the lock.
    fn resolve(&self, inner: &mut Inner, fx: Vec<Effect<Reply>>) -> Vec<Action> {
        let next = inner.core.next_deadline();
        if next.is_some_and(|n| inner.timer_at.is_none_or(|t| n < t)) {
            inner.timer_at = next;
            self.wake.notify_one();
        }
        let mut out = Vec::with_capacity(fx.len());
        let mut touched: Vec<WorkerId> = Vec::new();
        if !inner.readers.is_empty() {
            for effect in &fx {
                if let Effect::Write { worker, .. } | Effect::Signal { worker, .. } = effect {
                    touched.push(*worker);
                }
            }
        }
        for effect in fx {
            out.push(match effect {
                Effect::Write { worker, bytes } => match inner.conns.get(&worker) {
                    Some(c) => Action::Write(worker, c.clone(), bytes),
                    None => continue,
                },
                Effect::Signal { worker, signal } => match inner.conns.get(&worker) {
                    Some(c) => Action::Signal(c.clone(), signal_number(signal)),
                    None => continue,
                },
                Effect::Spawn { worker } => Action::Spawn(worker),
                Effect::Deliver { to, delivery } => Action::Deliver(to, delivery),
                Effect::Discard(to) => Action::Discard(to),
                Effect::Event { lease, body } => {
                    match inner.core.reply_of(lease).and_then(|r| r.event(body)) {
                        Some(send) => Action::Event(send),
                        None => continue,
                    }
                }
                Effect::Log {
                    worker,
                    level,
                    line,
                } => Action::Log(worker, level.as_str(), line),
                Effect::WorkerStarted {
                    worker,
                    pid,
                    start_ms,
                } => Action::Started(worker, pid, start_ms),
                Effect::WorkerExited { worker, reason } => Action::Exited(worker, reason),
                Effect::Stopped => Action::Stopped,
            });
        }
        if !inner.readers.is_empty() {
            retarget_readers(inner, &touched);
        }
        out
    }

    /// Performs actions in order, after the lock is released. A write that finds a worker's
    /// stdin closed is one more transition, whose actions are performed in turn (a loop, not
    /// recursion).
    fn perform(&self, actions: Vec<Action>) {
        let mut batches = vec![actions];
        while let Some(batch) = batches.pop() {
            for action in batch {
                match action {
                    Action::Write(wid, conn, bytes) => {
                        if !conn.write(bytes) {
                            let mut fx = Vec::new();
                            let mut inner = self.lock();
                            inner.core.step(
                                Event::WriteFailed { worker: wid },
                                Instant::now(),
                                &mut fx,
                            );
                            batches.push(self.resolve(&mut inner, fx));
                        }
                    }
                    Action::Signal(conn, sig) => conn.signal(sig),
                    Action::Spawn(wid) => {
                        crate::runtime::spawn(run_worker(self.me.clone(), wid));
                    }
                    Action::Deliver(sink, delivery) => sink.deliver(delivery),
                    Action::Discard(sink) => sink.discard(),
                    Action::Event(send) => send(),
                    Action::Log(wid, level, line) => self.events.log(wid, level, line),
                    Action::Started(wid, pid, ms) => self.events.worker_started(wid, pid, ms),
                    Action::Exited(wid, reason) => self.events.worker_exited(wid, reason),
                    Action::Stopped => {
                        self.spawner.shutdown();
                        self.events.stopped();
                        // The timer task sees the pool finished and ends.
                        self.wake.notify_one();
                        // Break the cycle only after this frame is done with `self`.
                        let keep = self
                            .keep_alive
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .take();
                        if let Some(keep) = keep {
                            crate::runtime::spawn(async move { drop(keep) });
                        }
                    }
                }
            }
        }
    }

    /// See [`Pool::drain`].
    fn drain(&self, wid: WorkerId, how: Drain) {
        let reader = {
            let mut inner = self.lock();
            match inner.readers.get_mut(&wid) {
                Some(slot) => {
                    // The notification that brought us here was consumed.
                    slot.armed = Armed::Nobody;
                    slot.reader.clone()
                }
                None => return,
            }
        };
        self.drain_reader(wid, &reader, how)
    }

    fn drain_reader(&self, wid: WorkerId, reader: &Arc<Reader>, how: Drain) {
        let mut state = reader.lock();
        if state.done {
            return;
        }
        state.notified();
        let fd = reader.watch.fd();
        let mut read = 0usize;
        let (started, mut frames) = (Instant::now(), 0usize);
        loop {
            let next = if how == Drain::Scheduler && over_budget(started, frames) {
                // A normal scheduler's share is spent (many small frames: chunk events): a
                // Tokio task reads on (nothing was taken from the buffer for this turn).
                Next::Large
            } else {
                let limit = (how == Drain::Scheduler).then_some(&mut read);
                state.next(fd, limit)
            };
            match next {
                Next::Frame(body) => {
                    // Decoded before locking, as in the Tokio reader.
                    let frame = protocol::decode_response(&body.freeze());
                    self.step(Event::Frame { worker: wid, frame });
                    frames += 1;
                }
                Next::Large => {
                    // Too large for a normal scheduler: a Tokio task reads on (and re-arms).
                    drop(state);
                    if let Some(me) = self.me.upgrade() {
                        crate::runtime::spawn(async move { me.drain(wid, Drain::Tokio) });
                    }
                    return;
                }
                Next::Pause | Next::Empty => break,
                Next::Eof => {
                    state.done = true;
                    reader.eof.notify_one();
                    return;
                }
                Next::Broken(e) => {
                    state.done = true;
                    let error = stream_error(e, self.max_frame_size);
                    let conn = self.lock().conns.get(&wid).cloned();
                    self.step(Event::StreamError { worker: wid, error });
                    if let Some(conn) = conn {
                        conn.signal(libc::SIGKILL);
                    }
                    reader.eof.notify_one();
                    return;
                }
            }
        }
        if how == Drain::Final {
            // Under the same lock: no read can start between this one and the close.
            state.done = true;
        } else {
            // Still under the reader's lock: the next notification finds everything read.
            retarget(&mut self.lock(), wid);
        }
    }

    fn stop(&self) {
        if let Some(me) = self.me.upgrade() {
            let mut keep = self.keep_alive.lock().unwrap_or_else(|e| e.into_inner());
            let finished = self.lock().core.finished();
            if keep.is_none() && !finished {
                *keep = Some(me);
            }
        }
        self.step(Event::Stop);
    }
}

/// Re-arms the polled stdout of each worker in `touched`, and of each armed for a caller,
/// whose reader should change (see [`crate::reader`]). Runs under the lock, before any
/// delivery of the step is performed: a caller that is no longer the reader is disarmed
/// before its reply is sent, so every notification meant for it reaches it first. (A caller
/// re-armed while a notification was on its way may get two; the second is in its mailbox by
/// the time its call is over, and `NativePool` drops it then.)
fn retarget_readers(inner: &mut Inner, touched: &[WorkerId]) {
    let Inner {
        core,
        readers,
        conns,
        ..
    } = inner;
    for (wid, slot) in readers.iter_mut() {
        if matches!(slot.armed, Armed::Caller(..)) || touched.contains(wid) {
            retarget_slot(core, conns, *wid, slot);
        }
    }
}

/// Arms `wid`'s stdout for who should read it next, unless it already is.
fn retarget(inner: &mut Inner, wid: WorkerId) {
    let Inner {
        core,
        readers,
        conns,
        ..
    } = inner;
    if let Some(slot) = readers.get_mut(&wid) {
        retarget_slot(core, conns, wid, slot);
    }
}

fn retarget_slot(
    core: &Core<Reply>,
    conns: &HashMap<WorkerId, Arc<Conn>>,
    wid: WorkerId,
    slot: &mut Slot,
) {
    // While callers wait in the queue, the reader reads: it hands the worker its next request
    // at once, where a caller would first wait its turn on a busy scheduler, the worker idle.
    let want = match core.sole_caller(wid) {
        Some((lease, rid))
            if !core.has_waiters() && core.reply_of(lease).is_some_and(|r| r.reads_itself()) =>
        {
            Armed::Caller(lease, rid)
        }
        _ => Armed::Reader,
    };
    if want == slot.armed {
        return;
    }
    let watch = &*slot.reader.watch;
    slot.armed = match want {
        Armed::Caller(lease, _) if core.reply_of(lease).is_some_and(|r| r.arm(watch, wid)) => want,
        _ if watch.arm_reader() => Armed::Reader,
        _ => Armed::Nobody,
    };
    if slot.armed == Armed::Nobody {
        // The poller refused the descriptor: nobody would ever read this worker again.
        // Killed, it is reported and replaced like any worker that died.
        if let Some(conn) = conns.get(&wid) {
            conn.signal(libc::SIGKILL);
        }
    }
}

/// Whether a read on a normal scheduler has had its share: at most
/// [`crate::reader::SCHEDULER_FRAMES`] frames or [`crate::reader::SCHEDULER_TIME`], well
/// under the 1 ms a NIF may run there.
fn over_budget(started: Instant, frames: usize) -> bool {
    frames >= crate::reader::SCHEDULER_FRAMES || started.elapsed() >= crate::reader::SCHEDULER_TIME
}

/// Where [`Shared::drain`] runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// A NIF on a normal scheduler: bounded, large frames go to a Tokio task.
    Scheduler,
    Tokio,
    /// The worker exited (its poll cancelled): read what is left, arm nothing.
    Final,
}

fn signal_number(signal: dspex_pool_core::Signal) -> i32 {
    match signal {
        dspex_pool_core::Signal::Term => libc::SIGTERM,
        dspex_pool_core::Signal::Kill => libc::SIGKILL,
    }
}

/// Runs one worker: spawn, read frames (or let the poller's readers do it) until it exits,
/// report the exit.
async fn run_worker(pool: Weak<Shared>, wid: WorkerId) {
    let Some(shared) = pool.upgrade() else { return };
    let spawned = match shared.spawner.spawn(wid) {
        Ok(s) => s,
        Err(e) => {
            shared.step(Event::SpawnFailed {
                worker: wid,
                reason: e.to_string(),
            });
            return;
        }
    };
    let stdout = match (spawned.stdout, &shared.poller) {
        (Stdout::Fd(fd), Some(poller)) => set_nonblocking(fd).map(|fd| {
            let reader = Reader::new(poller.watch(wid, fd), shared.max_frame_size);
            Polled::Beam(Arc::new(reader))
        }),
        (stdout, _) => stdout.into_stream().map(Polled::Tokio),
    };
    let stdout = match stdout {
        Ok(s) => s,
        Err(e) => {
            (spawned.signal)(libc::SIGKILL);
            shared.step(Event::SpawnFailed {
                worker: wid,
                reason: format!("could not read the worker's stdout: {e}"),
            });
            return;
        }
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
    let registered = conn.clone();
    let slot = match &stdout {
        Polled::Beam(reader) => Some(reader.clone()),
        Polled::Tokio(_) => None,
    };
    shared.step_with(
        move |inner| {
            inner.conns.insert(wid, registered);
            if let Some(reader) = slot {
                let armed = Armed::Nobody;
                inner.readers.insert(wid, Slot { reader, armed });
            }
        },
        Event::Spawned {
            worker: wid,
            pid: spawned.pid,
        },
    );
    let max_frame = shared.max_frame_size;
    drop(shared);
    let mut exit_fut = spawned.exit;
    let exit = match stdout {
        Polled::Tokio(stdout) => {
            read_frames(&pool, wid, &conn, stdout, &mut exit_fut, max_frame).await
        }
        Polled::Beam(reader) => {
            let exit = tokio::select! {
                exit = &mut exit_fut => exit,
                _ = reader.eof.notified() => exit_after_eof(&conn, &mut exit_fut).await,
            };
            // Out of the pool's books first (nothing re-arms it), then disarmed, so no
            // notification about this pipe follows the replies and errors below; then what
            // the worker wrote before exiting is read, and the descriptor closed.
            if let Some(p) = pool.upgrade() {
                p.lock().readers.remove(&wid);
            }
            reader.watch.cancel();
            if let Some(p) = pool.upgrade() {
                p.drain_reader(wid, &reader, Drain::Final);
            }
            reader.lock().done = true; // (if the pool is gone and nothing was drained)
            reader.watch.stop();
            exit
        }
    };
    if let Some(task) = stderr_task {
        let _ = tokio::time::timeout(Duration::from_millis(500), task).await;
    }
    if let Some(p) = pool.upgrade() {
        let stderr = conn.stderr_summary();
        let mut fx = Vec::new();
        let actions = {
            let mut inner = p.lock();
            inner.conns.remove(&wid);
            inner.readers.remove(&wid);
            let event = Event::Exited {
                worker: wid,
                exit,
                stderr,
            };
            inner.core.step(event, Instant::now(), &mut fx);
            p.resolve(&mut inner, fx)
        };
        p.perform(actions);
    }
}

/// The worker's stdout closed: the process is exiting, or it closed fd 1 and can no longer
/// answer. Either way it is done: its exit, killed if it has not come within 500 ms.
async fn exit_after_eof(conn: &Conn, exit: &mut ExitFuture) -> crate::error::ExitInfo {
    match tokio::time::timeout(Duration::from_millis(500), &mut *exit).await {
        Ok(exit) => exit,
        Err(_) => {
            conn.signal(libc::SIGKILL);
            exit.await
        }
    }
}

/// How a worker's stdout is read.
enum Polled {
    /// By a Tokio task ([`read_frames`]).
    Tokio(worker::BoxRead),
    /// By whoever the BEAM's poller wakes ([`crate::reader`]).
    Beam(Arc<Reader>),
}

fn set_nonblocking(fd: std::os::fd::OwnedFd) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain fcntl calls on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// Reads a worker's frames on a Tokio task until it exits; returns how it exited.
async fn read_frames(
    pool: &Weak<Shared>,
    wid: WorkerId,
    conn: &Arc<Conn>,
    stdout: worker::BoxRead,
    exit_fut: &mut ExitFuture,
    max_frame: usize,
) -> crate::error::ExitInfo {
    let mut frames = FramedRead::new(stdout, protocol::codec(max_frame));
    let on_frame = |body: bytes::BytesMut| match pool.upgrade() {
        Some(p) => {
            // Decoded before locking: a large reply must not hold up callers (BEAM schedulers
            // among them) that wait for the lock.
            let frame = protocol::decode_response(&body.freeze());
            p.step(Event::Frame { worker: wid, frame });
        }
        None => conn.signal(libc::SIGKILL),
    };
    loop {
        tokio::select! {
            biased;
            frame = frames.next() => match frame {
                Some(Ok(body)) => on_frame(body),
                Some(Err(e)) => {
                    if let Some(p) = pool.upgrade() {
                        let error = stream_error(e, max_frame);
                        p.step(Event::StreamError { worker: wid, error });
                    }
                    conn.signal(libc::SIGKILL);
                    break exit_fut.await;
                }
                None => break exit_after_eof(conn, exit_fut).await,
            },
            exit = &mut *exit_fut => {
                // Replies written just before exiting are still in the pipe.
                while let Ok(Some(Ok(body))) =
                    tokio::time::timeout(Duration::from_millis(50), frames.next()).await
                {
                    on_frame(body);
                }
                break exit;
            }
        }
    }
}

fn stream_error(err: std::io::Error, max_frame: usize) -> PoolError {
    PoolError::Decode(if err.kind() == std::io::ErrorKind::InvalidData {
        format!(
            "the worker wrote a frame header announcing more than max_frame_size ({max_frame} bytes): \
             an oversized reply, or bytes that are not a frame (a stray write to stdout)"
        )
    } else {
        format!("unreadable output from worker: {err}")
    })
}
