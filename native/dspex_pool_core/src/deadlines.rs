//! What happens when a deadline passes ([`crate::Event::Tick`]).
//!
//! Each armed [`Timer`] is handled once, in deadline order, and checked against the state it
//! was armed for (a timer is disarmed whenever its reason goes away, so a stale one is a bug
//! guard, not a path). Cost: O(log n) per timer due, nothing for the others.
//!
//! A busy v2 worker's heartbeat (ping after a third of `heartbeat_timeout` of silence, recycle
//! after all of it) is re-armed lazily when it fires, not on every frame.

use std::time::Instant;

use crate::effects::{Delivery, Effect, Signal};
use crate::error::PoolError;
use crate::frame;
use crate::leases::later;
use crate::state::Pending;
use crate::state::{Core, Effects, LeaseState, PendingKind, Status};
use crate::timers::Timer;
use crate::WorkerId;

impl<R> Core<R> {
    /// Handles every deadline up to `now`.
    pub fn tick(&mut self, now: Instant, fx: &mut Effects<R>) {
        while let Some((at, timer)) = self.timers.pop_due(now) {
            match timer {
                Timer::Queue(lease) => {
                    let Some(entry) = self.leases.get(&lease) else {
                        continue;
                    };
                    if !matches!(entry.state, LeaseState::Queued { deadline, .. } if deadline == at)
                    {
                        continue;
                    }
                    let waited = entry.pool_timeout.as_millis() as u64;
                    self.counters.pool_timeouts += 1;
                    self.fail_waiter(lease, PoolError::PoolTimeout(waited), fx);
                }
                Timer::Affinity(lease) => {
                    let Some(entry) = self.leases.get_mut(&lease) else {
                        continue;
                    };
                    if let LeaseState::Queued {
                        affinity_until: ref mut until @ Some(u),
                        ..
                    } = entry.state
                    {
                        if u == at {
                            *until = None;
                            self.queue.unhome(lease);
                            self.dispatch_idle(now, fx);
                        }
                    }
                }
                Timer::Request(wid, rid) => {
                    let Some(p) = self.workers.get(&wid).and_then(|w| w.inflight.get(&rid)) else {
                        continue;
                    };
                    if p.deadline != Some(at) {
                        continue;
                    }
                    let v2 = self.workers[&wid].v2;
                    match p.kind {
                        PendingKind::Caller { lease, timeout, .. } if v2 => {
                            // Its id is tracked: cancel it, drop its late reply, keep the worker.
                            self.counters.timeouts += 1;
                            self.counters.errors += 1;
                            let ms = timeout.as_millis() as u64;
                            self.cancel(wid, rid, fx);
                            if let Some(reply) =
                                self.leases.get_mut(&lease).and_then(|e| e.reply.take())
                            {
                                fx.push(Effect::Deliver {
                                    to: reply,
                                    delivery: Delivery::Reply(Err(PoolError::Timeout(ms))),
                                });
                            }
                            self.finish_lease_request(lease, wid, now, fx);
                        }
                        PendingKind::Caller { timeout, .. } => {
                            self.counters.timeouts += 1;
                            let ms = timeout.as_millis() as u64;
                            let why = format!("a request took longer than {ms} ms");
                            let error = |r| {
                                if r == rid {
                                    PoolError::Timeout(ms)
                                } else {
                                    PoolError::CheckoutFailed(format!(
                                        "its worker was recycled: another request took longer than {ms} ms"
                                    ))
                                }
                            };
                            self.kill_worker(wid, &why, error, now, fx);
                        }
                        _ => {
                            let ms = self.config.start_timeout.as_millis();
                            let why = format!("an internal command took longer than {ms} ms");
                            let error = |_| PoolError::CheckoutFailed(why.clone());
                            self.kill_worker(wid, &why, error, now, fx);
                        }
                    }
                }
                Timer::Worker(wid) => {
                    let Some(w) = self.workers.get_mut(&wid) else {
                        continue;
                    };
                    if w.alarm != Some(at) {
                        continue;
                    }
                    w.alarm = None;
                    match w.status {
                        Status::Backoff => self.backoff_over(wid, now, fx),
                        Status::Spawning | Status::Starting => {
                            let ms = self.config.start_timeout.as_millis();
                            let why = format!("it did not answer its start-up ping within {ms} ms");
                            self.start_problem(wid, why, now, fx);
                        }
                        Status::Idle if w.overflow && w.strict.is_empty() => {
                            self.shutdown_worker(wid, now, fx);
                        }
                        _ => {}
                    }
                }
                Timer::Heartbeat(wid) => self.heartbeat(wid, at, now, fx),
                Timer::Grace(wid) => {
                    let Some(w) = self.workers.get_mut(&wid) else {
                        continue;
                    };
                    let Some((due, signal)) = w.grace.take() else {
                        continue;
                    };
                    if due != at {
                        w.grace = Some((due, signal));
                        continue;
                    }
                    fx.push(Effect::Signal {
                        worker: wid,
                        signal,
                    });
                    if signal == Signal::Term {
                        let next = later(now, self.config.shutdown_grace);
                        self.set_grace(wid, Some((next, Signal::Kill)));
                    }
                }
            }
        }
    }

    /// A busy v2 worker's heartbeat deadline: ping it after a third of `heartbeat_timeout` of
    /// silence, recycle it after all of it.
    fn heartbeat(&mut self, wid: WorkerId, at: Instant, now: Instant, fx: &mut Effects<R>) {
        let Some(w) = self.workers.get_mut(&wid) else {
            return;
        };
        if w.heartbeat != Some(at) {
            return;
        }
        w.heartbeat = None;
        if !w.v2 || !w.usable() || w.callers_in_flight() == 0 {
            return; // armed again by its next request
        }
        let limit = self.config.heartbeat_timeout;
        let silent = now.saturating_duration_since(w.last_heard);
        if silent >= limit {
            let ms = limit.as_millis() as u64;
            let why = format!("it sent nothing for {ms} ms with requests in flight");
            return self.kill_worker(wid, &why, |_| PoolError::Unresponsive(ms), now, fx);
        }
        let last = w.last_heard;
        let pinged = w
            .inflight
            .values()
            .any(|p| matches!(p.kind, PendingKind::Heartbeat));
        let interval = self.heartbeat_interval();
        let next = if pinged || silent >= interval {
            if !pinged {
                let rid = self.next_request_id();
                let bytes =
                    frame::encode_request(rid, "ping", b"{}", usize::MAX).expect("no limit");
                let w = self.workers.get_mut(&wid).expect("present");
                w.inflight.insert(
                    rid,
                    Pending {
                        kind: PendingKind::Heartbeat,
                        deadline: None,
                    },
                );
                fx.push(Effect::Write { worker: wid, bytes });
            }
            later(last, limit)
        } else {
            later(last, interval)
        };
        self.set_heartbeat(wid, Some(next));
    }
}
