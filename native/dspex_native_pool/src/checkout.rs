//! The checkout resource: a BEAM-visible lease on a worker.
//!
//! The resource monitors its holder. The lease ends (the worker returns to the pool, or is
//! recycled if a request was in flight) on whichever comes first: `checkin/1`, the holder's
//! exit (`down`), or the resource being garbage-collected (`Drop`). All three are idempotent.
//! For the execute fast path the pool itself holds the resource until the reply, which keeps
//! the monitor alive for exactly as long as the caller matters.

use std::sync::atomic::{AtomicI64, Ordering};

use rustler::{Env, LocalPid, Monitor, Resource, ResourceArc};

use crate::nif::PoolResource;
use crate::pool::LeaseId;

/// Live lease resources, for leak tests.
pub static LIVE: AtomicI64 = AtomicI64::new(0);

pub struct LeaseResource {
    pub pool: ResourceArc<PoolResource>,
    pub id: LeaseId,
}

impl LeaseResource {
    pub fn new(pool: ResourceArc<PoolResource>, id: LeaseId) -> Self {
        LIVE.fetch_add(1, Ordering::Relaxed);
        LeaseResource { pool, id }
    }
}

#[rustler::resource_impl]
impl Resource for LeaseResource {
    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, _monitor: Monitor) {
        self.pool.pool.release(self.id);
    }
}

impl Drop for LeaseResource {
    fn drop(&mut self) {
        self.pool.pool.release(self.id);
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}
