//! A consistency check of the whole state, for tests (the model test runs it after every
//! step). O(state): never called by the executor.

use std::collections::HashMap;

use crate::state::{Core, LeaseState, Status};
use crate::{LeaseId, WorkerId};

impl<R> Core<R> {
    /// Checks the state's internal consistency (for tests; O(state)). An `Err` names the
    /// first broken rule.
    pub fn audit(&self) -> Result<(), String> {
        let mut holders: HashMap<WorkerId, LeaseId> = HashMap::new();
        let mut queued = 0;
        for (id, l) in &self.leases {
            match l.state {
                LeaseState::Queued { .. } => {
                    queued += 1;
                    if !self.queue.contains(*id) {
                        return Err(format!("lease {id} is queued but not in the queue"));
                    }
                }
                LeaseState::Holding { worker } => {
                    if let Some(w) = self.workers.get(&worker) {
                        if w.status == Status::Leased(*id) {
                            if let Some(other) = holders.insert(worker, *id) {
                                return Err(format!("worker {worker} leased to {other} and {id}"));
                            }
                        } else if w.status == Status::Shared {
                            if l.checkout {
                                return Err(format!("checkout {id} shares worker {worker}"));
                            }
                            match l.request {
                                Some((rw, rid))
                                    if rw == worker && w.inflight.contains_key(&rid) => {}
                                _ => {
                                    return Err(format!(
                                        "lease {id} shares worker {worker} with no request on it"
                                    ))
                                }
                            }
                        } else if w.usable() {
                            return Err(format!(
                                "lease {id} holds worker {worker} which is {:?}",
                                w.status
                            ));
                        }
                    }
                }
            }
            if !self.owners.get(&l.owner).is_some_and(|s| s.contains(id)) {
                return Err(format!("lease {id} missing from its owner's set"));
            }
        }
        if queued != self.queue.len() {
            return Err(format!(
                "{queued} queued leases, queue holds {}",
                self.queue.len()
            ));
        }
        let owned: usize = self.owners.values().map(|s| s.len()).sum();
        if owned != self.leases.len() || self.owners.values().any(|s| s.is_empty()) {
            return Err("owner index out of step with the leases".into());
        }
        let mut idle = 0;
        for (wid, w) in &self.workers {
            if let Status::Leased(l) = w.status {
                if holders.get(wid) != Some(&l) {
                    return Err(format!("worker {wid} leased to {l} which does not hold it"));
                }
            }
            if w.status == Status::Idle {
                idle += 1;
                if !w.inflight.is_empty() {
                    return Err(format!("worker {wid} idle with a request in flight"));
                }
                if !self.idle.contains(&(w.idle_seq, *wid)) {
                    return Err(format!("idle worker {wid} missing from the idle set"));
                }
                if self.queue.any_waiting() && !self.closed {
                    return Err(format!("worker {wid} idle while a caller waits for any"));
                }
            }
            if w.callers_in_flight() > w.capacity as usize {
                return Err(format!(
                    "worker {wid} over its capacity ({} > {})",
                    w.callers_in_flight(),
                    w.capacity
                ));
            }
            if w.status == Status::Shared && (w.callers_in_flight() == 0 || w.capacity < 2) {
                return Err(format!("worker {wid} shared with nothing to share"));
            }
            if w.capacity > 1 && !w.v2 {
                return Err(format!(
                    "one-at-a-time worker {wid} with capacity {}",
                    w.capacity
                ));
            }
            for (rid, p) in &w.inflight {
                if let crate::state::PendingKind::Caller { lease, .. } = p.kind {
                    let ok = self
                        .leases
                        .get(&lease)
                        .is_some_and(|l| l.request == Some((*wid, *rid)));
                    if !ok && w.usable() {
                        return Err(format!(
                            "request {rid} on worker {wid} belongs to no lease waiting for it"
                        ));
                    }
                }
            }
            if w.v2 && w.usable() && w.callers_in_flight() > 0 && w.heartbeat.is_none() {
                return Err(format!("busy v2 worker {wid} without a heartbeat"));
            }
        }
        // A shared worker with room leaves no execute waiting for any worker, nor for it.
        for (wid, w) in &self.workers {
            if w.status != Status::Shared || !self.can_share(w) || self.closed {
                continue;
            }
            let mut waiting = self.queue.any_lane().chain(self.queue.waiting_for(*wid));
            if let Some(l) = waiting.find(|l| self.leases.get(l).is_some_and(|e| !e.checkout)) {
                return Err(format!(
                    "execute {l} waits while shared worker {wid} has room"
                ));
            }
        }
        let queued_checkouts = self
            .leases
            .iter()
            .filter(|(id, l)| l.checkout && self.queue.contains(**id))
            .count();
        if queued_checkouts != self.checkouts_waiting.len() {
            return Err("checkout index out of step with the queue".into());
        }
        if idle != self.idle.len() {
            return Err("idle set out of step with the workers".into());
        }
        let status = self.status();
        let busy = self
            .workers
            .values()
            .filter(|w| {
                matches!(
                    w.status,
                    Status::Leased(_) | Status::Shared | Status::Chores
                )
            })
            .count();
        if (status.ready, status.busy, status.queued, status.open_leases)
            != (idle, busy, queued, self.leases.len())
        {
            return Err(format!("status() out of step with the state: {status:?}"));
        }
        let live = self.workers.values().filter(|w| w.live());
        let (mut permanent, mut overflow) = (0, 0);
        for w in live {
            if w.overflow {
                overflow += 1
            } else {
                permanent += 1
            }
        }
        if permanent > self.config.pool_size || overflow > self.config.max_overflow {
            return Err(format!(
                "{permanent} permanent and {overflow} overflow workers live"
            ));
        }
        Ok(())
    }
}
