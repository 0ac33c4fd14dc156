//! A worker's life: start (with backoff), handshake, frames, recycling, exit, shutdown.
//!
//! A start attempt is everything before the worker's first good ping. Any failure in it (the
//! process cannot be started, it exits, writes garbage, fails its ping or answers with another
//! id, misses its start deadline) is a *start failure*: the process is killed, the failure is
//! counted and explained (the reason plus the worker's stderr tail, once its exit is known), and
//! the next attempt waits out a backoff (100 ms doubling to 5 s). A started worker whose state
//! becomes unknown (a timeout, an undecodable frame, a reply nobody asked for) is *recycled*:
//! killed, its requests failed, replaced; never reused, so a late reply reaches nobody.

use std::time::{Duration, Instant};

use crate::effects::{Delivery, Effect, Level, Signal};
use crate::error::{ExitInfo, PoolError};
use crate::frame;
use crate::leases::later;
use crate::state::{Chore, Core, Effects, LeaseState, Mode, Pending, PendingKind, Status, Worker};
use crate::timers::Timer;
use crate::{LeaseId, RequestId, WorkerId};

fn backoff(failures_in_a_row: u32) -> Duration {
    match failures_in_a_row {
        0 => Duration::ZERO,
        n => Duration::from_millis(100u64 << (n - 1).min(6)).min(Duration::from_secs(5)),
    }
}

impl<R> Core<R> {
    /// Adds a worker: started now, or once the start backoff is over.
    pub(crate) fn add_worker(&mut self, overflow: bool, now: Instant, fx: &mut Effects<R>) {
        let wid = self.next_worker;
        self.next_worker += 1;
        let backoff = self.backoff_until.filter(|u| *u > now);
        self.workers.insert(
            wid,
            Worker {
                overflow,
                status: if backoff.is_some() {
                    Status::Backoff
                } else {
                    Status::Spawning
                },
                pid: None,
                started: false,
                capacity: 1,
                v2: false,
                last_heard: now,
                heartbeat: None,
                inflight: Default::default(),
                sessions: Default::default(),
                strict: Default::default(),
                chores: Default::default(),
                idle_seq: 0,
                spawned_at: now,
                failure: None,
                alarm: None,
                grace: None,
            },
        );
        match backoff {
            Some(until) => self.set_alarm(wid, Some(until)),
            None => self.spawn(wid, now, fx),
        }
    }

    fn spawn(&mut self, wid: WorkerId, now: Instant, fx: &mut Effects<R>) {
        self.set_status(wid, Status::Spawning);
        if let Some(w) = self.workers.get_mut(&wid) {
            w.spawned_at = now;
        }
        self.set_alarm(wid, Some(later(now, self.config.start_timeout)));
        fx.push(Effect::Spawn { worker: wid });
    }

    /// A backoff ended: the attempt starts.
    pub(crate) fn backoff_over(&mut self, wid: WorkerId, now: Instant, fx: &mut Effects<R>) {
        self.spawn(wid, now, fx);
    }

    /// The worker's process runs: send the start-up ping and the global configuration.
    pub fn spawned(&mut self, wid: WorkerId, pid: Option<u32>, now: Instant, fx: &mut Effects<R>) {
        let Some(w) = self.workers.get_mut(&wid) else {
            fx.push(Effect::Signal {
                worker: wid,
                signal: Signal::Kill,
            });
            return;
        };
        w.pid = pid;
        match w.status {
            Status::Spawning if self.closed => {
                self.set_status(wid, Status::Dead);
                self.set_alarm(wid, None);
                fx.push(Effect::Signal {
                    worker: wid,
                    signal: Signal::Kill,
                });
            }
            Status::Spawning => {
                let rid = self.next_request_id();
                let hello = frame::handshake_args(self.config.max_frame_size);
                let mut bytes =
                    frame::encode_request(rid, "ping", &hello, usize::MAX).expect("no limit");
                let mut pending = vec![(rid, PendingKind::Handshake)];
                for chore in self.init.clone() {
                    let rid = self.next_request_id();
                    bytes.extend(
                        frame::encode_request(rid, chore.command, &chore.args, usize::MAX)
                            .expect("no limit"),
                    );
                    pending.push((rid, PendingKind::Chore));
                }
                let w = self.workers.get_mut(&wid).expect("present");
                for (rid, kind) in pending {
                    // The start deadline (the worker's alarm) covers these.
                    w.inflight.insert(
                        rid,
                        Pending {
                            kind,
                            deadline: None,
                        },
                    );
                }
                self.set_status(wid, Status::Starting);
                fx.push(Effect::Write { worker: wid, bytes });
            }
            // Its start deadline passed before it ran, or the pool gave up on it: its exit
            // reports why.
            _ => fx.push(Effect::Signal {
                worker: wid,
                signal: Signal::Kill,
            }),
        }
        let _ = now;
    }

    /// Something went wrong with a worker: a start failure before its first good ping,
    /// recycling after.
    pub(crate) fn problem(
        &mut self,
        wid: WorkerId,
        why: &str,
        error: impl Fn(RequestId) -> PoolError,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        match self.workers.get(&wid) {
            Some(w) if !w.started => self.start_problem(wid, why.to_owned(), now, fx),
            Some(_) => self.kill_worker(wid, why, error, now, fx),
            None => {}
        }
    }

    /// A start attempt failed: kill it and back off now; its exit completes the failure (with
    /// the stderr tail).
    pub(crate) fn start_problem(
        &mut self,
        wid: WorkerId,
        why: String,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        let Some(w) = self.workers.get_mut(&wid) else {
            return;
        };
        if !matches!(w.status, Status::Spawning | Status::Starting) {
            return;
        }
        let had_process = w.status == Status::Starting;
        w.failure = Some(why);
        self.set_status(wid, Status::Failing);
        self.set_alarm(wid, None);
        self.take_all_pending(wid);
        let until = now + backoff(self.start_failures_in_a_row + 1);
        self.backoff_until = Some(self.backoff_until.map_or(until, |u| u.max(until)));
        if had_process {
            fx.push(Effect::Signal {
                worker: wid,
                signal: Signal::Kill,
            });
        }
    }

    /// A start attempt is over and failed: count it, explain it, fail the callers nothing can
    /// serve any more, and schedule the next attempt.
    pub fn start_failed(
        &mut self,
        wid: WorkerId,
        reason: String,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        let Some(overflow) = self.workers.get(&wid).map(|w| w.overflow) else {
            return;
        };
        self.remove_worker(wid);
        self.counters.start_failures += 1;
        self.start_failures_in_a_row += 1;
        let until = now + backoff(self.start_failures_in_a_row);
        self.backoff_until = Some(self.backoff_until.map_or(until, |u| u.max(until)));
        let line = format!("worker {wid} failed to start: {reason}");
        self.last_start_error = Some(reason);
        self.log(fx, wid, Level::Error, line);
        if let Some(err) = self.cannot_serve(now) {
            for lease in self.queue.drain() {
                self.fail_waiter(lease, err.clone(), fx);
            }
        }
        self.replace(overflow, true, now, fx);
        self.check_stopped(fx);
    }

    /// Keeps the pool at `pool_size`: a permanent worker that ends is replaced (after a
    /// backoff while start-ups fail); a lazy pool retries a failed start only on demand.
    fn replace(
        &mut self,
        overflow: bool,
        after_start_failure: bool,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        if self.closed {
            return;
        }
        let permanent = self
            .workers
            .values()
            .filter(|w| w.live() && !w.overflow)
            .count();
        let wanted = !after_start_failure || !self.config.lazy || !self.queue.is_empty();
        if !overflow && permanent < self.config.pool_size && wanted {
            self.add_worker(false, now, fx);
        } else {
            self.grow(now, fx);
        }
    }

    /// Kills a started worker whose state is unknown and fails whatever it still owed.
    pub(crate) fn kill_worker(
        &mut self,
        wid: WorkerId,
        why: &str,
        error: impl Fn(RequestId) -> PoolError,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        self.recycle(wid, why, true, error, now, fx)
    }

    fn recycle(
        &mut self,
        wid: WorkerId,
        why: &str,
        signal: bool,
        error: impl Fn(RequestId) -> PoolError,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        let Some(w) = self.workers.get(&wid) else {
            return;
        };
        if matches!(w.status, Status::Dead | Status::Failing) {
            return;
        }
        self.set_status(wid, Status::Dead);
        self.set_alarm(wid, None);
        self.set_grace(wid, None);
        self.set_heartbeat(wid, None);
        self.counters.recycled += 1;
        if signal {
            fx.push(Effect::Signal {
                worker: wid,
                signal: Signal::Kill,
            });
        }
        self.log(
            fx,
            wid,
            Level::Warning,
            format!("recycling worker {wid}: {why}"),
        );
        for (rid, p) in self.take_all_pending(wid) {
            if let PendingKind::Caller { lease, .. } = p.kind {
                self.fail_request(lease, error(rid), fx);
            }
        }
        // A checkout that loses its worker stays Holding it: `call` then reports it has none.
        self.lose_sessions(wid, now, fx);
    }

    /// The worker's stdout is no longer a frame stream.
    pub fn stream_error(
        &mut self,
        wid: WorkerId,
        error: PoolError,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        let why = error.to_string();
        self.problem(wid, &why, move |_| error.clone(), now, fx);
    }

    /// A write found the worker's stdin closed: the process is gone and read nothing of it.
    /// Execute requests go back to the head of the queue (they never ran); a checkout is bound
    /// to its worker, so its request fails as if the worker had died mid-request.
    pub fn write_failed(&mut self, wid: WorkerId, now: Instant, fx: &mut Effects<R>) {
        let why = "its stdin is closed (it exited)";
        match self.workers.get(&wid) {
            Some(w) if !w.started => return self.start_problem(wid, why.into(), now, fx),
            Some(w) if w.live() => {}
            _ => return,
        }
        let owed = self.take_all_pending(wid);
        for (rid, p) in owed.into_iter().rev() {
            let requeue = match &p.kind {
                // A strict session's state died with the worker: its request is not retried.
                // Nor is anything once the pool is stopping.
                PendingKind::Caller { lease, .. } => self.leases.get(lease).is_some_and(|l| {
                    !self.closed
                        && !l.checkout
                        && !matches!(l.mode, Mode::Session { strict: true, .. })
                }),
                _ => false,
            };
            match p.kind {
                PendingKind::Caller {
                    lease,
                    command,
                    args,
                    members,
                    timeout,
                    ..
                } if requeue => self.requeue(
                    lease,
                    // Its frame went to the dead worker: built again when it is next sent.
                    crate::Request {
                        command,
                        args,
                        timeout,
                        members,
                        frame: None,
                    },
                    now,
                ),
                kind => {
                    let w = self.workers.get_mut(&wid).expect("present");
                    w.inflight.insert(
                        rid,
                        Pending {
                            kind,
                            deadline: None,
                        },
                    );
                }
            }
        }
        self.kill_worker(
            wid,
            why,
            |_| PoolError::WorkerExited(ExitInfo::Unknown),
            now,
            fx,
        );
        self.dispatch_idle(now, fx);
        self.grow(now, fx);
    }

    fn requeue(&mut self, lease: LeaseId, request: crate::Request, now: Instant) {
        let entry = self.leases.get_mut(&lease).expect("present");
        entry.once = Some(request);
        entry.request = None;
        let deadline = later(now, entry.pool_timeout);
        entry.state = LeaseState::Queued {
            deadline,
            affinity_until: None,
        };
        self.timers.arm(deadline, Timer::Queue(lease));
        self.queue.push_front(lease, None);
    }

    /// The worker's process has exited and been reaped.
    pub fn exited(
        &mut self,
        wid: WorkerId,
        exit: ExitInfo,
        stderr: String,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        let Some(w) = self.workers.get(&wid) else {
            return;
        };
        if !w.started
            && matches!(
                w.status,
                Status::Spawning | Status::Starting | Status::Failing
            )
        {
            let why = w
                .failure
                .clone()
                .unwrap_or_else(|| format!("it exited during start-up ({exit})"));
            let tail = if stderr.is_empty() {
                String::new()
            } else {
                format!("; its stderr ends with:\n{stderr}")
            };
            return self.start_failed(wid, format!("{why}{tail}"), now, fx);
        }
        let overflow = w.overflow;
        if w.live() {
            let why = format!("it exited ({exit})");
            // Already gone: no signal, only the bookkeeping of a kill.
            self.recycle(wid, &why, false, |_| PoolError::WorkerExited(exit), now, fx);
        }
        self.lose_sessions(wid, now, fx);
        self.remove_worker(wid);
        fx.push(Effect::WorkerExited {
            worker: wid,
            reason: exit.to_string(),
        });
        self.replace(overflow, false, now, fx);
        self.check_stopped(fx);
    }

    fn remove_worker(&mut self, wid: WorkerId) {
        self.set_alarm(wid, None);
        self.set_grace(wid, None);
        self.set_heartbeat(wid, None);
        self.set_status(wid, Status::Dead);
        self.take_all_pending(wid);
        self.workers.remove(&wid);
    }

    /// Asks an idle worker to exit: `shutdown`, then SIGTERM and SIGKILL a grace period apart.
    pub(crate) fn shutdown_worker(&mut self, wid: WorkerId, now: Instant, fx: &mut Effects<R>) {
        match self.workers.get(&wid) {
            Some(w) if w.status == Status::Idle => {}
            _ => return,
        }
        self.set_status(wid, Status::Stopping);
        self.set_alarm(wid, None);
        let rid = self.next_request_id();
        let bytes = frame::encode_request(rid, "shutdown", b"{}", usize::MAX).expect("no limit");
        fx.push(Effect::Write { worker: wid, bytes });
        let grace = later(now, self.config.shutdown_grace);
        self.set_grace(wid, Some((grace, Signal::Term)));
    }

    /// Stops the pool: queued callers fail, idle workers get `shutdown`, busy ones a grace
    /// period; then SIGTERM, then SIGKILL. [`Effect::Stopped`] once all have exited.
    pub fn stop(&mut self, now: Instant, fx: &mut Effects<R>) {
        if self.closed {
            return;
        }
        self.closed = true;
        for lease in self.queue.drain() {
            let err = PoolError::CheckoutFailed("the pool is stopping".into());
            self.fail_waiter(lease, err, fx);
        }
        let mut ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        ids.sort_unstable();
        for wid in ids {
            match self.workers[&wid].status {
                Status::Idle => self.shutdown_worker(wid, now, fx),
                Status::Backoff => self.remove_worker(wid),
                Status::Dead | Status::Stopping | Status::Failing | Status::Spawning => {}
                Status::Starting | Status::Leased(_) | Status::Shared | Status::Chores => {
                    let grace = later(now, self.config.shutdown_grace);
                    self.set_grace(wid, Some((grace, Signal::Term)));
                }
            }
        }
        self.check_stopped(fx);
    }

    pub(crate) fn check_stopped(&mut self, fx: &mut Effects<R>) {
        if self.closed && self.workers.is_empty() && !self.stopped_notified {
            self.stopped_notified = true;
            fx.push(Effect::Stopped);
        }
    }

    /// Fails a queued lease and ends it.
    pub(crate) fn fail_waiter(&mut self, lease: LeaseId, err: PoolError, fx: &mut Effects<R>) {
        self.counters.errors += 1;
        if let Some(mut entry) = self.remove_lease(lease) {
            if let Some(reply) = entry.reply.take() {
                fx.push(Effect::Deliver {
                    to: reply,
                    delivery: Delivery::Reply(Err(err)),
                });
            }
        }
    }

    /// A chore for every live worker but `except` (a global `configure_lm`).
    pub(crate) fn chore_for_all(
        &mut self,
        chore: Chore,
        except: WorkerId,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        let mut others: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(id, w)| **id != except && w.live())
            .map(|(id, _)| *id)
            .collect();
        others.sort_unstable();
        for other in others {
            let w = self.workers.get_mut(&other).expect("present");
            w.chores.push_back(chore.clone());
            match w.status {
                Status::Idle => self.worker_free(other, now, fx),
                // Only this one is due (none waits for a request to end): it goes out now.
                Status::Shared if w.chores.len() == 1 => self.send_chores(other, now, fx),
                _ => {}
            }
        }
    }
}
