//! Exact deadlines, on a fake clock: the core says when it must act next, and acts then, not
//! on a ticker's beat.

use std::time::{Duration, Instant};

use bytes::Bytes;
use dspex_pool_core::frame::Response;
use dspex_pool_core::{
    Acquired, Core, Delivery, Effect, Event, Mode, Outcome, PoolConfig, PoolError, Request,
};

type Fx = Vec<Effect<u64>>;

/// Request ids written to each worker, oldest first.
fn written(fx: &Fx) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for e in fx {
        if let Effect::Write { worker, bytes } = e {
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                let v: serde_json::Value = serde_json::from_slice(&rest[4..4 + len]).unwrap();
                out.push((*worker, v["id"].as_u64().unwrap()));
                rest = &rest[4 + len..];
            }
        }
    }
    out
}

fn ok(worker: u64, id: u64) -> Event<u64> {
    Event::Frame {
        worker,
        frame: Ok(Response {
            id,
            outcome: Ok(Bytes::from_static(b"{}")),
            event: false,
        }),
    }
}

/// A pool of `size` started workers, at `t0`.
fn started(size: usize) -> (Core<u64>, Instant) {
    let t0 = Instant::now();
    let config = PoolConfig {
        pool_size: size,
        max_overflow: 0,
        ..PoolConfig::default()
    };
    let mut fx = Vec::new();
    let mut core = Core::new(config, t0, &mut fx);
    let spawns: Vec<u64> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Spawn { worker } => Some(*worker),
            _ => None,
        })
        .collect();
    for worker in spawns {
        let mut fx = Vec::new();
        core.step(Event::Spawned { worker, pid: None }, t0, &mut fx);
        for (w, id) in written(&fx) {
            core.step(ok(w, id), t0, &mut Vec::new());
        }
    }
    assert_eq!(core.status().ready, size);
    (core, t0)
}

fn execute(timeout: Duration) -> Option<Request> {
    Some(Request {
        command: "sleep".into(),
        args: b"{}".to_vec(),
        timeout,
        members: None,
        frame: None,
    })
}

fn acquire(
    core: &mut Core<u64>,
    lease: u64,
    once: Option<Request>,
    pool_timeout: Duration,
    now: Instant,
    fx: &mut Fx,
) -> Result<Acquired, PoolError> {
    let event = Event::Acquire {
        lease,
        mode: Mode::Anonymous,
        once,
        reply: lease,
        pool_timeout,
        owner: 1,
    };
    match core.step(event, now, fx) {
        Outcome::Acquired(r) => r,
        other => panic!("{other:?}"),
    }
}

fn delivered(fx: &Fx, to: u64) -> Option<&Delivery> {
    fx.iter().find_map(|e| match e {
        Effect::Deliver { to: t, delivery } if *t == to => Some(delivery),
        _ => None,
    })
}

#[test]
fn an_idle_pool_has_nothing_timed() {
    let (mut core, t0) = started(2);
    assert_eq!(core.next_deadline(), None);
    // A served request arms its timeout, and its reply disarms it.
    let mut fx = Vec::new();
    acquire(
        &mut core,
        1,
        execute(Duration::from_secs(30)),
        Duration::ZERO,
        t0,
        &mut fx,
    )
    .unwrap();
    assert_eq!(core.next_deadline(), Some(t0 + Duration::from_secs(30)));
    let (w, id) = written(&fx)[0];
    core.step(ok(w, id), t0, &mut Vec::new());
    assert_eq!(core.next_deadline(), None);
}

#[test]
fn a_zero_pool_timeout_means_now() {
    let (mut core, t0) = started(1);
    let mut fx = Vec::new();
    assert_eq!(
        acquire(&mut core, 1, None, Duration::ZERO, t0, &mut fx),
        Ok(Acquired::Now(1))
    );
    assert_eq!(
        acquire(&mut core, 2, None, Duration::ZERO, t0, &mut fx),
        Ok(Acquired::Queued(2))
    );
    assert_eq!(core.next_deadline(), Some(t0));
    let mut fx = Vec::new();
    core.step(Event::Tick, t0, &mut fx);
    assert_eq!(
        delivered(&fx, 2),
        Some(&Delivery::Reply(Err(PoolError::PoolTimeout(0))))
    );
    assert_eq!(core.status().queued, 0);
}

#[test]
fn a_sub_millisecond_request_timeout_fires_exactly_then() {
    let (mut core, t0) = started(1);
    let timeout = Duration::from_micros(300);
    acquire(
        &mut core,
        1,
        execute(timeout),
        Duration::ZERO,
        t0,
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(core.next_deadline(), Some(t0 + timeout));
    let mut fx = Vec::new();
    core.step(Event::Tick, t0 + Duration::from_micros(299), &mut fx);
    assert!(delivered(&fx, 1).is_none(), "fired early: {fx:?}");
    core.step(Event::Tick, t0 + timeout, &mut fx);
    assert_eq!(
        delivered(&fx, 1),
        Some(&Delivery::Reply(Err(PoolError::Timeout(0))))
    );
}

#[test]
fn staggered_waiters_expire_one_by_one_in_deadline_order() {
    let (mut core, t0) = started(1);
    acquire(&mut core, 1, None, Duration::ZERO, t0, &mut Vec::new()).unwrap();
    for lease in 2..=101 {
        let wait = Duration::from_millis(lease);
        let r = acquire(&mut core, lease, None, wait, t0, &mut Vec::new());
        assert_eq!(r, Ok(Acquired::Queued(lease)));
    }
    for lease in 2..=101 {
        let at = t0 + Duration::from_millis(lease);
        assert_eq!(core.next_deadline(), Some(at));
        let mut fx = Vec::new();
        core.step(Event::Tick, at, &mut fx);
        assert_eq!(
            delivered(&fx, lease),
            Some(&Delivery::Reply(Err(PoolError::PoolTimeout(lease))))
        );
        assert_eq!(core.status().queued, (101 - lease) as usize);
    }
    assert_eq!(core.next_deadline(), None);
}
