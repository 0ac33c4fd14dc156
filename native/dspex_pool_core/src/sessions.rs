//! Sessions: the pool's record of each session, affinity to its home worker, and its end.
//!
//! A session's record (programs, LM; see [`crate::session::SessionRecord`]) lets any worker
//! re-create it with a `restore_session` frame before the session's next request; each worker
//! remembers which generation of each session it holds. A `:strict` session is never
//! re-created: it lives on one worker, which keeps it (an overflow worker is not retired while
//! one lives on it), and is lost only with that worker. Every record has an *epoch*, unique to
//! it: a reply is recorded only into the record its request was sent for, so a reply racing
//! with `end_session` cannot bring an ended session back.

use std::sync::Arc;
use std::time::Instant;

use crate::effects::{Delivery, Effect};
use crate::error::PoolError;
use crate::frame;
use crate::json::RawObject;
use crate::session::{self, SessionRecord};
use crate::state::{Chore, Core, Effects, LeaseState, Mode, Pending, PendingKind, Status};
use crate::timers::Timer;
use crate::{RequestId, WorkerId};

impl<R> Core<R> {
    /// The session's record, made (with a fresh epoch) if it has none.
    pub(crate) fn session_record(&mut self, id: &Arc<str>) -> &mut SessionRecord {
        let epoch = self.next_epoch;
        let record = self
            .sessions
            .entry(id.clone())
            .or_insert_with(|| SessionRecord::new(epoch));
        if record.epoch == epoch {
            self.next_epoch += 1;
        }
        record
    }

    /// Before a session's request on `wid`: the session and its record's epoch, and the
    /// `restore_session` (id, pending, frame) to send first when the worker's copy is behind.
    #[allow(clippy::type_complexity)]
    pub(crate) fn prepare_session(
        &mut self,
        wid: WorkerId,
        id: &Arc<str>,
        strict: bool,
    ) -> (
        Option<(Arc<str>, u64)>,
        Option<(RequestId, Pending, Vec<u8>)>,
    ) {
        let record = self.session_record(id);
        let (epoch, generation, has_state) = (record.epoch, record.generation, record.has_state());
        let restore_args = (!strict && has_state).then(|| record.restore_args(id));
        let w = self.workers.get_mut(&wid).expect("worker exists");
        // A restore of this very generation already on its way (a shared worker serving two
        // requests of the session) is enough.
        let restoring = w.inflight.values().any(|p| {
            matches!(&p.kind, PendingKind::Restore { session, generation: g }
                if session == id && *g == generation)
        });
        let current = restoring || w.sessions.get(id) == Some(&generation);
        let mut restore = None;
        match restore_args {
            // A strict session is never re-created; the worker is still marked as holding it,
            // so that end_session frees it there.
            Some(args) if !current => {
                let rid = self.next_request_id();
                let bytes = frame::encode_request(rid, "restore_session", &args, usize::MAX)
                    .expect("no limit");
                let pending = Pending {
                    kind: PendingKind::Restore {
                        session: id.clone(),
                        generation,
                    },
                    deadline: None,
                };
                restore = Some((rid, pending, bytes));
            }
            _ if !current => {
                // Nothing to re-create: this worker is as current as any.
                w.sessions.insert(id.clone(), generation);
            }
            _ => {}
        }
        (Some((id.clone(), epoch)), restore)
    }

    /// Records a successful state-changing command of a session, or a global configuration.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        &mut self,
        wid: WorkerId,
        session: Option<(Arc<str>, u64)>,
        command: &str,
        args: &[u8],
        members: Option<RawObject>,
        result: &[u8],
        now: Instant,
        fx: &mut Effects<R>,
    ) {
        if session::is_global_config_of(command, members.as_ref()) {
            let chore = Chore {
                command: "configure_lm",
                args: args.to_vec(),
            };
            self.init.retain(|c| c.command != "configure_lm");
            self.init.push(chore.clone());
            self.chore_for_all(chore, wid, now, fx);
            return;
        }
        let Some((id, epoch)) = session else {
            return;
        };
        // Ended (or ended and begun again) since the request was sent: nothing comes back.
        let Some(record) = self.sessions.get_mut(&id).filter(|r| r.epoch == epoch) else {
            return;
        };
        let w = self.workers.get_mut(&wid).expect("worker exists");
        let was_current = w.sessions.get(&id) == Some(&record.generation);
        let changed = members.is_some_and(|m| record.apply_members(command, m, result));
        if changed && was_current {
            w.sessions.insert(id, record.generation);
        }
    }

    /// Forgets a session and frees its programs in every worker that holds them or is running
    /// one of its requests (after that request).
    pub fn end_session(&mut self, session: &str, now: Instant, fx: &mut Effects<R>) {
        self.sessions.remove(session);
        let args = serde_json::to_vec(&serde_json::json!({ "session_id": session }))
            .expect("a string serialises");
        let mut holders: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.live())
            .filter(|(_, w)| {
                w.sessions.contains_key(session)
                    || w.strict.contains(session)
                    || w.inflight.values().any(|p| {
                        matches!(&p.kind, PendingKind::Caller { session: Some((s, _)), .. }
                            if &**s == session)
                    })
            })
            .map(|(id, _)| *id)
            .collect();
        holders.sort_unstable();
        for wid in holders {
            let w = self.workers.get_mut(&wid).expect("present");
            let running_it = w.inflight.values().any(|p| {
                matches!(&p.kind, PendingKind::Caller { session: Some((s, _)), .. }
                    if &**s == session)
            });
            w.sessions.remove(session);
            w.strict.remove(session);
            w.chores.push_back(Chore {
                command: "cleanup_session",
                args: args.clone(),
            });
            match w.status {
                Status::Idle => self.worker_free(wid, now, fx),
                // A shared worker not running one of its requests frees it at once.
                Status::Shared if !running_it && w.chores.len() == 1 => {
                    self.send_chores(wid, now, fx)
                }
                _ => {}
            }
        }
    }

    /// A worker is gone: strict waiters of its sessions can never be served; the others wait
    /// for any worker now.
    pub(crate) fn lose_sessions(&mut self, wid: WorkerId, now: Instant, fx: &mut Effects<R>) {
        for lease in self.queue.waiting_for(wid) {
            let Some(entry) = self.leases.get_mut(&lease) else {
                continue;
            };
            let lost = match &entry.mode {
                Mode::Session { id, strict: true } => {
                    self.sessions.get(id).and_then(|r| r.strict_home) == Some(wid)
                }
                _ => false,
            };
            match entry.mode.clone() {
                Mode::Session { id, .. } if lost => {
                    if let Some(r) = self.sessions.get_mut(&id) {
                        r.home = None;
                        r.strict_home = None;
                        r.forget();
                    }
                    let mut entry = self.remove_lease(lease).expect("present");
                    self.counters.errors += 1;
                    if let Some(reply) = entry.reply.take() {
                        fx.push(Effect::Deliver {
                            to: reply,
                            delivery: Delivery::Reply(Err(PoolError::SessionLost(id.to_string()))),
                        });
                    }
                }
                _ => {
                    if let LeaseState::Queued {
                        affinity_until: ref mut until @ Some(u),
                        ..
                    } = entry.state
                    {
                        *until = None;
                        self.timers.disarm(u, Timer::Affinity(lease));
                    }
                    self.queue.unhome(lease);
                }
            }
        }
        self.dispatch_idle(now, fx);
    }

    /// A strict session has (a new) home: its queued strict requests wait for that worker.
    pub(crate) fn follow_strict_home(&mut self, id: &Arc<str>, wid: WorkerId) {
        let Some(waiting) = self.strict_waiting.get(id) else {
            return;
        };
        let mut waiting: Vec<_> = waiting.iter().copied().collect();
        waiting.sort_unstable();
        for lease in waiting {
            let Some(entry) = self.leases.get_mut(&lease) else {
                continue;
            };
            if let LeaseState::Queued {
                affinity_until: ref mut until @ Some(u),
                ..
            } = entry.state
            {
                *until = None;
                self.timers.disarm(u, Timer::Affinity(lease));
            }
            self.queue.move_to(lease, Some(wid));
        }
    }
}
