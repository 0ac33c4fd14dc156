//! The queue of callers waiting for a worker: FIFO, with a lane per home worker.
//!
//! A waiter either accepts any worker (the *any* lane) or, for a while, wants one worker: its
//! session's home (a lane per worker; `:strict` waiters stay there for good, others move to the
//! any lane when their affinity wait ends, keeping their place). A worker that becomes free
//! serves the first waiter of its own lane, else the first of the any lane. Every operation is
//! O(log n) in the number of waiters, so expiry, an owner's release and a lost worker cost
//! O(affected), not a scan of the queue. Positions are sequence numbers: a request that must be
//! retried goes to the very front.

use std::collections::{BTreeMap, HashMap};

use crate::{LeaseId, WorkerId};

const MIDDLE: u64 = u64::MAX / 2;

#[derive(Debug)]
pub struct WaitQueue {
    any: BTreeMap<u64, LeaseId>,
    homes: HashMap<WorkerId, BTreeMap<u64, LeaseId>>,
    at: HashMap<LeaseId, (u64, Option<WorkerId>)>,
    back: u64,
    front: u64,
}

impl Default for WaitQueue {
    fn default() -> Self {
        WaitQueue {
            any: BTreeMap::new(),
            homes: HashMap::new(),
            at: HashMap::new(),
            back: MIDDLE,
            front: MIDDLE,
        }
    }
}

impl WaitQueue {
    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    pub fn contains(&self, lease: LeaseId) -> bool {
        self.at.contains_key(&lease)
    }

    /// Queues `lease` last; `home`: the one worker it waits for (for now).
    pub fn push_back(&mut self, lease: LeaseId, home: Option<WorkerId>) {
        self.back += 1;
        self.insert(self.back, lease, home);
    }

    /// Queues `lease` first (a request that was never delivered and must be retried).
    pub fn push_front(&mut self, lease: LeaseId, home: Option<WorkerId>) {
        self.front -= 1;
        self.insert(self.front, lease, home);
    }

    fn insert(&mut self, seq: u64, lease: LeaseId, home: Option<WorkerId>) {
        self.at.insert(lease, (seq, home));
        self.lane(home).insert(seq, lease);
    }

    fn lane(&mut self, home: Option<WorkerId>) -> &mut BTreeMap<u64, LeaseId> {
        match home {
            None => &mut self.any,
            Some(w) => self.homes.entry(w).or_default(),
        }
    }

    /// Takes `lease` out of the queue; false when it was not queued.
    pub fn remove(&mut self, lease: LeaseId) -> bool {
        let Some((seq, home)) = self.at.remove(&lease) else {
            return false;
        };
        self.remove_from_lane(seq, home);
        true
    }

    fn remove_from_lane(&mut self, seq: u64, home: Option<WorkerId>) {
        match home {
            None => {
                self.any.remove(&seq);
            }
            Some(w) => {
                if let Some(lane) = self.homes.get_mut(&w) {
                    lane.remove(&seq);
                    if lane.is_empty() {
                        self.homes.remove(&w);
                    }
                }
            }
        }
    }

    /// The worker `lease` waits for, if it waits for one.
    pub fn home_of(&self, lease: LeaseId) -> Option<WorkerId> {
        self.at.get(&lease).and_then(|(_, h)| *h)
    }

    /// The waiter a free `worker` serves: the first that waits for it, else the first that
    /// accepts any worker. `eligible` may refuse a waiter of the any lane (it is left queued).
    pub fn pop_for(&mut self, worker: WorkerId) -> Option<LeaseId> {
        let seq = self
            .homes
            .get(&worker)
            .and_then(|lane| lane.keys().next().copied())
            .map(|s| (s, Some(worker)))
            .or_else(|| self.any.keys().next().map(|s| (*s, None)))?;
        let (seq, home) = seq;
        let lane = self.lane(home);
        let lease = lane.remove(&seq).expect("the lane holds it");
        if home.is_some() && lane.is_empty() {
            self.homes.remove(&worker);
        }
        self.at.remove(&lease);
        Some(lease)
    }

    /// Like [`WaitQueue::pop_for`], for a worker that serves only the waiters `eligible`
    /// accepts (a shared worker takes no checkout): the first eligible waiter of its lane or
    /// of the any lane, whichever queued first. O(waiters skipped).
    pub fn pop_for_where(
        &mut self,
        worker: WorkerId,
        eligible: impl Fn(LeaseId) -> bool,
    ) -> Option<LeaseId> {
        let own = self
            .homes
            .get(&worker)
            .and_then(|lane| lane.iter().find(|(_, l)| eligible(**l)))
            .map(|(s, l)| (*s, *l, Some(worker)));
        let any = self
            .any
            .iter()
            .find(|(_, l)| eligible(**l))
            .map(|(s, l)| (*s, *l, None));
        let (_, lease, _) = match (own, any) {
            (Some(a), Some(b)) => {
                if a.0 < b.0 {
                    a
                } else {
                    b
                }
            }
            (a, b) => a.or(b)?,
        };
        self.remove(lease);
        Some(lease)
    }

    /// The waiters that accept any worker, in order (they stay queued).
    pub fn any_lane(&self) -> impl Iterator<Item = LeaseId> + '_ {
        self.any.values().copied()
    }

    /// Whether some waiter accepts any worker.
    pub fn any_waiting(&self) -> bool {
        !self.any.is_empty()
    }

    /// Moves `lease` to the any lane, keeping its place.
    pub fn unhome(&mut self, lease: LeaseId) {
        self.move_to(lease, None);
    }

    /// Moves `lease` to `home`'s lane (or the any lane), keeping its place.
    pub fn move_to(&mut self, lease: LeaseId, home: Option<WorkerId>) {
        if let Some((seq, old)) = self.at.get(&lease).copied() {
            if old != home {
                self.remove_from_lane(seq, old);
                self.at.insert(lease, (seq, home));
                self.lane(home).insert(seq, lease);
            }
        }
    }

    /// The waiters of `worker`'s lane, in order (they stay queued).
    pub fn waiting_for(&self, worker: WorkerId) -> Vec<LeaseId> {
        self.homes
            .get(&worker)
            .map(|lane| lane.values().copied().collect())
            .unwrap_or_default()
    }

    /// Empties the queue, returning every waiter in queue order.
    pub fn drain(&mut self) -> Vec<LeaseId> {
        let mut all: Vec<(u64, LeaseId)> = self.at.drain().map(|(l, (s, _))| (s, l)).collect();
        all.sort_unstable();
        self.any.clear();
        self.homes.clear();
        all.into_iter().map(|(_, l)| l).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_waiters_first_then_fifo_and_retries_at_the_front() {
        let mut q = WaitQueue::default();
        q.push_back(1, None);
        q.push_back(2, Some(9));
        q.push_back(3, None);
        q.push_front(4, None);
        assert_eq!(q.len(), 4);
        assert_eq!(q.pop_for(9), Some(2));
        assert_eq!(q.pop_for(9), Some(4));
        assert_eq!(q.pop_for(5), Some(1));
        q.push_back(5, Some(7));
        q.push_back(6, None);
        q.unhome(5);
        assert_eq!(q.home_of(5), None);
        assert_eq!(q.pop_for(1), Some(3));
        assert_eq!(q.pop_for(1), Some(5));
        assert!(q.remove(6));
        assert!(!q.remove(6));
        assert!(q.is_empty() && q.homes.is_empty() && q.any.is_empty());
    }

    #[test]
    fn drain_keeps_queue_order() {
        let mut q = WaitQueue::default();
        q.push_back(1, Some(3));
        q.push_back(2, None);
        q.push_front(3, None);
        assert_eq!(q.drain(), vec![3, 1, 2]);
        assert!(q.is_empty());
    }
}
