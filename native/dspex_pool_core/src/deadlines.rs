//! What happens when a deadline passes ([`crate::Event::Tick`]).
//!
//! Each armed [`Timer`] is handled once, in deadline order, and checked against the state it
//! was armed for (a timer is disarmed whenever its reason goes away, so a stale one is a bug
//! guard, not a path). Cost: O(log n) per timer due, nothing for the others.

use std::time::Instant;

use crate::effects::{Effect, Signal};
use crate::error::PoolError;
use crate::leases::later;
use crate::state::{Core, Effects, LeaseState, PendingKind, Status};
use crate::timers::Timer;

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
                    match p.kind {
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
}
