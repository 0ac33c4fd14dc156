//! Claiming workers: acquire, call, release, and handing free workers to waiters.
//!
//! A lease is served at once by an idle worker (its session's home first, then the most
//! recently used one, which keeps hot workers hot and lets overflow ones retire) or, for an
//! execute, by a shared worker with room (its session's home while it has room, else the
//! least loaded), or waits in the [`crate::queue::WaitQueue`]. A v2 worker's request that
//! times out or whose holder leaves is cancelled (a control frame), not a reason to recycle. A worker that becomes free runs its chores first, then
//! serves a waiter, then idles. The pool grows (permanent workers first, overflow once every
//! permanent one is up and busy) while waiters outnumber the workers that could serve them.

use std::time::{Duration, Instant};

use crate::effects::{Delivery, Effect};
use crate::error::PoolError;
use crate::frame;
use crate::session;
use crate::state::{
    Acquired, Core, Effects, Lease, LeaseState, Mode, Pending, PendingKind, Request, Status,
};
use crate::timers::Timer;
use crate::{LeaseId, Owner, WorkerId};

/// `now + d`, saturating at a far future for absurd timeouts.
pub(crate) fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Start-ups that must fail in a row before callers are refused at once (see `cannot_serve`).
pub(crate) const FAIL_FAST_AFTER: u32 = 2;

impl<R> Core<R> {
    /// Claims a worker for `mode`. With `once`, the request is sent as soon as a worker is
    /// claimed and the lease ends with its reply (the execute fast path).
    ///
    /// # Errors
    /// [`PoolError::CheckoutFailed`] when the pool is stopping or nothing can serve (no worker
    /// up or starting while a start backoff is in force), [`PoolError::SessionLost`] for a
    /// strict session whose worker is gone. The reply handle is then discarded: the error is
    /// the answer.
    #[allow(clippy::too_many_arguments)]
    pub fn acquire(
        &mut self,
        lease: LeaseId,
        mode: Mode,
        once: Option<Request>,
        reply: R,
        pool_timeout: Duration,
        owner: Owner,
        now: Instant,
        fx: &mut Effects<R>,
    ) -> Result<Acquired, PoolError> {
        let once = match once
            .map(|r| r.prepared(self.config.max_frame_size))
            .transpose()
        {
            Ok(once) => once,
            Err(e) => {
                fx.push(Effect::Discard(reply));
                return Err(e);
            }
        };
        if self.closed {
            fx.push(Effect::Discard(reply));
            return Err(PoolError::CheckoutFailed("the pool is stopping".into()));
        }
        if let Some(err) = self.cannot_serve(now) {
            fx.push(Effect::Discard(reply));
            return Err(err);
        }
        let execute = once.is_some();
        let mut target = None;
        // The one worker this lease waits for, and until when (`None`: for good).
        let mut home_wait: Option<(WorkerId, Option<Instant>)> = None;
        if let Mode::Session { id, strict } = &mode {
            self.session_record(id);
            let record = &self.sessions[id];
            // A strict request goes where the session's strict requests ran, for good; until
            // there is such a worker it prefers the session's home, as any request does.
            let for_good = *strict && record.strict_home.is_some();
            let home = if for_good {
                record.strict_home
            } else {
                record.home
            };
            let home_usable = home
                .and_then(|h| self.workers.get(&h))
                .is_some_and(|w| w.usable());
            match (home, home_usable, for_good) {
                (Some(_), false, true) => {
                    let record = self.sessions.get_mut(id).expect("just made");
                    record.home = None;
                    record.strict_home = None;
                    // Its Python state died with the worker: start afresh, everywhere.
                    record.forget();
                    fx.push(Effect::Discard(reply));
                    return Err(PoolError::SessionLost(id.to_string()));
                }
                (Some(h), true, for_good) => {
                    let w = &self.workers[&h];
                    // An execute shares its home while it has room; a checkout needs it idle.
                    if w.status == Status::Idle || (execute && self.can_share(w)) {
                        target = Some(h);
                    } else {
                        let until = (!for_good).then(|| now + self.config.affinity_wait);
                        home_wait = Some((h, until));
                    }
                }
                _ => {}
            }
        }
        if target.is_none() && home_wait.is_some_and(|(_, u)| u.is_some_and(|u| u <= now)) {
            home_wait = None;
        }
        if target.is_none() && home_wait.is_none() {
            target = if execute {
                self.pick_least_loaded()
            } else {
                self.pick_idle()
            };
        }
        let deadline = later(now, pool_timeout);
        let affinity_until = home_wait.and_then(|(_, u)| u);
        self.leases.insert(
            lease,
            Lease {
                mode,
                checkout: once.is_none(),
                owner,
                state: LeaseState::Queued {
                    deadline,
                    affinity_until,
                },
                once,
                pool_timeout,
                reply: Some(reply),
                request: None,
            },
        );
        self.owners.entry(owner).or_default().insert(lease);
        match target {
            Some(wid) => {
                self.assign(lease, wid, false, now, fx);
                Ok(Acquired::Now(lease))
            }
            None => {
                self.queue.push_back(lease, home_wait.map(|(h, _)| h));
                if !execute {
                    self.checkouts_waiting.insert(lease);
                }
                if let Mode::Session { id, strict: true } = &self.leases[&lease].mode {
                    let id = id.clone();
                    self.strict_waiting.entry(id).or_default().insert(lease);
                }
                self.timers.arm(deadline, Timer::Queue(lease));
                if let Some(u) = affinity_until {
                    self.timers.arm(u, Timer::Affinity(lease));
                }
                self.grow(now, fx);
                Ok(Acquired::Queued(lease))
            }
        }
    }

    /// When nothing can serve (no worker up or starting, and a start backoff in force after
    /// start-ups failed [`FAIL_FAST_AFTER`] times in a row), callers learn why at once instead
    /// of at their timeout. One failed start is not enough: a worker killed from outside while
    /// it started says nothing about the next attempt, so callers wait for it.
    pub(crate) fn cannot_serve(&self, now: Instant) -> Option<PoolError> {
        let backoff = self.backoff_until.is_some_and(|u| u > now);
        if !backoff
            || self.start_failures_in_a_row < FAIL_FAST_AFTER
            || self.workers.values().any(|w| w.usable() || w.starting())
        {
            return None;
        }
        let why = self
            .last_start_error
            .as_deref()
            .unwrap_or("start-up failed");
        Some(PoolError::CheckoutFailed(format!(
            "no worker could be started: {why}"
        )))
    }

    /// The most recently used idle worker.
    pub(crate) fn pick_idle(&self) -> Option<WorkerId> {
        self.idle.last().map(|(_, w)| *w)
    }

    /// For an execute: an idle worker (the most recently used), else the shared worker with
    /// the fewest requests in flight that has room. O(workers) when none is idle.
    pub(crate) fn pick_least_loaded(&self) -> Option<WorkerId> {
        self.pick_idle().or_else(|| {
            self.workers
                .iter()
                .filter(|(_, w)| w.status == Status::Shared && self.can_share(w))
                .min_by_key(|(id, w)| (w.callers_in_flight(), **id))
                .map(|(id, _)| *id)
        })
    }

    /// Gives `wid` to `lease`: a checkout is told (if it waited), an execute's request is sent.
    pub(crate) fn assign(
        &mut self,
        lease: LeaseId,
        wid: WorkerId,
        was_queued: bool,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        self.queue.remove(lease);
        let mode = self.leases[&lease].mode.clone();
        self.unlist_strict(lease, &mode);
        let entry = self.leases.get_mut(&lease).expect("lease exists");
        if let LeaseState::Queued {
            deadline,
            affinity_until,
        } = entry.state
        {
            self.timers.disarm(deadline, Timer::Queue(lease));
            if let Some(u) = affinity_until {
                self.timers.disarm(u, Timer::Affinity(lease));
            }
        }
        entry.state = LeaseState::Holding { worker: wid };
        let mode = entry.mode.clone();
        let once = entry.once.take();
        let reply = entry
            .reply
            .take()
            .expect("a lease being served has a reply handle");
        // An execute on a worker that runs several requests at once shares it.
        let shared = once.is_some() && self.workers[&wid].capacity > 1;
        self.set_status(
            wid,
            if shared {
                Status::Shared
            } else {
                Status::Leased(lease)
            },
        );
        self.set_alarm(wid, None);
        if let Mode::Session { id, strict } = &mode {
            if let Some(r) = self.sessions.get_mut(id) {
                r.home = Some(wid);
                if *strict && r.strict_home != Some(wid) {
                    // A strict session moves only after it was lost: its old home keeps nothing.
                    if let Some(old) = r.strict_home.replace(wid) {
                        if let Some(w) = self.workers.get_mut(&old) {
                            w.strict.remove(id);
                        }
                    }
                    self.follow_strict_home(id, wid);
                }
            }
            if *strict {
                let w = self.workers.get_mut(&wid).expect("worker exists");
                w.strict.insert(id.clone());
            }
        }
        match once {
            Some(req) => self.send(lease, wid, req, reply, now, fx),
            None if was_queued => fx.push(Effect::Deliver {
                to: reply,
                delivery: Delivery::Assigned,
            }),
            // Served at once: the call's return value says so, no message is due.
            None => fx.push(Effect::Discard(reply)),
        }
    }

    /// Sends a request on a held checkout.
    ///
    /// # Errors
    /// [`PoolError::CheckoutFailed`] when the lease holds no worker (checked in, recycled after
    /// a timeout) or a request is still in flight on it.
    pub fn call(
        &mut self,
        lease: LeaseId,
        request: Request,
        reply: R,
        now: Instant,
        fx: &mut Effects<R>,
    ) -> Result<(), PoolError> {
        let request = match request.prepared(self.config.max_frame_size) {
            Ok(r) => r,
            Err(e) => {
                fx.push(Effect::Discard(reply));
                return Err(e);
            }
        };
        let refuse = |fx: &mut Effects<R>, reply: R, why: &str| {
            fx.push(Effect::Discard(reply));
            Err(PoolError::CheckoutFailed(why.into()))
        };
        if self.closed {
            return refuse(fx, reply, "the pool is stopping");
        }
        let Some(entry) = self.leases.get(&lease) else {
            return refuse(
                fx,
                reply,
                "this checkout holds no worker (checked in, or its worker was recycled)",
            );
        };
        let LeaseState::Holding { worker: wid } = entry.state else {
            return refuse(
                fx,
                reply,
                "this checkout holds no worker (checked in, or its worker was recycled)",
            );
        };
        if self.workers.get(&wid).map(|w| w.status) != Some(Status::Leased(lease)) {
            return refuse(fx, reply, "this checkout's worker was recycled (a request timed out or failed); check in and check out again");
        }
        if entry.request.is_some() {
            return refuse(fx, reply, "a request is already in flight on this checkout");
        }
        self.send(lease, wid, request, reply, now, fx);
        Ok(())
    }

    /// Writes a caller's request, preceded by a `restore_session` when the worker's copy of
    /// the session is behind the record.
    pub(crate) fn send(
        &mut self,
        lease: LeaseId,
        wid: WorkerId,
        mut req: Request,
        reply: R,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        let mode = self.leases[&lease].mode.clone();
        let (session, restore) = match &mode {
            Mode::Session { id, strict } => self.prepare_session(wid, id, *strict),
            Mode::Anonymous => (None, None),
        };
        let rid = self.next_request_id();
        // Built where the request was submitted (see `Request::frame`): only its id is set
        // here, whatever thread this is, with no copy of the arguments.
        let built = match req.frame.take() {
            Some(f) => Ok(f),
            None => {
                frame::encode_request_template(&req.command, &req.args, self.config.max_frame_size)
            }
        };
        let bytes = match built {
            Ok(mut f) => {
                frame::set_request_id(&mut f, rid);
                f
            }
            Err(e) => {
                fx.push(Effect::Deliver {
                    to: reply,
                    delivery: Delivery::Reply(Err(e)),
                });
                self.finish_lease_request(lease, wid, now, fx);
                return;
            }
        };
        let recorded = session.is_some() && session::is_recorded(&req.command)
            || session::is_global_config_of(&req.command, req.members.as_ref());
        let deadline = later(now, req.timeout);
        let w = self.workers.get_mut(&wid).expect("a leased worker exists");
        if let Some((restore_id, pending, restore_frame)) = restore {
            w.inflight.insert(restore_id, pending);
            self.counters.restores += 1;
            fx.push(Effect::Write {
                worker: wid,
                bytes: restore_frame,
            });
        }
        w.inflight.insert(
            rid,
            Pending {
                kind: PendingKind::Caller {
                    lease,
                    command: req.command,
                    args: req.args,
                    members: req.members,
                    timeout: req.timeout,
                    recorded,
                    session,
                },
                deadline: Some(deadline),
            },
        );
        self.timers.arm(deadline, Timer::Request(wid, rid));
        if w.v2 && w.heartbeat.is_none() {
            // A busy spell begins: silence is measured from now.
            w.last_heard = now;
            let at = later(now, self.heartbeat_interval());
            self.set_heartbeat(wid, Some(at));
        }
        let entry = self.leases.get_mut(&lease).expect("lease exists");
        entry.reply = Some(reply);
        entry.request = Some((wid, rid));
        self.counters.requests += 1;
        fx.push(Effect::Write { worker: wid, bytes });
    }

    /// After a request of `lease` on `wid` completed: an execute lease ends, a checkout keeps
    /// its worker.
    pub(crate) fn finish_lease_request(
        &mut self,
        lease: LeaseId,
        wid: WorkerId,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        let Some(entry) = self.leases.get_mut(&lease) else {
            return;
        };
        entry.request = None;
        if !entry.checkout {
            self.remove_lease(lease);
            self.request_done(wid, now, fx);
        }
    }

    /// An execute request of `wid` ended: a worker leased to it is free, a shared one takes
    /// more work (or is free once its last request ended).
    pub(crate) fn request_done(&mut self, wid: WorkerId, now: Instant, fx: &mut Effects<R>) {
        let Some(w) = self.workers.get(&wid) else {
            return;
        };
        match w.status {
            Status::Shared if w.callers_in_flight() > 0 => self.fill(wid, now, fx),
            _ => self.worker_free(wid, now, fx),
        }
    }

    /// Whether a worker takes one more execute now: it has room, and no checkout waits (a
    /// waiting checkout lets shared workers drain, so that one becomes free for it).
    pub(crate) fn can_share(&self, w: &crate::state::Worker) -> bool {
        w.has_room() && (w.status == Status::Idle || self.checkouts_waiting.is_empty())
    }

    /// Gives a shared worker queued execute requests while it has room.
    pub(crate) fn fill(&mut self, wid: WorkerId, now: Instant, fx: &mut Effects<R>) {
        while self.workers.get(&wid).is_some_and(|w| self.can_share(w)) {
            let leases = &self.leases;
            let Some(lease) = self
                .queue
                .pop_for_where(wid, |l| leases.get(&l).is_some_and(|e| !e.checkout))
            else {
                return;
            };
            self.assign(lease, wid, true, now, fx);
        }
    }

    /// Cancels request `rid` on a v2 worker: it leaves the books, a cancel frame is written,
    /// and anything the worker still sends for it is dropped.
    pub(crate) fn cancel(&mut self, wid: WorkerId, rid: crate::RequestId, fx: &mut Effects<R>) {
        if self.take_pending(wid, rid).is_some() {
            self.counters.cancelled += 1;
            fx.push(Effect::Write {
                worker: wid,
                bytes: frame::encode_cancel(rid),
            });
        }
    }

    /// A control frame for the request `lease` has in flight (protocol v2 only).
    ///
    /// # Errors
    /// [`PoolError::InvalidArgs`] when `body` is not a JSON object (or too large),
    /// [`PoolError::CheckoutFailed`] when `lease` has no request in flight on a v2 worker.
    pub fn control(
        &mut self,
        lease: LeaseId,
        body: &[u8],
        fx: &mut Effects<R>,
    ) -> Result<(), PoolError> {
        let none = || PoolError::CheckoutFailed("this lease has no request in flight".into());
        let (wid, rid) = self
            .leases
            .get(&lease)
            .and_then(|e| e.request)
            .ok_or_else(none)?;
        let w = self.workers.get(&wid).ok_or_else(none)?;
        if !w.inflight.contains_key(&rid) {
            return Err(none());
        }
        if !w.v2 {
            return Err(PoolError::CheckoutFailed(
                "the worker does not speak protocol 2: it takes no control frames".into(),
            ));
        }
        let bytes = frame::encode_control(rid, body, self.config.max_frame_size)?;
        fx.push(Effect::Write { worker: wid, bytes });
        Ok(())
    }

    /// How long a busy v2 worker may be silent before it is pinged.
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        (self.config.heartbeat_timeout / 3).max(Duration::from_millis(1))
    }

    /// Ends a lease: checkin, a dropped checkout, or a holder that died. Idempotent.
    pub fn release(&mut self, lease: LeaseId, now: Instant, fx: &mut Effects<R>) {
        let Some(mut entry) = self.remove_lease(lease) else {
            return;
        };
        if let Some(reply) = entry.reply.take() {
            fx.push(Effect::Discard(reply));
        }
        if let LeaseState::Holding { worker } = entry.state {
            let Some(w) = self.workers.get(&worker) else {
                return;
            };
            let mine = w.status == Status::Leased(lease)
                || (w.status == Status::Shared && entry.request.is_some_and(|(r, _)| r == worker));
            if !mine {
                return;
            }
            if let (Some((_, rid)), true) = (entry.request, w.v2) {
                // Its holder is gone mid-request: a v2 worker is told to stop it.
                self.cancel(worker, rid, fx);
                self.request_done(worker, now, fx);
            } else if entry.request.is_some() {
                // Its holder is gone mid-request: the worker's state is unknown.
                self.kill_worker(
                    worker,
                    "its holder left with a request in flight",
                    |_| PoolError::CheckoutFailed("its holder left".into()),
                    now,
                    fx,
                );
            } else {
                self.worker_free(worker, now, fx);
            }
        }
    }

    /// Ends every lease of `owner` (its process died): O(its leases).
    pub fn release_owner(&mut self, owner: Owner, now: Instant, fx: &mut Effects<R>) {
        let Some(leases) = self.owners.get(&owner) else {
            return;
        };
        let mut leases: Vec<LeaseId> = leases.iter().copied().collect();
        leases.sort_unstable();
        for lease in leases {
            self.release(lease, now, fx);
        }
    }

    /// Hands a worker that just became free to its chores, a waiter, or the idle set.
    pub(crate) fn worker_free(&mut self, wid: WorkerId, now: Instant, fx: &mut Effects<R>) {
        let Some(w) = self.workers.get(&wid) else {
            return;
        };
        if !matches!(
            w.status,
            Status::Idle | Status::Leased(_) | Status::Shared | Status::Chores | Status::Starting
        ) {
            return;
        }
        if w.v2 && w.heartbeat.is_some() {
            // Its busy spell is over: an outstanding heartbeat ping is forgotten (its answer
            // is dropped as an unknown id).
            let pings: Vec<_> = w
                .inflight
                .iter()
                .filter(|(_, p)| matches!(p.kind, PendingKind::Heartbeat))
                .map(|(r, _)| *r)
                .collect();
            for rid in pings {
                self.take_pending(wid, rid);
            }
            self.set_heartbeat(wid, None);
        }
        let w = &self.workers[&wid];
        if !w.inflight.is_empty() && w.status != Status::Starting {
            // A v2 worker may answer a request before the internal one sent ahead of it (a
            // restore): it is free once that is answered too.
            self.set_status(wid, Status::Chores);
            self.set_alarm(wid, None);
            return;
        }
        if self.closed {
            self.set_status(wid, Status::Idle);
            self.shutdown_worker(wid, now, fx);
            return;
        }
        if !w.chores.is_empty() {
            self.run_chores(wid, now, fx);
            return;
        }
        self.set_status(wid, Status::Idle);
        if let Some(lease) = self.queue.pop_for(wid) {
            self.assign(lease, wid, true, now, fx);
            self.fill(wid, now, fx);
            return;
        }
        let w = &self.workers[&wid];
        let retire = w.overflow && w.strict.is_empty();
        self.set_alarm(wid, retire.then(|| later(now, self.config.overflow_idle)));
    }

    fn run_chores(&mut self, wid: WorkerId, now: Instant, fx: &mut Effects<R>) {
        self.send_chores(wid, now, fx);
        self.set_status(wid, Status::Chores);
        self.set_alarm(wid, None);
    }

    /// Writes a worker's pending chores (each with its own deadline); its status is the
    /// caller's business. A shared v2 worker gets them at once, next to its requests, instead
    /// of refusing work until it drains.
    pub(crate) fn send_chores(&mut self, wid: WorkerId, now: Instant, fx: &mut Effects<R>) {
        let chores: Vec<_> = self
            .workers
            .get_mut(&wid)
            .map(|w| w.chores.drain(..).collect())
            .unwrap_or_default();
        let deadline = later(now, self.config.start_timeout);
        let mut bytes = Vec::new();
        for chore in chores {
            let rid = self.next_request_id();
            bytes.extend(
                frame::encode_request(rid, chore.command, &chore.args, usize::MAX)
                    .expect("no limit"),
            );
            let w = self.workers.get_mut(&wid).expect("worker exists");
            w.inflight.insert(
                rid,
                Pending {
                    kind: PendingKind::Chore,
                    deadline: Some(deadline),
                },
            );
            self.timers.arm(deadline, Timer::Request(wid, rid));
        }
        fx.push(Effect::Write { worker: wid, bytes });
    }

    /// Hands idle workers to waiters (after waiters moved lanes or a worker was lost).
    pub(crate) fn dispatch_idle(&mut self, now: Instant, fx: &mut Effects<R>) {
        let idle: Vec<WorkerId> = self.idle.iter().rev().map(|(_, w)| *w).collect();
        for wid in idle {
            if self.queue.is_empty() {
                return;
            }
            if let Some(lease) = self.queue.pop_for(wid) {
                self.assign(lease, wid, true, now, fx);
                self.fill(wid, now, fx);
            }
        }
        self.fill_shared(now, fx);
    }

    /// Gives queued executes to shared workers with room.
    pub(crate) fn fill_shared(&mut self, now: Instant, fx: &mut Effects<R>) {
        if self.queue.is_empty() {
            return;
        }
        let mut shared: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.status == Status::Shared && w.has_room())
            .map(|(id, _)| *id)
            .collect();
        shared.sort_unstable();
        for wid in shared {
            if self.queue.is_empty() {
                return;
            }
            self.fill(wid, now, fx);
        }
    }

    /// Starts workers while waiters outnumber the workers that could serve them.
    pub(crate) fn grow(&mut self, now: Instant, fx: &mut Effects<R>) {
        if self.closed {
            return;
        }
        let (mut permanent, mut overflow, mut starting) = (0, 0, 0);
        for w in self.workers.values().filter(|w| w.live()) {
            if w.overflow {
                overflow += 1;
            } else {
                permanent += 1;
            }
            if matches!(w.status, Status::Backoff) || w.starting() {
                starting += 1;
            }
        }
        let mut wanted = self.queue.len().saturating_sub(starting + self.idle.len());
        while wanted > 0 && permanent < self.config.pool_size {
            self.add_worker(false, now, fx);
            permanent += 1;
            wanted -= 1;
        }
        // Overflow only once every permanent worker is up and busy.
        while wanted > 0
            && permanent >= self.config.pool_size
            && starting == 0
            && overflow < self.config.max_overflow
        {
            self.add_worker(true, now, fx);
            overflow += 1;
            wanted -= 1;
        }
    }

    /// Fails a caller's request; an execute lease ends with it.
    pub(crate) fn fail_request(&mut self, lease: LeaseId, err: PoolError, fx: &mut Effects<R>) {
        self.counters.errors += 1;
        let Some(entry) = self.leases.get_mut(&lease) else {
            return;
        };
        entry.request = None;
        if let Some(reply) = entry.reply.take() {
            fx.push(Effect::Deliver {
                to: reply,
                delivery: Delivery::Reply(Err(err)),
            });
        }
        if !entry.checkout {
            self.remove_lease(lease);
        }
    }
}
