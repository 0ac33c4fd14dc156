//! The pool's logic against fake workers: queueing, timeouts, recycling, replacement,
//! overflow, sessions. No Python, no BEAM.

use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;

use crate::error::{ExitInfo, PoolError};
use crate::fake::{self, Event, Events, FakeSpawner};
use crate::pool::{Acquired, Delivery, Mode, Pool, PoolConfig, Request};

pub(crate) struct Harness {
    pub pool: Pool,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub spawner: FakeSpawner,
}

pub(crate) fn config(pool_size: usize) -> PoolConfig {
    PoolConfig {
        pool_size,
        max_overflow: 0,
        ..PoolConfig::default()
    }
}

impl Harness {
    pub(crate) async fn start(config: PoolConfig) -> Harness {
        Self::start_with(config, FakeSpawner::default()).await
    }

    pub(crate) async fn start_with(config: PoolConfig, spawner: FakeSpawner) -> Harness {
        let eager = if config.lazy { 0 } else { config.pool_size };
        let mut h = Self::unstarted(config, spawner);
        for _ in 0..eager {
            h.started().await;
        }
        h
    }

    /// A pool whose workers may still be starting.
    pub(crate) fn unstarted(config: PoolConfig, spawner: FakeSpawner) -> Harness {
        let (tx, events) = mpsc::unbounded_channel();
        let pool = Pool::start(config, Box::new(spawner.clone()), Box::new(Events(tx)));
        Harness {
            pool,
            events,
            spawner,
        }
    }

    pub(crate) async fn next_event(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(5), self.events.recv())
            .await
            .expect("an event within 5 s")
            .expect("event stream open")
    }

    pub(crate) async fn started(&mut self) -> u64 {
        loop {
            if let Event::Started(w) = self.next_event().await {
                return w;
            }
        }
    }

    pub(crate) async fn exited(&mut self) -> u64 {
        loop {
            if let Event::Exited(w) = self.next_event().await {
                return w;
            }
        }
    }

    /// Runs one request on any worker (`mode` anonymous) and returns its reply.
    pub(crate) async fn execute(
        &self,
        mode: Mode,
        command: &str,
        args: serde_json::Value,
        timeout_ms: u64,
    ) -> Result<serde_json::Value, PoolError> {
        let (reply, rx) = fake::sink();
        let req = Request {
            command: command.into(),
            args: serde_json::to_vec(&args).unwrap(),
            timeout: Duration::from_millis(timeout_ms),
            members: None,
            frame: None,
        };
        let id = self.pool.new_lease_id();
        self.pool
            .acquire(id, mode, Some(req), reply, Duration::from_secs(5), 0)?;
        fake::reply(rx.await.expect("a delivery"))
    }

    /// Runs `create_program` or `execute_program` for program `program` in `mode`'s session.
    pub(crate) async fn program(
        &self,
        mode: &Mode,
        command: &str,
        program: &str,
    ) -> Result<serde_json::Value, PoolError> {
        let session = match mode {
            Mode::Session { id, .. } => id.to_string(),
            Mode::Anonymous => String::new(),
        };
        let key = if command == "create_program" {
            "id"
        } else {
            "program_id"
        };
        let args = json!({ "session_id": session, key: program });
        self.execute(mode.clone(), command, args, 1000).await
    }

    pub(crate) fn checkout(
        &self,
        pool_timeout_ms: u64,
    ) -> (
        Result<Acquired, PoolError>,
        tokio::sync::oneshot::Receiver<Delivery>,
    ) {
        let (reply, rx) = fake::sink();
        let id = self.pool.new_lease_id();
        let r = self.pool.acquire(
            id,
            Mode::Anonymous,
            None,
            reply,
            Duration::from_millis(pool_timeout_ms),
            0,
        );
        (r, rx)
    }
}

pub(crate) fn run<F: std::future::Future>(f: F) -> F::Output {
    crate::runtime::handle().block_on(f)
}

pub(crate) fn session(id: &str) -> Mode {
    Mode::Session {
        id: id.into(),
        strict: false,
    }
}

#[test]
fn execute_round_trips_json() {
    run(async {
        let h = Harness::start(config(1)).await;
        let v = h
            .execute(Mode::Anonymous, "echo", json!({"a": [1, "x", null]}), 1000)
            .await;
        assert_eq!(v.unwrap(), json!({"a": [1, "x", null]}));
        let e = h
            .execute(Mode::Anonymous, "fail", json!({"message": "boom"}), 1000)
            .await;
        assert_eq!(e.unwrap_err(), PoolError::Python("boom".into()));
    })
}

#[test]
fn waiters_are_served_in_fifo_order() {
    run(async {
        let h = Harness::start(config(1)).await;
        let (a, _a_rx) = h.checkout(5000);
        let Ok(Acquired::Now(a)) = a else {
            panic!("first checkout is immediate")
        };
        let mut waiting = Vec::new();
        for _ in 0..3 {
            let (r, rx) = h.checkout(5000);
            let Ok(Acquired::Queued(id)) = r else {
                panic!("queued")
            };
            waiting.push((id, rx));
        }
        assert_eq!(h.pool.status().queued, 3);
        let mut holder = a;
        for (id, rx) in waiting {
            h.pool.release(holder);
            assert!(matches!(rx.await.unwrap(), Delivery::Assigned));
            assert!(h.pool.holds_worker(id));
            holder = id;
        }
        h.pool.release(holder);
        assert_eq!(h.pool.status().ready, 1);
    })
}

#[test]
fn queue_wait_over_pool_timeout_fails_and_leaves_the_queue() {
    run(async {
        let h = Harness::start(config(1)).await;
        let (a, _) = h.checkout(5000);
        assert!(matches!(a, Ok(Acquired::Now(_))));
        let (b, rx) = h.checkout(30);
        assert!(matches!(b, Ok(Acquired::Queued(_))));
        let d = fake::reply(rx.await.unwrap());
        assert!(matches!(d, Err(PoolError::PoolTimeout(30))), "{d:?}");
        assert_eq!(h.pool.status().queued, 0);
    })
}

#[test]
fn a_released_waiter_leaves_the_queue() {
    run(async {
        let h = Harness::start(config(1)).await;
        let (a, _) = h.checkout(5000);
        let Ok(Acquired::Now(a)) = a else { panic!() };
        let (b, _rx) = h.checkout(5000);
        let Ok(Acquired::Queued(b)) = b else { panic!() };
        h.pool.release(b);
        assert_eq!(h.pool.status().queued, 0);
        h.pool.release(a);
        assert_eq!(h.pool.status().ready, 1);
    })
}

#[test]
fn request_timeout_recycles_the_worker_and_the_pool_refills() {
    run(async {
        let mut h = Harness::start(config(1)).await;
        let e = h
            .execute(Mode::Anonymous, "sleep", json!({"ms": 5000}), 30)
            .await;
        assert_eq!(e.unwrap_err(), PoolError::Timeout(30));
        h.exited().await;
        h.started().await;
        let s = h.pool.status();
        assert_eq!(
            (s.ready, s.counters.timeouts, s.counters.recycled),
            (1, 1, 1)
        );
        // The replacement serves normally: no late reply of the old worker can reach it.
        assert_eq!(
            h.execute(Mode::Anonymous, "echo", json!(1), 1000)
                .await
                .unwrap(),
            json!(1)
        );
    })
}

#[test]
fn worker_death_mid_request_reports_the_exit_status() {
    run(async {
        let mut h = Harness::start(config(1)).await;
        let e = h
            .execute(Mode::Anonymous, "exit", json!({"code": 3}), 1000)
            .await;
        assert_eq!(e.unwrap_err(), PoolError::WorkerExited(ExitInfo::Code(3)));
        h.started().await;
        assert_eq!(h.pool.status().ready, 1);
    })
}

#[test]
fn garbage_and_wrong_ids_recycle_the_worker() {
    run(async {
        let mut h = Harness::start(config(1)).await;
        let e = h.execute(Mode::Anonymous, "garbage", json!({}), 1000).await;
        assert!(matches!(e, Err(PoolError::Decode(_))), "{e:?}");
        h.started().await;
        let e = h
            .execute(Mode::Anonymous, "wrong_id", json!({}), 1000)
            .await;
        assert_eq!(e.unwrap_err(), PoolError::ResponseMismatch);
        h.started().await;
        assert_eq!(h.pool.status().counters.recycled, 2);
    })
}

#[test]
fn releasing_a_checkout_mid_request_recycles_its_worker() {
    run(async {
        let mut h = Harness::start(config(1)).await;
        let (a, _) = h.checkout(5000);
        let Ok(Acquired::Now(a)) = a else { panic!() };
        let (reply, _rx) = fake::sink();
        let req = Request {
            command: "sleep".into(),
            args: br#"{"ms":5000}"#.to_vec(),
            timeout: Duration::from_secs(10),
            members: None,
            frame: None,
        };
        h.pool.call(a, req, reply).unwrap();
        h.pool.release(a);
        h.exited().await;
        h.started().await;
        assert_eq!(h.pool.status().counters.recycled, 1);
    })
}

#[test]
fn start_failures_give_a_clear_error_and_back_off() {
    run(async {
        let spawner = FakeSpawner::default();
        *spawner.fail.lock().unwrap() = Some("python3.99: not found".into());
        let h = Harness::start_with(
            PoolConfig {
                lazy: true,
                ..config(1)
            },
            spawner,
        )
        .await;
        let e = h.execute(Mode::Anonymous, "echo", json!(1), 1000).await;
        match e {
            Err(PoolError::CheckoutFailed(m)) => {
                assert!(m.contains("python3.99: not found"), "{m}")
            }
            other => panic!("expected CheckoutFailed, got {other:?}"),
        }
        // Callers during the backoff fail at once; no new spawn storm.
        for _ in 0..20 {
            assert!(h
                .execute(Mode::Anonymous, "echo", json!(1), 1000)
                .await
                .is_err());
        }
        assert!(
            *h.spawner.spawns.lock().unwrap() <= 3,
            "spawned {} times",
            h.spawner.spawns.lock().unwrap()
        );
    })
}

#[test]
fn overflow_workers_start_under_load_and_retire_when_idle() {
    run(async {
        let cfg = PoolConfig {
            max_overflow: 1,
            overflow_idle: Duration::from_millis(20),
            ..config(1)
        };
        let mut h = Harness::start(cfg).await;
        let (a, _) = h.checkout(5000);
        let Ok(Acquired::Now(a)) = a else { panic!() };
        let (b, rx) = h.checkout(5000);
        let Ok(Acquired::Queued(b)) = b else { panic!() };
        h.started().await;
        assert!(matches!(rx.await.unwrap(), Delivery::Assigned));
        assert_eq!(h.pool.status().overflow, 1);
        h.pool.release(b);
        h.exited().await;
        let s = h.pool.status();
        assert_eq!((s.overflow, s.ready, s.busy), (0, 0, 1));
        h.pool.release(a);
    })
}

#[test]
fn a_session_finds_its_programs_after_its_worker_died() {
    run(async {
        let mut h = Harness::start(config(2)).await;
        let s = session("s1");
        let created = h.program(&s, "create_program", "p1").await;
        assert_eq!(created.unwrap()["program_id"], "p1");
        let first = h.program(&s, "execute_program", "p1").await;
        let home = first.unwrap()["worker"].as_u64().unwrap();
        // Kill the home worker (anonymous calls go to the most recently used worker: home).
        let e = h
            .execute(Mode::Anonymous, "exit", json!({"code": 1}), 1000)
            .await;
        assert!(matches!(e, Err(PoolError::WorkerExited(_))));
        assert_eq!(h.exited().await, home);
        let again = h.program(&s, "execute_program", "p1").await;
        assert_ne!(again.unwrap()["worker"].as_u64().unwrap(), home);
        assert_eq!(h.pool.status().counters.restores, 1);
        // A deleted program is gone everywhere, ending the session frees it.
        h.pool.end_session("s1");
        let gone = h.program(&s, "execute_program", "p1").await;
        assert_eq!(
            gone.unwrap_err(),
            PoolError::Python("Program not found: p1".into())
        );
    })
}

#[test]
fn a_strict_session_reports_its_lost_worker_once() {
    run(async {
        let mut h = Harness::start(config(2)).await;
        let s = Mode::Session {
            id: "s".into(),
            strict: true,
        };
        h.program(&s, "create_program", "p").await.unwrap();
        h.execute(Mode::Anonymous, "exit", json!({"code": 1}), 1000)
            .await
            .unwrap_err();
        h.exited().await;
        let e = h.program(&s, "execute_program", "p").await;
        assert!(matches!(e, Err(PoolError::SessionLost(_))), "{e:?}");
        // Then the session starts afresh, without re-creation.
        let e = h.program(&s, "execute_program", "p").await;
        assert_eq!(
            e.unwrap_err(),
            PoolError::Python("Program not found: p".into())
        );
        assert_eq!(h.pool.status().counters.restores, 0);
    })
}

#[test]
fn a_global_lm_configuration_reaches_every_worker_present_and_future() {
    run(async {
        let mut h = Harness::start(config(2)).await;
        h.execute(
            Mode::Anonymous,
            "configure_lm",
            json!({"provider": "dummy"}),
            1000,
        )
        .await
        .unwrap();
        // Kill one worker: its replacement is configured at start-up.
        h.execute(Mode::Anonymous, "exit", json!({"code": 1}), 1000)
            .await
            .unwrap_err();
        h.exited().await;
        let new = h.started().await;
        let configured = |w: u64| {
            let journal = h.spawner.journal.lock().unwrap();
            journal.iter().any(|(x, c)| *x == w && c == "configure_lm")
        };
        // Chores run as soon as a worker is free; give the other worker's a moment.
        for _ in 0..500 {
            if configured(1) && configured(2) && configured(new) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!(
            "not every worker was configured: {:?}",
            h.spawner.journal.lock().unwrap()
        );
    })
}

#[test]
fn stop_fails_waiters_and_shuts_workers_down() {
    run(async {
        let mut h = Harness::start(PoolConfig {
            shutdown_grace: Duration::from_millis(20),
            ..config(1)
        })
        .await;
        let (a, _) = h.checkout(5000);
        let Ok(Acquired::Now(a)) = a else { panic!() };
        let (_, rx) = h.checkout(5000);
        h.pool.release(a);
        // The waiter got the worker; stopping now fails new callers.
        assert!(matches!(rx.await.unwrap(), Delivery::Assigned));
        h.pool.stop();
        let (r, _) = h.checkout(5000);
        assert!(matches!(r, Err(PoolError::CheckoutFailed(_))));
        loop {
            if h.next_event().await == Event::Stopped {
                break;
            }
        }
        // The held worker was signalled after the grace period; none was asked to shut down.
        let journal = h.spawner.journal.lock().unwrap().clone();
        assert!(!journal.iter().any(|(_, c)| c == "shutdown"), "{journal:?}");
    })
}

#[test]
fn stop_asks_idle_workers_to_shut_down() {
    run(async {
        let mut h = Harness::start(config(2)).await;
        h.pool.stop();
        loop {
            if h.next_event().await == Event::Stopped {
                break;
            }
        }
        let journal = h.spawner.journal.lock().unwrap().clone();
        let shutdowns = journal.iter().filter(|(_, c)| c == "shutdown").count();
        assert_eq!(shutdowns, 2, "{journal:?}");
    })
}

#[test]
fn a_session_waits_briefly_for_its_busy_home_then_moves() {
    run(async {
        let cfg = PoolConfig {
            affinity_wait: Duration::from_millis(30),
            ..config(2)
        };
        let h = Harness::start(cfg).await;
        let s = session("s");
        h.program(&s, "create_program", "p").await.unwrap();
        // The most recently used worker is the session's home: hold it.
        let (held, _) = h.checkout(5000);
        let Ok(Acquired::Now(held)) = held else {
            panic!()
        };
        let moved = h.program(&s, "execute_program", "p").await.unwrap();
        let status = h.pool.status();
        assert_eq!(
            status.counters.restores, 1,
            "re-created on the other worker: {moved}"
        );
        h.pool.release(held);
    })
}

#[test]
fn a_strict_session_waits_for_its_own_worker() {
    run(async {
        let cfg = PoolConfig {
            affinity_wait: Duration::ZERO,
            ..config(2)
        };
        let h = Harness::start(cfg).await;
        let s = Mode::Session {
            id: "s".into(),
            strict: true,
        };
        h.program(&s, "create_program", "p").await.unwrap();
        let (held, _) = h.checkout(5000);
        let Ok(Acquired::Now(held)) = held else {
            panic!()
        };
        let (reply, rx) = fake::sink();
        let req = Request {
            command: "execute_program".into(),
            args: br#"{"session_id":"s","program_id":"p"}"#.to_vec(),
            timeout: Duration::from_secs(1),
            members: None,
            frame: None,
        };
        let id = h.pool.new_lease_id();
        let r = h
            .pool
            .acquire(id, s, Some(req), reply, Duration::from_secs(5), 0);
        assert_eq!(
            r,
            Ok(Acquired::Queued(id)),
            "the other worker is idle, but not the session's"
        );
        h.pool.release(held);
        assert!(fake::reply(rx.await.unwrap()).is_ok());
        assert_eq!(h.pool.status().counters.restores, 0);
    })
}

#[test]
fn a_dead_owner_loses_every_lease_it_held() {
    run(async {
        let h = Harness::start(config(1)).await;
        let (reply, _a) = fake::sink();
        let held = h.pool.new_lease_id();
        let r = h.pool.acquire(
            held,
            Mode::Anonymous,
            None,
            reply,
            Duration::from_secs(5),
            7,
        );
        assert_eq!(r, Ok(Acquired::Now(held)));
        let (reply, _b) = fake::sink();
        let queued = h.pool.new_lease_id();
        let r = h.pool.acquire(
            queued,
            Mode::Anonymous,
            None,
            reply,
            Duration::from_secs(5),
            7,
        );
        assert_eq!(r, Ok(Acquired::Queued(queued)));
        h.pool.release_owner(7);
        let s = h.pool.status();
        assert_eq!((s.queued, s.open_leases, s.ready), (0, 0, 1));
    })
}

#[test]
fn a_worker_wiped_by_cleanup_re_creates_its_sessions() {
    run(async {
        let h = Harness::start(config(1)).await;
        let s = session("s");
        h.program(&s, "create_program", "p").await.unwrap();
        h.execute(Mode::Anonymous, "cleanup", json!({}), 1000)
            .await
            .unwrap();
        assert!(h.program(&s, "execute_program", "p").await.is_ok());
        assert_eq!(h.pool.status().counters.restores, 1);
    })
}

#[test]
fn ending_a_strict_session_frees_it_on_its_worker() {
    run(async {
        let h = Harness::start(config(1)).await;
        let s = Mode::Session {
            id: "s".into(),
            strict: true,
        };
        h.program(&s, "create_program", "p").await.unwrap();
        h.pool.end_session("s");
        let e = h.program(&s, "execute_program", "p").await;
        assert_eq!(
            e.unwrap_err(),
            PoolError::Python("Program not found: p".into())
        );
        let journal = h.spawner.journal.lock().unwrap().clone();
        assert!(
            journal.iter().any(|(_, c)| c == "cleanup_session"),
            "{journal:?}"
        );
    })
}

#[test]
fn an_idle_pool_arms_no_timer() {
    run(async {
        let h = Harness::start(config(2)).await;
        assert_eq!(h.pool.next_deadline(), None);
        h.execute(Mode::Anonymous, "echo", json!(1), 1000)
            .await
            .unwrap();
        assert_eq!(
            h.pool.next_deadline(),
            None,
            "a served request disarms its timeout"
        );
    })
}
