//! The model test: random sequences of events against the core, with invariants checked after
//! every step.
//!
//! A small simulated world plays the executor and the workers: it performs the effects (a
//! spawn becomes a process that may later be reported spawned, a write becomes requests the
//! process may answer well, badly, or not at all, a signal makes it die) and a seeded
//! generator picks the next event: acquire in every mode, call, release, owner death,
//! good/garbage/wrong-id frames, exits, spawn failures, end_session, stop, time passing. Every
//! sequence ends with a stop and a drive to quiescence.
//!
//! Checked after every step: the core's own audit (no worker leased twice, no idle worker with
//! a request in flight, no idle worker while a caller waits for any, the queue and the owner
//! index in step with the leases, sizes within pool_size/max_overflow); every reply handle is
//! answered at most once; an execute lease that was not released gets a reply; no `:strict`
//! session is reported lost unless its home worker died; anonymous waiters are served in FIFO
//! order; the status counts agree with the state. At the end: the pool has finished and
//! every reply handle was answered.
//!
//! Runs `MODEL_CASES` sequences (default 1,500) of `MODEL_STEPS` steps (default 250) from a
//! fixed seed. A failure prints the seed of the failing sequence: replay it alone with
//! `MODEL_SEED=<seed> cargo test -p dspex_pool_core --test model -- --nocapture`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dspex_pool_core::frame::Response;
use dspex_pool_core::{
    Acquired, Core, Delivery, Effect, Event, ExitInfo, Mode, Outcome, PoolConfig, PoolError,
    Request, Signal,
};

/// How often the sequences reached what protocol v2 added (checked over the whole run, so a
/// generator change that stops reaching them fails the test).
static SHARED_SEEN: AtomicU64 = AtomicU64::new(0);
static EVENTS_SEEN: AtomicU64 = AtomicU64::new(0);
static CANCELS_SEEN: AtomicU64 = AtomicU64::new(0);
static CONTROLS_SEEN: AtomicU64 = AtomicU64::new(0);

/// xorshift64*: small, seedable, good enough to pick events.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }
}

type Token = u64;

#[derive(Default)]
struct Proc {
    /// Requests written to it and not yet answered: (id, command, the caller's token if any).
    written: VecDeque<(u64, String, Option<Token>, bool)>,
    /// Signalled or asked to shut down: it will exit.
    dying: bool,
    /// Speaks protocol v2: announces this concurrency, answers in any order, sends events.
    v2: Option<u32>,
    /// Ids it was told to cancel (it may still answer them: late replies).
    cancelled: HashSet<u64>,
}

struct LeaseInfo {
    execute: bool,
    mode: Mode,
    owner: u64,
}

struct World {
    rng: Rng,
    core: Core<Token>,
    now: Instant,
    log: Vec<String>,
    /// Spawn effects not yet answered by Spawned/SpawnFailed.
    to_spawn: Vec<u64>,
    procs: HashMap<u64, Proc>,
    /// Workers killed by the pool or crashed: the only ones whose strict sessions may be lost.
    died: HashSet<u64>,
    next_lease: u64,
    next_token: Token,
    /// Reply handles not answered yet, with their lease.
    open_tokens: HashMap<Token, u64>,
    answered: HashSet<Token>,
    /// Tokens of execute requests that must end in a delivery (not a discard).
    must_deliver: HashSet<Token>,
    leases: HashMap<u64, LeaseInfo>,
    released: HashSet<u64>,
    /// Anonymous leases in the order they were queued, and those ever served.
    anon_queue: Vec<u64>,
    served: HashSet<u64>,
    strict_home: HashMap<String, u64>,
    /// Percent of processes that speak protocol v2.
    v2_share: u64,
}

const SESSIONS: [&str; 3] = ["s1", "s2", "s3"];
const COMMANDS: [&str; 6] = [
    "echo",
    "create_program",
    "execute_program",
    "configure_lm",
    "cleanup",
    "delete_program",
];

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng::new(seed);
        let config = PoolConfig {
            pool_size: 1 + rng.below(2) as usize,
            max_overflow: rng.below(3).max(rng.below(3)) as usize,
            lazy: rng.chance(30),
            max_frame_size: 1 << 20,
            start_timeout: Duration::from_millis(100 + rng.below(900)),
            overflow_idle: Duration::from_millis(20 + rng.below(200)),
            affinity_wait: Duration::from_millis(rng.below(30)),
            shutdown_grace: Duration::from_millis(50 + rng.below(200)),
            worker_concurrency: match rng.below(3) {
                0 => None,
                _ => Some(1 + rng.below(4) as u32),
            },
            heartbeat_timeout: Duration::from_millis(200 + rng.below(3000)),
        };
        let v2_share = [0, 50, 100][rng.below(3) as usize];
        let now = Instant::now();
        let mut fx = Vec::new();
        let core = Core::new(config.clone(), now, &mut fx);
        let mut w = World {
            rng,
            core,
            now,
            log: vec![format!("config {config:?}")],
            to_spawn: Vec::new(),
            procs: HashMap::new(),
            died: HashSet::new(),
            next_lease: 1,
            next_token: 1,
            open_tokens: HashMap::new(),
            answered: HashSet::new(),
            must_deliver: HashSet::new(),
            leases: HashMap::new(),
            released: HashSet::new(),
            anon_queue: Vec::new(),
            served: HashSet::new(),
            strict_home: HashMap::new(),
            v2_share,
        };
        w.perform(fx, &HashMap::new()).unwrap();
        w
    }

    fn token(&mut self, lease: u64) -> Token {
        let t = self.next_token;
        self.next_token += 1;
        self.open_tokens.insert(t, lease);
        t
    }

    fn request(&mut self, mode: &Mode, token: Token) -> Request {
        let command = *self.rng.pick(&COMMANDS).unwrap();
        let session = match mode {
            Mode::Session { id, .. } => serde_json::Value::String(id.to_string()),
            Mode::Anonymous => serde_json::Value::Null,
        };
        let args = serde_json::json!({
            "session_id": session, "id": "p", "program_id": "p", "provider": "dummy",
            "token": token
        });
        let timeout = match self.rng.below(4) {
            0 => Duration::ZERO,
            1 => Duration::from_millis(5),
            _ => Duration::from_millis(500),
        };
        Request {
            command: command.into(),
            args: serde_json::to_vec(&args).unwrap(),
            timeout,
            members: None,
            frame: None,
        }
    }

    /// Picks and applies one event.
    fn random_step(&mut self) -> Result<(), String> {
        // Each session's home, when the session lives there as `:strict` (remembered until the
        // session ends or is reported lost).
        for s in SESSIONS {
            if let Some(h) = self.core.strict_home_of(s) {
                if self.core.strict_sessions(h).iter().any(|x| &**x == s) {
                    self.strict_home.insert(s.to_string(), h);
                }
            }
        }
        let homes_before: HashMap<String, Option<u64>> = SESSIONS
            .iter()
            .map(|s| (s.to_string(), self.strict_home.get(*s).copied()))
            .collect();
        let event = self.random_event();
        let Some(event) = event else { return Ok(()) };
        self.apply(event, &homes_before)
    }

    fn random_event(&mut self) -> Option<Event<Token>> {
        let live: Vec<u64> = {
            let mut v: Vec<u64> = self.procs.keys().copied().collect();
            v.sort_unstable();
            v
        };
        let talking: Vec<u64> = live
            .iter()
            .copied()
            .filter(|w| !self.procs[w].written.is_empty())
            .collect();
        let mut leases: Vec<u64> = self.leases.keys().copied().collect();
        leases.sort_unstable();
        match self.rng.below(100) {
            0..=21 => {
                let lease = self.next_lease;
                self.next_lease += 1;
                let mode = match self.rng.below(3) {
                    0 => Mode::Anonymous,
                    _ => Mode::Session {
                        id: Arc::from(*self.rng.pick(&SESSIONS).unwrap()),
                        strict: self.rng.chance(45),
                    },
                };
                let reply = self.token(lease);
                let once = self.rng.chance(70).then(|| self.request(&mode, reply));
                let pool_timeout = match self.rng.below(4) {
                    0 => Duration::ZERO,
                    1 => Duration::from_millis(3),
                    2 => Duration::from_millis(50),
                    _ => Duration::from_secs(2),
                };
                let owner = 1 + self.rng.below(4);
                if once.is_some() {
                    self.must_deliver.insert(reply);
                }
                self.leases.insert(
                    lease,
                    LeaseInfo {
                        execute: once.is_some(),
                        mode: mode.clone(),
                        owner,
                    },
                );
                Some(Event::Acquire {
                    lease,
                    mode,
                    once,
                    reply,
                    pool_timeout,
                    owner,
                })
            }
            22..=29 => {
                let checkouts: Vec<u64> = leases
                    .iter()
                    .copied()
                    .filter(|l| !self.leases[l].execute)
                    .collect();
                let lease = *self.rng.pick(&checkouts)?;
                let mode = self.leases[&lease].mode.clone();
                let reply = self.token(lease);
                let request = self.request(&mode, reply);
                Some(Event::Call {
                    lease,
                    request,
                    reply,
                })
            }
            30..=35 => {
                let lease = *self.rng.pick(&leases)?;
                self.mark_released(lease);
                Some(Event::Release { lease })
            }
            36..=37 => {
                let owner = 1 + self.rng.below(4);
                let theirs: Vec<u64> = leases
                    .iter()
                    .copied()
                    .filter(|l| self.leases[l].owner == owner)
                    .collect();
                for l in theirs {
                    self.mark_released(l);
                }
                Some(Event::ReleaseOwner { owner })
            }
            38..=40 => {
                let session = self.rng.pick(&SESSIONS).unwrap().to_string();
                self.strict_home.remove(&session);
                Some(Event::EndSession { session })
            }
            41 => self.rng.chance(20).then_some(Event::Stop),
            42..=49 => {
                let i = self.rng.below(self.to_spawn.len().max(1) as u64) as usize;
                if i >= self.to_spawn.len() {
                    return None;
                }
                let worker = self.to_spawn.remove(i);
                if self.rng.chance(15) {
                    Some(Event::SpawnFailed {
                        worker,
                        reason: "python3: not found".into(),
                    })
                } else {
                    let v2 = self
                        .rng
                        .chance(self.v2_share)
                        .then(|| 1 + self.rng.below(5) as u32);
                    self.procs.insert(
                        worker,
                        Proc {
                            v2,
                            ..Proc::default()
                        },
                    );
                    Some(Event::Spawned {
                        worker,
                        pid: Some(1000 + worker as u32),
                    })
                }
            }
            50..=74 => {
                let worker = *self.rng.pick(&talking)?;
                let proc = self.procs.get_mut(&worker)?;
                let v2 = proc.v2;
                // A v2 worker answers in any order; a v1 worker in order.
                let at = match v2 {
                    Some(_) => self.rng.below(proc.written.len() as u64) as usize,
                    None => 0,
                };
                let (id, command, token, _) = proc.written.get(at).cloned()?;
                let event = v2.is_some() && command != "shutdown" && self.rng.chance(20);
                if !event {
                    proc.written.remove(at);
                }
                if command == "shutdown" {
                    self.procs.get_mut(&worker)?.dying = true;
                    return None;
                }
                let echo = |extra: &str| {
                    Bytes::from(match token {
                        Some(t) => format!(r#"{{"program_id":"p","token":{t}{extra}}}"#),
                        None => format!(r#"{{"program_id":"p"{extra}}}"#),
                    })
                };
                let frame = if event {
                    Ok(Response {
                        id,
                        outcome: Ok(echo(r#","event":"chunk""#)),
                        event: true,
                    })
                } else if command == "ping" && v2.is_some() && self.rng.chance(90) {
                    let hello = format!(
                        r#"{{"status":"ok","protocol":2,"concurrency":{}}}"#,
                        v2.unwrap()
                    );
                    Ok(Response {
                        id,
                        outcome: Ok(Bytes::from(hello)),
                        event: false,
                    })
                } else {
                    match self.rng.below(100) {
                        0..=2 => Err(PoolError::Decode("garbage".into())),
                        3..=5 => Ok(Response {
                            id: id + 1000,
                            outcome: Ok(Bytes::from_static(b"{}")),
                            event: false,
                        }),
                        6..=12 => Ok(Response {
                            id,
                            outcome: Err(PoolError::Python("boom".into())),
                            event: false,
                        }),
                        _ => Ok(Response {
                            id,
                            outcome: Ok(echo("")),
                            event: false,
                        }),
                    }
                };
                Some(Event::Frame { worker, frame })
            }
            75..=77 => {
                let worker = *self.rng.pick(&live)?;
                Some(Event::StreamError {
                    worker,
                    error: PoolError::Decode("not a frame".into()),
                })
            }
            88..=89 => {
                // A control frame for some lease (held or not, in flight or not).
                let lease = *self.rng.pick(&leases)?;
                let body = if self.rng.chance(80) {
                    br#"{"control":"tool_result","call_id":1,"ok":true,"result":2}"#.to_vec()
                } else {
                    b"[1]".to_vec()
                };
                Some(Event::Control { lease, body })
            }
            78..=79 => {
                let worker = *self.rng.pick(&live)?;
                self.procs.get_mut(&worker)?.dying = true;
                Some(Event::WriteFailed { worker })
            }
            80..=87 => {
                // An exit: usually of a process that was told to die, sometimes a crash.
                let dying: Vec<u64> = live
                    .iter()
                    .copied()
                    .filter(|w| self.procs[w].dying)
                    .collect();
                let worker = match self.rng.pick(&dying) {
                    Some(w) => *w,
                    None if self.rng.chance(30) => *self.rng.pick(&live)?,
                    None => return None,
                };
                Some(self.exit(worker))
            }
            _ => {
                let ms = match self.rng.below(4) {
                    0 => 0,
                    1 => self.rng.below(5),
                    2 => self.rng.below(60),
                    _ => self.rng.below(1500),
                };
                self.now += Duration::from_millis(ms);
                Some(Event::Tick)
            }
        }
    }

    fn exit(&mut self, worker: u64) -> Event<Token> {
        let proc = self.procs.remove(&worker).unwrap();
        if !proc.dying {
            self.died.insert(worker);
        }
        Event::Exited {
            worker,
            exit: ExitInfo::Code(if proc.dying { 0 } else { 1 }),
            stderr: "Traceback: boom".into(),
        }
    }

    fn mark_released(&mut self, lease: u64) {
        self.released.insert(lease);
        let tokens: Vec<Token> = self
            .open_tokens
            .iter()
            .filter(|(_, l)| **l == lease)
            .map(|(t, _)| *t)
            .collect();
        for t in tokens {
            self.must_deliver.remove(&t);
        }
    }

    fn apply(
        &mut self,
        event: Event<Token>,
        homes_before: &HashMap<String, Option<u64>>,
    ) -> Result<(), String> {
        let desc = describe(&event);
        self.log.push(desc);
        let (lease_acquired, acquire_mode) = match &event {
            Event::Acquire { lease, mode, .. } => (Some(*lease), Some(mode.clone())),
            _ => (None, None),
        };
        let token = match &event {
            Event::Acquire { reply, .. } | Event::Call { reply, .. } => Some(*reply),
            _ => None,
        };
        let mut fx = Vec::new();
        let outcome = self.core.step(event, self.now, &mut fx);
        let strict_homes: Vec<_> = SESSIONS
            .iter()
            .filter_map(|s| self.core.strict_home_of(s).map(|h| format!("{s}@{h}")))
            .collect();
        if let Some(l) = self.log.last_mut() {
            l.push_str(&format!(
                " -> {outcome:?} [strict {}]",
                strict_homes.join(" ")
            ));
        }
        if let (Outcome::Acquired(Err(_)) | Outcome::Called(Err(_)), Some(t)) = (&outcome, token) {
            // The error is the answer (the handle is discarded).
            self.must_deliver.remove(&t);
        }
        match &outcome {
            Outcome::Acquired(Err(PoolError::SessionLost(s))) => {
                self.check_lost(s, homes_before)?;
            }
            Outcome::Acquired(Ok(Acquired::Queued(l))) if acquire_mode == Some(Mode::Anonymous) => {
                self.anon_queue.push(*l);
            }
            Outcome::Acquired(Err(_)) => {
                if let Some(l) = lease_acquired {
                    self.leases.remove(&l);
                }
            }
            _ => {}
        }
        self.perform(fx, homes_before)?;
        self.check()
    }

    fn check_lost(
        &mut self,
        s: &str,
        homes_before: &HashMap<String, Option<u64>>,
    ) -> Result<(), String> {
        self.strict_home.remove(s);
        match homes_before.get(s).copied().flatten() {
            Some(home) if !self.died.contains(&home) => Err(format!(
                "strict session {s} lost although its worker {home} did not die"
            )),
            _ => Ok(()),
        }
    }

    fn perform(
        &mut self,
        fx: Vec<Effect<Token>>,
        homes_before: &HashMap<String, Option<u64>>,
    ) -> Result<(), String> {
        for effect in fx {
            match effect {
                Effect::Spawn { worker } => self.to_spawn.push(worker),
                Effect::Write { worker, bytes } => {
                    let Some(proc) = self.procs.get_mut(&worker) else {
                        return Err(format!("write to worker {worker}, which has no process"));
                    };
                    let mut rest = &bytes[..];
                    while !rest.is_empty() {
                        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                        let v: serde_json::Value = serde_json::from_slice(&rest[4..4 + len])
                            .map_err(|e| format!("bad frame written: {e}"))?;
                        let id = v["id"].as_u64().ok_or("frame without id")?;
                        rest = &rest[4 + len..];
                        if let Some(control) = v["control"].as_str() {
                            if proc.v2.is_none() {
                                return Err(format!("control frame {v} to a v1 worker"));
                            }
                            if control == "cancel" && !proc.cancelled.insert(id) {
                                return Err(format!("request {id} cancelled twice"));
                            }
                            let counter = if control == "cancel" {
                                &CANCELS_SEEN
                            } else {
                                &CONTROLS_SEEN
                            };
                            counter.fetch_add(1, Relaxed);
                            continue;
                        }
                        let cmd = v["command"].as_str().ok_or("frame without command")?;
                        // A global configure_lm is replayed on other workers as a chore, with
                        // its caller's arguments: not a caller's request there.
                        let global = cmd == "configure_lm" && v["args"]["session_id"].is_null();
                        let token = v["args"]["token"].as_u64();
                        proc.written.push_back((id, cmd.to_owned(), token, global));
                        let in_flight = proc
                            .written
                            .iter()
                            .filter(|(i, _, t, g)| t.is_some() && !g && !proc.cancelled.contains(i))
                            .count() as u32;
                        if in_flight > proc.v2.unwrap_or(1) {
                            return Err(format!(
                                "worker {worker} has {in_flight} callers' requests, more than it announced: {:?} {:?} cancelled {:?}", proc.v2, proc.written, proc.cancelled
                            ));
                        }
                    }
                }
                Effect::Signal { worker, signal } => {
                    if let Some(p) = self.procs.get_mut(&worker) {
                        p.dying = true;
                        if signal == Signal::Kill {
                            self.died.insert(worker);
                        }
                    }
                }
                Effect::Event { lease, body } => {
                    EVENTS_SEEN.fetch_add(1, Relaxed);
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let holder = self.core.reply_of(lease).copied();
                    if holder.is_none() || v["token"].as_u64() != holder {
                        return Err(format!(
                            "event {v} for lease {lease} whose reply handle is {holder:?}"
                        ));
                    }
                }
                Effect::Deliver { to, delivery } => {
                    if let Delivery::Reply(Ok(json)) = &delivery {
                        let v: serde_json::Value = serde_json::from_slice(json).unwrap();
                        if let Some(t) = v["token"].as_u64() {
                            if t != to {
                                return Err(format!("the reply of {t} delivered to {to}"));
                            }
                        }
                    }
                    self.answer(to)?;
                    if let Delivery::Reply(Err(PoolError::SessionLost(s))) = &delivery {
                        self.check_lost(s, homes_before)?;
                    }
                    let lease = self.open_tokens.remove(&to);
                    if let (Some(l), Delivery::Reply(_)) = (lease, &delivery) {
                        if self.leases.get(&l).is_some_and(|i| i.execute) {
                            self.leases.remove(&l);
                        }
                    }
                    self.must_deliver.remove(&to);
                }
                Effect::Discard(to) => {
                    self.answer(to)?;
                    if self.must_deliver.contains(&to) {
                        return Err(format!("execute reply {to} discarded, never answered"));
                    }
                    self.open_tokens.remove(&to);
                }
                Effect::Log { .. } | Effect::WorkerStarted { .. } | Effect::WorkerExited { .. } => {
                }
                Effect::Stopped => {}
            }
        }
        Ok(())
    }

    fn answer(&mut self, token: Token) -> Result<(), String> {
        if !self.answered.insert(token) {
            return Err(format!("reply handle {token} answered twice"));
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), String> {
        self.core.audit()?;
        if self
            .core
            .worker_ids()
            .iter()
            .any(|w| self.core.load_of(*w).is_some_and(|(n, _)| n > 1))
        {
            SHARED_SEEN.fetch_add(1, Relaxed);
        }
        // Leases the core no longer knows are over.
        let gone: Vec<u64> = self
            .leases
            .keys()
            .copied()
            .filter(|l| !self.core.is_queued(*l) && !self.core.holds_worker(*l))
            .filter(|l| !self.open_tokens.values().any(|x| x == l))
            .collect();
        for l in gone {
            self.leases.remove(&l);
        }
        // FIFO among anonymous waiters: none is served while an earlier one still waits.
        // A shared worker takes executes only, so an execute may pass a queued checkout.
        let (mut waiting_earlier, mut execute_waiting_earlier) = (false, false);
        for &l in &self.anon_queue {
            let queued = self.core.is_queued(l);
            let execute = self.leases.get(&l).is_some_and(|i| i.execute);
            let newly_served = !queued && self.core.holds_worker(l) && self.served.insert(l);
            let passed = if execute {
                execute_waiting_earlier
            } else {
                waiting_earlier
            };
            if newly_served && passed {
                return Err(format!(
                    "anonymous lease {l} served before an earlier waiter"
                ));
            }
            waiting_earlier |= queued;
            execute_waiting_earlier |= queued && execute;
        }
        let s = self.core.status();
        if s.queued + self.leases_holding() > s.open_leases {
            return Err(format!("status counts out of step: {s:?}"));
        }
        Ok(())
    }

    fn leases_holding(&self) -> usize {
        self.leases
            .keys()
            .filter(|l| self.core.holds_worker(**l))
            .count()
    }

    /// Stops the pool and lets everything settle: processes exit, time passes.
    fn finish(&mut self) -> Result<(), String> {
        let none = HashMap::new();
        self.apply(Event::Stop, &none)?;
        for _ in 0..200 {
            if self.core.finished() {
                break;
            }
            if let Some(worker) = self.to_spawn.pop() {
                self.procs.insert(worker, Proc::default());
                self.apply(Event::Spawned { worker, pid: None }, &none)?;
                continue;
            }
            let mut dying: Vec<u64> = self
                .procs
                .iter()
                .filter(|(_, p)| p.dying)
                .map(|(w, _)| *w)
                .collect();
            dying.sort_unstable();
            if let Some(w) = dying.first() {
                let ev = self.exit(*w);
                self.apply(ev, &none)?;
                continue;
            }
            self.now += Duration::from_secs(3600);
            self.apply(Event::Tick, &none)?;
        }
        if !self.core.finished() {
            return Err(format!(
                "the pool did not finish after stop: {:?} workers {:?}",
                self.core.status(),
                self.core.worker_ids()
            ));
        }
        if !self.must_deliver.is_empty() || !self.open_tokens.is_empty() {
            let mut open: Vec<_> = self.open_tokens.iter().collect();
            open.sort();
            return Err(format!("unanswered after stop: {open:?}"));
        }
        Ok(())
    }
}

fn describe(event: &Event<Token>) -> String {
    match event {
        Event::Acquire {
            lease,
            mode,
            once,
            pool_timeout,
            owner,
            ..
        } => format!(
            "acquire lease {lease} {mode:?} {} pool_timeout {pool_timeout:?} owner {owner}",
            once.as_ref().map_or("checkout".to_string(), |r| format!(
                "{} {:?}",
                r.command, r.timeout
            ))
        ),
        Event::Call { lease, request, .. } => format!("call {lease} {}", request.command),
        Event::Frame { worker, frame } => format!("frame from {worker}: {frame:?}"),
        other => format!("{other:?}"),
    }
}

fn run_case(seed: u64, steps: usize) -> Result<(), (String, Vec<String>)> {
    let mut w = World::new(seed);
    for _ in 0..steps {
        w.random_step().map_err(|e| (e, w.log.clone()))?;
    }
    w.finish().map_err(|e| (e, w.log.clone()))
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_event_sequences_keep_the_invariants() {
    let steps = env("MODEL_STEPS").unwrap_or(250) as usize;
    let seeds: Vec<u64> = match env("MODEL_SEED") {
        Some(seed) => vec![seed],
        None => {
            let cases = env("MODEL_CASES").unwrap_or(1500);
            (0..cases).map(|i| 0x5EED_0000 + i).collect()
        }
    };
    let full_run = env("MODEL_SEED").is_none();
    for seed in seeds {
        if let Err((why, log)) = run_case(seed, steps) {
            let tail: Vec<&String> = log.iter().rev().take(40).collect();
            let tail: Vec<&String> = tail.into_iter().rev().collect();
            panic!(
                "seed {seed}: {why}\nreplay: MODEL_SEED={seed} cargo test -p dspex_pool_core \
                 --test model -- --nocapture\nlast events:\n{}",
                tail.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    if full_run {
        let seen = [
            ("a worker running several requests", &SHARED_SEEN),
            ("intermediate events", &EVENTS_SEEN),
            ("cancels", &CANCELS_SEEN),
            ("control frames", &CONTROLS_SEEN),
        ];
        for (what, n) in seen {
            eprintln!("{what}: {}", n.load(Relaxed));
            assert!(n.load(Relaxed) > 10, "the sequences never reached {what}");
        }
    }
}
