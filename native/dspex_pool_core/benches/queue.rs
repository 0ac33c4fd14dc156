//! What queue operations cost with many callers waiting (issue 7: O(affected), not a scan).
//!
//!     cargo bench -p dspex_pool_core --bench queue
//!
//! For N queued callers (N = 100, 1,000, 10,000) with staggered pool timeouts (caller i waits
//! i ms) on a pool whose only worker is held, it times: queueing them all; letting each expire
//! at its own deadline (one tick per deadline, as the executor delivers them); one owner's
//! release among N; the loss of a worker that 10 strict waiters wait for among N; and serving
//! all N in FIFO order through checkin/checkout. Costs per operation should stay flat as N
//! grows: each touches only what it affects.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dspex_pool_core::frame::Response;
use dspex_pool_core::{Core, Effect, Event, ExitInfo, Mode, PoolConfig};

fn written(fx: &[Effect<u64>]) -> Vec<(u64, u64)> {
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

/// A started pool of `size` workers, each held by a checkout (leases 1..=size).
fn busy_pool(size: usize, t0: Instant) -> Core<u64> {
    let config = PoolConfig {
        pool_size: size,
        max_overflow: 0,
        ..PoolConfig::default()
    };
    let mut fx = Vec::new();
    let mut core = Core::new(config, t0, &mut fx);
    for worker in 1..=size as u64 {
        let mut fx = Vec::new();
        core.step(Event::Spawned { worker, pid: None }, t0, &mut fx);
        for (w, id) in written(&fx) {
            let frame = Ok(Response {
                id,
                outcome: Ok(Bytes::from_static(b"{}")),
                event: false,
            });
            core.step(Event::Frame { worker: w, frame }, t0, &mut Vec::new());
        }
    }
    for lease in 1..=size as u64 {
        core.step(
            checkout(lease, Mode::Anonymous, Duration::ZERO, 0),
            t0,
            &mut Vec::new(),
        );
    }
    core
}

fn checkout(lease: u64, mode: Mode, wait: Duration, owner: u64) -> Event<u64> {
    Event::Acquire {
        lease,
        mode,
        once: None,
        reply: lease,
        pool_timeout: wait,
        owner,
    }
}

fn per_op(d: Duration, n: usize) -> f64 {
    d.as_nanos() as f64 / n as f64
}

fn main() {
    println!("| queued callers | queue one (ns) | expire one at its deadline (ns) | release 1 owner's lease (ns) | lose a worker, 10 strict waiters (µs) | serve one FIFO (ns) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in [100usize, 1_000, 10_000] {
        let t0 = Instant::now();
        let first = 100;

        // Queue n, then expire each at its own deadline.
        let mut core = busy_pool(1, t0);
        let start = Instant::now();
        for i in 0..n as u64 {
            let wait = Duration::from_millis(1 + i);
            core.step(
                checkout(first + i, Mode::Anonymous, wait, 1 + i % 64),
                t0,
                &mut Vec::new(),
            );
        }
        let queue = start.elapsed();
        assert_eq!(core.status().queued, n);
        let mut fx = Vec::new();
        let start = Instant::now();
        while let Some(at) = core.next_deadline() {
            fx.clear();
            core.step(Event::Tick, at, &mut fx);
            black_box(&fx);
        }
        let expire = start.elapsed();
        assert_eq!(core.status().queued, 0);

        // One owner's one lease among n.
        let mut core = busy_pool(1, t0);
        for i in 0..n as u64 {
            core.step(
                checkout(first + i, Mode::Anonymous, Duration::from_secs(60), 1),
                t0,
                &mut Vec::new(),
            );
        }
        core.step(
            checkout(
                first + n as u64,
                Mode::Anonymous,
                Duration::from_secs(60),
                2,
            ),
            t0,
            &mut Vec::new(),
        );
        let start = Instant::now();
        core.step(Event::ReleaseOwner { owner: 2 }, t0, &mut Vec::new());
        let release = start.elapsed();
        assert_eq!(core.status().queued, n);

        // A worker that 10 strict waiters wait for dies among n waiters.
        let mut core = busy_pool(2, t0);
        let strict = Mode::Session {
            id: Arc::from("s"),
            strict: true,
        };
        // Make worker 1 the session's home: free it, serve the session there, hold it again.
        core.step(Event::Release { lease: 1 }, t0, &mut Vec::new());
        let mut fx = Vec::new();
        core.step(
            checkout(2_000_000, strict.clone(), Duration::ZERO, 9),
            t0,
            &mut fx,
        );
        for i in 0..n as u64 {
            let mode = if i % (n as u64 / 10) == 0 {
                strict.clone()
            } else {
                Mode::Anonymous
            };
            core.step(
                checkout(first + i, mode, Duration::from_secs(60), 1),
                t0,
                &mut Vec::new(),
            );
        }
        let home = core.home_of("s").expect("the session has a home");
        let start = Instant::now();
        let mut fx = Vec::new();
        core.step(
            Event::Exited {
                worker: home,
                exit: ExitInfo::Signal(9),
                stderr: String::new(),
            },
            t0,
            &mut fx,
        );
        let lose = start.elapsed();
        let lost = fx
            .iter()
            .filter(|e| matches!(e, Effect::Deliver { .. }))
            .count();
        assert!(lost >= 10, "{lost} strict waiters told");

        // Serve n in FIFO order: each checkin hands the worker to the next waiter.
        let mut core = busy_pool(1, t0);
        for i in 0..n as u64 {
            core.step(
                checkout(first + i, Mode::Anonymous, Duration::from_secs(60), 1),
                t0,
                &mut Vec::new(),
            );
        }
        let start = Instant::now();
        let mut holder = 1;
        for i in 0..n as u64 {
            let mut fx = Vec::new();
            core.step(Event::Release { lease: holder }, t0, &mut fx);
            holder = first + i;
            black_box(&fx);
        }
        let serve = start.elapsed();
        assert_eq!(core.status().queued, 0);

        println!(
            "| {n} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} |",
            per_op(queue, n),
            per_op(expire, n),
            release.as_nanos(),
            lose.as_secs_f64() * 1e6,
            per_op(serve, n),
        );
    }
}
