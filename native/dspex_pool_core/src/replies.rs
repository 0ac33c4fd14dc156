//! Frames from a worker: which request each answers, and what its reply does.
//!
//! Replies are matched to in-flight requests by id ([`FrameMatch`]). A one-at-a-time (v1)
//! worker answers in order, so anything but the oldest id is a protocol error; a v2 worker's
//! frames match any in-flight id, and a frame for an id the pool finished (a cancelled or
//! timed-out request, a forgotten heartbeat ping) is dropped. An intermediate frame
//! (`"event"`) goes to the request's caller ([`crate::Effect::Event`]) and the request stays
//! in flight. A reply to the start-up ping completes the start and, with `"protocol": 2`, sets
//! the worker's capacity; a caller's reply is recorded (session state, global LM), delivered,
//! and ends an execute lease. Every frame of a worker is a sign of life for its heartbeat.

use std::time::Instant;

use crate::effects::{Delivery, Effect, Level};
use crate::error::PoolError;
use crate::frame::Response;
use crate::leases::later;
use crate::state::{Core, Effects, PendingKind, Status};
use crate::timers::Timer;
use crate::{RequestId, WorkerId};

/// How a frame relates to the worker's in-flight requests.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameMatch {
    /// The reply to this request.
    Expected(RequestId),
    /// An id no in-flight request has (or, for a one-at-a-time worker, not the oldest). From a
    /// v2 worker this is the late frame of a request the pool finished (cancelled, timed out):
    /// dropped. From a one-at-a-time worker it is a protocol error: the worker is recycled.
    UnknownId(u64),
}

impl<R> Core<R> {
    /// Which in-flight request a frame with `id` answers.
    pub fn match_frame(&self, wid: WorkerId, id: u64) -> FrameMatch {
        let Some(w) = self.workers.get(&wid) else {
            return FrameMatch::UnknownId(id);
        };
        if w.v2 {
            // Replies come in any order, matched by id.
            return if w.inflight.contains_key(&id) {
                FrameMatch::Expected(id)
            } else {
                FrameMatch::UnknownId(id)
            };
        }
        // A one-at-a-time (v1) worker answers in order.
        match w.inflight.keys().next().copied() {
            Some(rid) if rid == id => FrameMatch::Expected(rid),
            _ => FrameMatch::UnknownId(id),
        }
    }

    /// A frame from a worker.
    pub fn frame(
        &mut self,
        wid: WorkerId,
        frame: Result<Response, PoolError>,
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        let Some(w) = self.workers.get(&wid) else {
            return;
        };
        if !matches!(
            w.status,
            Status::Starting | Status::Idle | Status::Leased(_) | Status::Shared | Status::Chores
        ) {
            return; // leftovers of a worker on its way out
        }
        let v2 = w.v2;
        if let Some(w) = self.workers.get_mut(&wid) {
            w.last_heard = now;
        }
        let response = match frame {
            Ok(r) => r,
            Err(e) => {
                let why = format!("its reply could not be decoded: {e}");
                return self.problem(wid, &why, move |_| e.clone(), now, fx);
            }
        };
        if response.event && !v2 {
            let why = "it sent an intermediate frame without protocol 2";
            return self.problem(wid, why, |_| PoolError::Malformed, now, fx);
        }
        let rid = match self.match_frame(wid, response.id) {
            FrameMatch::Expected(rid) => rid,
            FrameMatch::UnknownId(id) if v2 => {
                let line = format!("dropped a frame for finished request {id} of worker {wid}");
                self.log(fx, wid, Level::Debug, line);
                return;
            }
            FrameMatch::UnknownId(_) if self.workers[&wid].inflight.is_empty() => {
                let why = "it wrote a frame nobody asked for";
                return self.problem(wid, why, |_| PoolError::ResponseMismatch, now, fx);
            }
            FrameMatch::UnknownId(_) => {
                let why = "it answered with another request's id";
                return self.problem(wid, why, |_| PoolError::ResponseMismatch, now, fx);
            }
        };
        if response.event {
            // An intermediate frame: the request stays in flight.
            let w = &self.workers[&wid];
            if let PendingKind::Caller { lease, .. } = w.inflight[&rid].kind {
                if let Ok(body) = response.outcome {
                    fx.push(Effect::Event { lease, body });
                }
            }
            return;
        }
        let pending = self.take_pending(wid, rid).expect("matched");
        let done = self.workers[&wid].inflight.is_empty();
        match pending.kind {
            PendingKind::Heartbeat => {}
            PendingKind::Handshake => {
                let hello = match response.outcome {
                    Ok(hello) => hello,
                    Err(e) => {
                        let why = format!("its start-up ping failed: {e}");
                        return self.start_problem(wid, why, now, fx);
                    }
                };
                if let Some(n) = crate::frame::announced_concurrency(&hello) {
                    let cap = self.config.worker_concurrency.map_or(n, |c| c.min(n));
                    let w = self.workers.get_mut(&wid).expect("present");
                    w.v2 = true;
                    w.capacity = cap.max(1);
                }
                self.start_failures_in_a_row = 0;
                self.last_start_error = None;
                self.backoff_until = None;
                self.counters.worker_starts += 1;
                let w = self.workers.get_mut(&wid).expect("present");
                w.started = true;
                let start_ms = now.saturating_duration_since(w.spawned_at).as_millis() as u64;
                fx.push(Effect::WorkerStarted {
                    worker: wid,
                    pid: w.pid,
                    start_ms,
                });
                self.set_alarm(wid, None);
                if done {
                    self.worker_free(wid, now, fx);
                } else {
                    // The start deadline covered the initial configuration sent with the
                    // ping; from now on each of those requests has its own.
                    let deadline = later(now, self.config.start_timeout);
                    let w = self.workers.get_mut(&wid).expect("present");
                    for (rid, p) in w.inflight.iter_mut() {
                        p.deadline = Some(deadline);
                        self.timers.arm(deadline, Timer::Request(wid, *rid));
                    }
                    self.set_status(wid, Status::Chores);
                }
            }
            PendingKind::Chore => {
                if let Err(e) = response.outcome {
                    let line = format!("internal command failed on worker {wid}: {e}");
                    self.log(fx, wid, Level::Warning, line);
                }
                if done && self.workers[&wid].status == Status::Chores {
                    self.worker_free(wid, now, fx);
                }
            }
            PendingKind::Restore {
                session,
                generation,
            } => {
                match response.outcome {
                    Ok(_) => {
                        let w = self.workers.get_mut(&wid).expect("present");
                        w.sessions.insert(session, generation);
                    }
                    Err(e) => {
                        let line = format!("could not re-create session {session:?}: {e}");
                        self.log(fx, wid, Level::Warning, line);
                    }
                }
                if done && self.workers[&wid].status == Status::Chores {
                    self.worker_free(wid, now, fx);
                }
            }
            PendingKind::Caller {
                lease,
                command,
                args,
                members,
                recorded,
                session,
                ..
            } => {
                let outcome = response.outcome;
                if outcome.is_ok() && matches!(command.as_str(), "cleanup" | "reset_state") {
                    // Every session this worker held is gone from it; reset_state also
                    // forgot the global LM, which is configured again.
                    let init = self.init.clone();
                    let w = self.workers.get_mut(&wid).expect("present");
                    w.sessions.clear();
                    if command == "reset_state" {
                        w.chores.extend(init);
                    }
                }
                if let (Ok(result), true) = (&outcome, recorded) {
                    self.record(wid, session, &command, &args, members, result, now, fx);
                }
                if outcome.is_err() {
                    self.counters.errors += 1;
                }
                if let Some(entry) = self.leases.get_mut(&lease) {
                    if let Some(reply) = entry.reply.take() {
                        fx.push(Effect::Deliver {
                            to: reply,
                            delivery: Delivery::Reply(outcome),
                        });
                    }
                }
                self.finish_lease_request(lease, wid, now, fx);
            }
        }
    }
}
