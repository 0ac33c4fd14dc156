//! Process monitoring and the checkout handle.
//!
//! Each process that uses a pool is monitored once, for as long as it lives, by an
//! [`OwnerGuard`] resource that the pool keeps: when the process dies, every lease it held ends
//! (queued ones leave the queue, held workers return, workers with a request in flight are
//! recycled). One monitor per process, not per call, keeps the fast path free of resource
//! allocation and monitor churn: removing a monitor from a non-scheduler thread makes ERTS wake
//! its aux thread, and thousands of dropped monitors slow down the holder's GC.
//!
//! A checkout is a [`CheckoutHandle`] resource: `checkin/1` ends its lease, and so does the
//! handle being garbage-collected (`Drop`) when its holder simply forgets it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use rustler::{Env, LocalPid, Monitor, Resource, ResourceArc};

use crate::pool::{LeaseId, Owner, Pool};

/// Live checkout handles, for leak tests.
pub static LIVE: AtomicI64 = AtomicI64::new(0);

/// A pool and the processes that use it.
pub struct Shared {
    pub pool: Pool,
    /// The pool's `max_frame_size`: arguments are refused before they outgrow it.
    pub max_frame_size: usize,
    owners: Mutex<HashMap<LocalPid, (Owner, ResourceArc<OwnerGuard>)>>,
    next_owner: AtomicU64,
}

impl Shared {
    pub fn new(pool: Pool, max_frame_size: usize) -> Arc<Shared> {
        Arc::new(Shared {
            pool,
            max_frame_size,
            owners: Mutex::new(HashMap::new()),
            next_owner: AtomicU64::new(1),
        })
    }

    /// The owner id of the calling process, monitoring it on first use.
    pub fn owner(self: &Arc<Self>, env: Env) -> Owner {
        let pid = env.pid();
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, _)) = owners.get(&pid) {
            return *id;
        }
        let id = self.next_owner.fetch_add(1, Ordering::Relaxed);
        let guard = ResourceArc::new(OwnerGuard {
            shared: Arc::downgrade(self),
            owner: id,
        });
        env.monitor(&guard, &pid);
        owners.insert(pid, (id, guard));
        id
    }
}

/// Monitors one process for one pool.
pub struct OwnerGuard {
    shared: Weak<Shared>,
    owner: Owner,
}

#[rustler::resource_impl]
impl Resource for OwnerGuard {
    fn down<'a>(&'a self, _env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
        if let Some(shared) = self.shared.upgrade() {
            let guard = shared
                .owners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&pid);
            shared.pool.release_owner(self.owner);
            drop(guard);
        }
    }
}

/// A checked-out worker, as the BEAM sees it.
pub struct CheckoutHandle {
    pub shared: Arc<Shared>,
    pub id: LeaseId,
}

impl CheckoutHandle {
    pub fn new(shared: Arc<Shared>, id: LeaseId) -> Self {
        LIVE.fetch_add(1, Ordering::Relaxed);
        CheckoutHandle { shared, id }
    }
}

#[rustler::resource_impl]
impl Resource for CheckoutHandle {}

impl Drop for CheckoutHandle {
    fn drop(&mut self) {
        self.shared.pool.release(self.id);
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}
