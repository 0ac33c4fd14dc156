//! Protocol v2 on a fake clock: the handshake sets a worker's capacity, executes share a
//! worker (least loaded first, a session's home while it has room), a timed-out or abandoned
//! request is cancelled and its late reply dropped, the heartbeat recycles a silent worker,
//! intermediate frames reach the caller and control frames reach the worker. One-at-a-time
//! (v1) workers keep the old rules.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dspex_pool_core::frame::Response;
use dspex_pool_core::{
    Acquired, Core, Delivery, Effect, Event, Mode, Outcome, PoolConfig, PoolError, Request,
};
use serde_json::Value;

type Fx = Vec<Effect<u64>>;

/// Frames written to each worker, as JSON, oldest first.
fn written(fx: &Fx) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    for e in fx {
        if let Effect::Write { worker, bytes } = e {
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                out.push((*worker, serde_json::from_slice(&rest[4..4 + len]).unwrap()));
                rest = &rest[4 + len..];
            }
        }
    }
    out
}

fn frame(worker: u64, id: u64, outcome: Result<&'static [u8], PoolError>) -> Event<u64> {
    Event::Frame {
        worker,
        frame: Ok(Response {
            id,
            outcome: outcome.map(Bytes::from_static),
            event: false,
        }),
    }
}

/// A pool of `size` started workers announcing `announce` (None: v1), at `t0`.
fn started(
    size: usize,
    announce: Option<u32>,
    option: Option<u32>,
    heartbeat: Duration,
) -> (Core<u64>, Instant) {
    let t0 = Instant::now();
    let config = PoolConfig {
        pool_size: size,
        max_overflow: 0,
        worker_concurrency: option,
        heartbeat_timeout: heartbeat,
        ..PoolConfig::default()
    };
    let mut fx = Vec::new();
    let mut core = Core::new(config, t0, &mut fx);
    for worker in 1..=size as u64 {
        let mut fx = Vec::new();
        core.step(Event::Spawned { worker, pid: None }, t0, &mut fx);
        for (w, v) in written(&fx) {
            assert_eq!(v["command"], "ping");
            assert_eq!(v["args"]["handshake"], true);
            assert_eq!(v["args"]["protocol"], 2);
            assert!(v["args"]["max_frame_size"].as_u64().unwrap() > 0);
            let hello: &'static [u8] = match announce {
                Some(n) => Box::leak(
                    format!(r#"{{"status":"ok","protocol":2,"concurrency":{n}}}"#)
                        .into_bytes()
                        .into_boxed_slice(),
                ),
                None => br#"{"status":"ok"}"#,
            };
            core.step(
                frame(w, v["id"].as_u64().unwrap(), Ok(hello)),
                t0,
                &mut Vec::new(),
            );
        }
    }
    assert_eq!(core.status().ready, size);
    core.audit().unwrap();
    (core, t0)
}

fn req(timeout: Duration) -> Option<Request> {
    Some(Request {
        command: "sleep".into(),
        args: b"{}".to_vec(),
        timeout,
        members: None,
        frame: None,
    })
}

fn execute(core: &mut Core<u64>, lease: u64, mode: Mode, now: Instant, fx: &mut Fx) -> Acquired {
    let event = Event::Acquire {
        lease,
        mode,
        once: req(Duration::from_secs(10)),
        reply: lease,
        pool_timeout: Duration::from_secs(5),
        owner: lease,
    };
    match core.step(event, now, fx) {
        Outcome::Acquired(r) => r.unwrap(),
        other => panic!("{other:?}"),
    }
}

fn delivered(fx: &Fx, to: u64) -> Option<&Delivery> {
    fx.iter().find_map(|e| match e {
        Effect::Deliver { to: t, delivery } if *t == to => Some(delivery),
        _ => None,
    })
}

/// The ids of the callers' requests written (not pings, not controls).
fn requests(fx: &Fx) -> Vec<(u64, u64)> {
    written(fx)
        .into_iter()
        .filter(|(_, v)| v["command"] == "sleep")
        .map(|(w, v)| (w, v["id"].as_u64().unwrap()))
        .collect()
}

fn controls(fx: &Fx) -> Vec<(u64, Value)> {
    written(fx)
        .into_iter()
        .filter(|(_, v)| v.get("control").is_some())
        .collect()
}

#[test]
fn the_handshake_sets_the_capacity() {
    let (core, _) = started(1, Some(64), Some(3), Duration::from_secs(30));
    assert_eq!(core.load_of(1), Some((0, 3)));
    let (core, _) = started(1, Some(5), None, Duration::from_secs(30));
    assert_eq!(core.load_of(1), Some((0, 5)));
    assert_eq!(core.status().capacity, 5);
    // A worker that announces nothing runs one request at a time, whatever the option says.
    let (core, _) = started(1, None, Some(8), Duration::from_secs(30));
    assert_eq!(core.load_of(1), Some((0, 1)));
}

#[test]
fn executes_share_the_least_loaded_worker_and_replies_match_by_id() {
    let (mut core, t0) = started(2, Some(4), None, Duration::from_secs(30));
    let mut fx = Vec::new();
    for lease in 1..=5 {
        assert_eq!(
            execute(&mut core, lease, Mode::Anonymous, t0, &mut fx),
            Acquired::Now(lease)
        );
        core.audit().unwrap();
    }
    let sent = requests(&fx);
    assert_eq!(sent.len(), 5, "all five in flight at once");
    let on = |w| sent.iter().filter(|(x, _)| *x == w).count();
    assert_eq!((on(1), on(2)), (3, 2), "spread by load: {sent:?}");
    let st = core.status();
    assert_eq!((st.in_flight, st.capacity, st.busy, st.ready), (5, 8, 2, 0));
    // Replies in reverse order each reach their own caller.
    for (i, (w, id)) in sent.iter().enumerate().rev() {
        let mut fx = Vec::new();
        core.step(frame(*w, *id, Ok(b"1")), t0, &mut fx);
        let lease = i as u64 + 1;
        assert_eq!(
            delivered(&fx, lease),
            Some(&Delivery::Reply(Ok(Bytes::from_static(b"1"))))
        );
        core.audit().unwrap();
    }
    assert_eq!(core.status().ready, 2);
    assert_eq!(core.status().counters.recycled, 0);
}

#[test]
fn a_full_worker_queues_and_a_checkout_keeps_a_worker_to_itself() {
    let (mut core, t0) = started(1, Some(2), None, Duration::from_secs(30));
    let mut fx = Vec::new();
    assert_eq!(
        execute(&mut core, 1, Mode::Anonymous, t0, &mut fx),
        Acquired::Now(1)
    );
    assert_eq!(
        execute(&mut core, 2, Mode::Anonymous, t0, &mut fx),
        Acquired::Now(2)
    );
    // Full: the next execute waits; one reply frees a slot and it takes it.
    assert_eq!(
        execute(&mut core, 3, Mode::Anonymous, t0, &mut fx),
        Acquired::Queued(3)
    );
    let sent = requests(&fx);
    let mut fx = Vec::new();
    core.step(frame(1, sent[0].1, Ok(b"1")), t0, &mut fx);
    assert_eq!(requests(&fx).len(), 1);
    let third = requests(&fx)[0].1;
    core.audit().unwrap();
    // A checkout needs the worker to itself: it queues, and while it waits the shared worker
    // takes no new request (executes queue behind it), so it drains instead of starving it.
    let event = Event::Acquire {
        lease: 4,
        mode: Mode::Anonymous,
        once: None,
        reply: 4,
        pool_timeout: Duration::from_secs(5),
        owner: 4,
    };
    let mut fx = Vec::new();
    assert!(matches!(
        core.step(event, t0, &mut fx),
        Outcome::Acquired(Ok(Acquired::Queued(4)))
    ));
    assert_eq!(
        execute(&mut core, 5, Mode::Anonymous, t0, &mut fx),
        Acquired::Queued(5)
    );
    core.audit().unwrap();
    let mut fx = Vec::new();
    core.step(frame(1, sent[1].1, Ok(b"1")), t0, &mut fx);
    assert!(
        requests(&fx).is_empty(),
        "no new work while the checkout waits"
    );
    core.step(frame(1, third, Ok(b"1")), t0, &mut fx);
    assert_eq!(delivered(&fx, 4), Some(&Delivery::Assigned));
    assert!(core.holds_worker(4));
    assert!(requests(&fx).is_empty());
    core.audit().unwrap();
    // Checked in: the queued execute runs.
    let mut fx = Vec::new();
    core.step(Event::Release { lease: 4 }, t0, &mut fx);
    assert_eq!(requests(&fx).len(), 1);
    core.audit().unwrap();
}

#[test]
fn a_session_goes_home_while_home_has_room() {
    let (mut core, t0) = started(2, Some(2), None, Duration::from_secs(30));
    let s = || Mode::Session {
        id: Arc::from("s"),
        strict: false,
    };
    let mut fx = Vec::new();
    execute(&mut core, 1, s(), t0, &mut fx);
    let home = core.home_of("s").unwrap();
    execute(&mut core, 2, s(), t0, &mut fx);
    assert_eq!(core.load_of(home), Some((2, 2)), "both on the home worker");
    // Home is full: the third waits for it (affinity), then goes elsewhere.
    assert_eq!(execute(&mut core, 3, s(), t0, &mut fx), Acquired::Queued(3));
    core.step(Event::Tick, t0 + Duration::from_secs(1), &mut fx);
    let other = if home == 1 { 2 } else { 1 };
    assert_eq!(core.load_of(other), Some((1, 2)));
    core.audit().unwrap();
}

#[test]
fn a_timed_out_request_is_cancelled_and_its_late_reply_dropped() {
    let (mut core, t0) = started(1, Some(4), None, Duration::from_secs(30));
    let mut fx = Vec::new();
    let event = Event::Acquire {
        lease: 1,
        mode: Mode::Anonymous,
        once: req(Duration::from_millis(100)),
        reply: 1,
        pool_timeout: Duration::from_secs(5),
        owner: 1,
    };
    core.step(event, t0, &mut fx);
    execute(&mut core, 2, Mode::Anonymous, t0, &mut fx);
    let sent = requests(&fx);
    let mut fx = Vec::new();
    core.step(Event::Tick, t0 + Duration::from_millis(100), &mut fx);
    assert_eq!(
        delivered(&fx, 1),
        Some(&Delivery::Reply(Err(PoolError::Timeout(100))))
    );
    let c = controls(&fx);
    assert_eq!(c.len(), 1);
    assert_eq!(
        c[0].1,
        serde_json::json!({"id": sent[0].1, "control": "cancel"})
    );
    assert!(!fx.iter().any(|e| matches!(e, Effect::Signal { .. })));
    let st = core.status();
    assert_eq!((st.counters.recycled, st.counters.cancelled), (0, 1));
    assert_eq!(core.load_of(1), Some((1, 4)));
    core.audit().unwrap();
    // The late reply reaches nobody and costs the worker nothing.
    let mut fx = Vec::new();
    let late = t0 + Duration::from_millis(150);
    core.step(
        frame(1, sent[0].1, Err(PoolError::Python("cancelled".into()))),
        late,
        &mut fx,
    );
    assert!(!fx
        .iter()
        .any(|e| matches!(e, Effect::Deliver { .. } | Effect::Signal { .. })));
    // The other request is unaffected.
    core.step(frame(1, sent[1].1, Ok(b"2")), late, &mut fx);
    assert_eq!(
        delivered(&fx, 2),
        Some(&Delivery::Reply(Ok(Bytes::from_static(b"2"))))
    );
    assert_eq!(core.status().counters.recycled, 0);
    core.audit().unwrap();
}

#[test]
fn a_v1_worker_is_still_recycled_on_timeout_and_never_gets_control_frames() {
    let (mut core, t0) = started(1, None, None, Duration::from_secs(30));
    let mut fx = Vec::new();
    let event = Event::Acquire {
        lease: 1,
        mode: Mode::Anonymous,
        once: req(Duration::from_millis(100)),
        reply: 1,
        pool_timeout: Duration::from_secs(5),
        owner: 1,
    };
    core.step(event, t0, &mut fx);
    let ctl = Event::Control {
        lease: 1,
        body: br#"{"control":"tool_result","call_id":1,"ok":true,"result":1}"#.to_vec(),
    };
    assert!(matches!(
        core.step(ctl, t0, &mut fx),
        Outcome::Called(Err(PoolError::CheckoutFailed(_)))
    ));
    let mut fx = Vec::new();
    core.step(Event::Tick, t0 + Duration::from_millis(100), &mut fx);
    assert!(controls(&fx).is_empty());
    assert!(fx.iter().any(|e| matches!(e, Effect::Signal { .. })));
    assert_eq!(core.status().counters.recycled, 1);
    // Nor a heartbeat: a v1 worker cannot answer a ping while busy.
    let (mut core, t0) = started(1, None, None, Duration::from_millis(300));
    let mut fx = Vec::new();
    execute(&mut core, 1, Mode::Anonymous, t0, &mut fx);
    let mut fx = Vec::new();
    core.step(Event::Tick, t0 + Duration::from_secs(5), &mut fx);
    assert!(written(&fx).is_empty());
    assert_eq!(core.status().counters.recycled, 0);
}

#[test]
fn a_caller_that_leaves_mid_request_cancels_it() {
    let (mut core, t0) = started(1, Some(4), None, Duration::from_secs(30));
    let mut fx = Vec::new();
    execute(&mut core, 1, Mode::Anonymous, t0, &mut fx);
    let sent = requests(&fx);
    let mut fx = Vec::new();
    core.step(Event::ReleaseOwner { owner: 1 }, t0, &mut fx);
    let c = controls(&fx);
    assert_eq!(c[0].1["control"], "cancel");
    assert_eq!(c[0].1["id"], sent[0].1);
    assert_eq!(core.status().counters.recycled, 0);
    assert_eq!(core.status().ready, 1);
    core.audit().unwrap();
}

#[test]
fn the_heartbeat_pings_a_quiet_worker_and_recycles_a_silent_one() {
    let hb = Duration::from_millis(300);
    let (mut core, t0) = started(1, Some(4), None, hb);
    let mut fx = Vec::new();
    execute(&mut core, 1, Mode::Anonymous, t0, &mut fx);
    execute(&mut core, 2, Mode::Anonymous, t0, &mut fx);
    // A third of the timeout of silence: a ping.
    assert_eq!(core.next_deadline(), Some(t0 + hb / 3));
    let mut fx = Vec::new();
    core.step(Event::Tick, t0 + hb / 3, &mut fx);
    let pings: Vec<_> = written(&fx)
        .into_iter()
        .filter(|(_, v)| v["command"] == "ping")
        .collect();
    assert_eq!(pings.len(), 1);
    // Its answer counts as a sign of life: no recycling at t0 + hb.
    let ping_id = pings[0].1["id"].as_u64().unwrap();
    core.step(frame(1, ping_id, Ok(b"{}")), t0 + hb / 2, &mut fx);
    let mut fx = Vec::new();
    core.step(Event::Tick, t0 + hb, &mut fx);
    assert_eq!(core.status().counters.recycled, 0);
    core.audit().unwrap();
    // Then nothing at all for the whole timeout: recycled, its requests fail.
    let mut fx = Vec::new();
    core.step(Event::Tick, t0 + hb / 2 + hb, &mut fx);
    assert_eq!(core.status().counters.recycled, 1);
    for lease in [1, 2] {
        assert_eq!(
            delivered(&fx, lease),
            Some(&Delivery::Reply(Err(PoolError::Unresponsive(300))))
        );
    }
    core.audit().unwrap();
}

#[test]
fn events_reach_the_caller_and_controls_the_worker() {
    let (mut core, t0) = started(1, Some(4), None, Duration::from_secs(30));
    let mut fx = Vec::new();
    execute(&mut core, 7, Mode::Anonymous, t0, &mut fx);
    let id = requests(&fx)[0].1;
    let body = format!(r#"{{"id":{id},"event":"tool_call","call_id":1,"name":"f","args":{{}}}}"#);
    let mut fx = Vec::new();
    let decoded = dspex_pool_core::frame::decode_response(&Bytes::from(body.clone()));
    core.step(
        Event::Frame {
            worker: 1,
            frame: decoded,
        },
        t0,
        &mut fx,
    );
    let events: Vec<_> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Event { lease, body } => Some((*lease, body.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(events, vec![(7, Bytes::from(body))]);
    assert_eq!(
        core.reply_of(7),
        Some(&7),
        "the reply handle stays for the reply"
    );
    let ctl = Event::Control {
        lease: 7,
        body: br#"{"control":"tool_result","call_id":1,"ok":true,"result":3}"#.to_vec(),
    };
    let mut fx = Vec::new();
    assert_eq!(core.step(ctl, t0, &mut fx), Outcome::Called(Ok(())));
    let c = controls(&fx);
    assert_eq!(
        c[0].1,
        serde_json::json!({"id": id, "control": "tool_result", "call_id": 1, "ok": true, "result": 3})
    );
    let bad = Event::Control {
        lease: 7,
        body: b"[]".to_vec(),
    };
    assert!(matches!(
        core.step(bad, t0, &mut fx),
        Outcome::Called(Err(PoolError::InvalidArgs(_)))
    ));
    let mut fx = Vec::new();
    core.step(frame(1, id, Ok(b"3")), t0, &mut fx);
    assert_eq!(
        delivered(&fx, 7),
        Some(&Delivery::Reply(Ok(Bytes::from_static(b"3"))))
    );
    // No request in flight any more: no control.
    let ctl = Event::Control {
        lease: 7,
        body: br#"{"control":"cancel"}"#.to_vec(),
    };
    assert!(matches!(
        core.step(ctl, t0, &mut fx),
        Outcome::Called(Err(PoolError::CheckoutFailed(_)))
    ));
}

#[test]
fn a_frame_with_a_null_id_recycles_the_worker() {
    // The bridge answers a request it could not parse with `id: null`: the pool cannot tell
    // which request it was, so the worker's state is unknown, as with garbage.
    let (mut core, t0) = started(1, Some(4), None, Duration::from_secs(30));
    let mut fx = Vec::new();
    execute(&mut core, 1, Mode::Anonymous, t0, &mut fx);
    let decoded = dspex_pool_core::frame::decode_response(&Bytes::from_static(
        br#"{"id":null,"success":false,"error":"unparseable request"}"#,
    ));
    let mut fx = Vec::new();
    core.step(
        Event::Frame {
            worker: 1,
            frame: decoded,
        },
        t0,
        &mut fx,
    );
    assert_eq!(core.status().counters.recycled, 1);
    assert_eq!(
        delivered(&fx, 1),
        Some(&Delivery::Reply(Err(PoolError::Malformed)))
    );
}

#[test]
fn an_unknown_id_from_a_v2_worker_is_dropped_from_a_v1_worker_recycles() {
    let (mut core, t0) = started(1, Some(4), None, Duration::from_secs(30));
    let mut fx = Vec::new();
    execute(&mut core, 1, Mode::Anonymous, t0, &mut fx);
    core.step(frame(1, 999, Ok(b"1")), t0, &mut fx);
    assert_eq!(core.status().counters.recycled, 0);
    let (mut core, t0) = started(1, None, None, Duration::from_secs(30));
    let mut fx = Vec::new();
    execute(&mut core, 1, Mode::Anonymous, t0, &mut fx);
    core.step(frame(1, 999, Ok(b"1")), t0, &mut fx);
    assert_eq!(core.status().counters.recycled, 1);
    assert_eq!(
        delivered(&fx, 1),
        Some(&Delivery::Reply(Err(PoolError::ResponseMismatch)))
    );
}

/// Runs `request` (a `configure_lm`) as lease `lease` and answers it: returns the worker that
/// ran it and the workers the pool then replayed it to.
fn configure_and_replays(
    core: &mut Core<u64>,
    lease: u64,
    request: Request,
    now: Instant,
) -> (u64, Vec<u64>) {
    let mut fx = Vec::new();
    let event = Event::Acquire {
        lease,
        mode: Mode::Anonymous,
        once: Some(request),
        reply: lease,
        pool_timeout: Duration::from_secs(5),
        owner: lease,
    };
    core.step(event, now, &mut fx);
    let (w, id) = written(&fx)
        .into_iter()
        .find(|(_, v)| v["command"] == "configure_lm")
        .map(|(w, v)| (w, v["id"].as_u64().unwrap()))
        .unwrap();
    let mut fx = Vec::new();
    core.step(frame(w, id, Ok(b"{}")), now, &mut fx);
    let replayed = written(&fx)
        .into_iter()
        .filter(|(_, v)| v["command"] == "configure_lm")
        .map(|(w, _)| w)
        .collect();
    (w, replayed)
}

#[test]
fn a_global_configuration_reaches_a_shared_worker_without_draining_it() {
    let (mut core, t0) = started(2, Some(4), None, Duration::from_secs(30));
    let mut fx = Vec::new();
    // Worker 2 is busy with two requests; a global configure_lm runs on worker 1.
    execute(&mut core, 1, Mode::Anonymous, t0, &mut fx);
    execute(&mut core, 2, Mode::Anonymous, t0, &mut fx);
    execute(&mut core, 3, Mode::Anonymous, t0, &mut fx);
    let sent = requests(&fx);
    let busy = sent[0].0;
    let request = Request {
        command: "configure_lm".into(),
        args: br#"{"provider":"dummy"}"#.to_vec(),
        timeout: Duration::from_secs(5),
        members: None,
        frame: None,
    };
    let (w, replayed) = configure_and_replays(&mut core, 4, request, t0);
    // Every other worker gets it at once, shared or not, and keeps taking requests.
    assert_eq!(replayed, vec![if w == 1 { 2 } else { 1 }]);
    assert!(replayed.contains(&busy) || w == busy);
    let mut fx = Vec::new();
    assert_eq!(
        execute(&mut core, 5, Mode::Anonymous, t0, &mut fx),
        Acquired::Now(5)
    );
    core.audit().unwrap();
}

/// A recorded request's arguments are read once, when it enters the pool (on the thread that
/// submitted it: a dirty scheduler for large ones), never again when its reply is read (on
/// whichever thread reads it). Shown here by members given with the request, which the pool
/// then trusts over its arguments' text: a session's `configure_lm` whose members say
/// "global" is replayed to the other worker.
#[test]
fn a_recorded_request_is_read_when_it_enters_the_pool_not_at_its_reply() {
    let (mut core, t0) = started(2, Some(4), None, Duration::from_secs(30));
    let request = Request {
        command: "configure_lm".into(),
        args: br#"{"session_id":"s","provider":"dummy"}"#.to_vec(),
        timeout: Duration::from_secs(5),
        members: dspex_pool_core::json::RawObject::parse(br#"{"provider":"dummy"}"#),
        frame: None,
    };
    let (w, replayed) = configure_and_replays(&mut core, 1, request, t0);
    assert_eq!(replayed, vec![if w == 1 { 2 } else { 1 }]);
    core.audit().unwrap();
}

/// A request's frame is built as it enters the pool (on the submitting thread); a queued one
/// is sent as built, its id set, wherever it leaves the queue (here: the step that reads the
/// reply freeing the worker), with no encoding of its arguments there. Shown by a frame given
/// with the request, which is what the worker receives. And a request too large for a frame is
/// refused at once, not after waiting in the queue.
#[test]
fn a_queued_request_is_sent_as_built_when_it_entered_and_an_oversized_one_is_refused_at_once() {
    let (mut core, t0) = started(1, None, None, Duration::from_secs(30));
    let mut fx = Vec::new();
    execute(&mut core, 1, Mode::Anonymous, t0, &mut fx);
    let (w, id) = requests(&fx)[0];
    let built = dspex_pool_core::frame::encode_request_template(
        "sleep",
        br#"{"marker":"built when submitted"}"#,
        usize::MAX,
    )
    .unwrap();
    let mut fx = Vec::new();
    let event = Event::Acquire {
        lease: 2,
        mode: Mode::Anonymous,
        once: Some(Request {
            command: "sleep".into(),
            args: br#"{"marker":"args"}"#.to_vec(),
            timeout: Duration::from_secs(5),
            members: None,
            frame: Some(built),
        }),
        reply: 2,
        pool_timeout: Duration::from_secs(5),
        owner: 2,
    };
    assert!(matches!(
        core.step(event, t0, &mut fx),
        Outcome::Acquired(Ok(Acquired::Queued(2)))
    ));
    let too_big = Event::Acquire {
        lease: 3,
        mode: Mode::Anonymous,
        once: Some(Request {
            command: "sleep".into(),
            args: format!(
                r#"{{"x":"{}"}}"#,
                "y".repeat(PoolConfig::default().max_frame_size)
            )
            .into_bytes(),
            timeout: Duration::from_secs(5),
            members: None,
            frame: None,
        }),
        reply: 3,
        pool_timeout: Duration::from_secs(5),
        owner: 3,
    };
    assert!(matches!(
        core.step(too_big, t0, &mut fx),
        Outcome::Acquired(Err(PoolError::InvalidArgs(_)))
    ));
    let mut fx = Vec::new();
    core.step(frame(w, id, Ok(b"{}")), t0, &mut fx);
    let sent = written(&fx);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1["args"]["marker"], "built when submitted");
    assert!(sent[0].1["id"].as_u64().unwrap() > id);
    core.audit().unwrap();
}
