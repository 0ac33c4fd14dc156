//! The NIF boundary: decode arguments, call the pool, encode results. Nothing here blocks:
//! replies travel as `{ref, result}` messages from the runtime's threads.

use std::path::PathBuf;
use std::time::Duration;

use rustler::env::SavedTerm;
use rustler::{Atom, Encoder, Env, LocalPid, NifResult, OwnedEnv, Resource, ResourceArc, Term};

use std::sync::Arc;

use crate::beam_poll::{in_nif, off_scheduler, BeamPoller, BeamWatch};
use crate::checkout::{CheckoutHandle, Shared, LIVE};
use crate::error::{PoolError, Reason};
use crate::pool::{Acquired, Delivery, EventSink, Mode, Pool, PoolConfig, ReplySink, Request};
use crate::reader::Watch;
use crate::term::EncodeError;
use crate::worker::PythonSpawner;

mod atoms {
    rustler::atoms! {
        ok, error, queued, anonymous, session, strict, nil,
        fork_server, dspex_native_pool_event, worker_started, worker_exited, stopped,
        pool_size, max_overflow, ready, busy, starting, overflow, queued_callers, native_sessions, open_leases,
        last_start_error, counters, worker_pids, requests, errors, timeouts, pool_timeouts,
        recycled, worker_starts, start_failures, restores, pid, start_ms, reason,
        dirty, structs, event, in_flight, capacity, cancelled, wait,
    }
}

pub fn load(env: Env, _info: Term) -> bool {
    crate::runtime::handle();
    crate::beam_poll::load(env)
}

pub struct PoolResource {
    pub shared: Arc<Shared>,
}

#[rustler::resource_impl]
impl Resource for PoolResource {}

/// What a caller receives for a delivery: `:ok`, `{:ok, term}` or `{:error, reason}`.
fn payload<'a>(env: Env<'a>, delivery: &Delivery) -> Term<'a> {
    match delivery {
        Delivery::Assigned => atoms::ok().encode(env),
        Delivery::Reply(Ok(json)) => match crate::term::json_to_term(env, json) {
            Ok(term) => (atoms::ok(), term).encode(env),
            Err(e) => {
                let e = PoolError::Decode(e.to_string());
                (atoms::error(), Reason(&e)).encode(env)
            }
        },
        Delivery::Reply(Err(e)) => (atoms::error(), Reason(e)).encode(env),
    }
}

/// Where a caller waits: its pid and the reference its `receive` matches.
///
/// A sink dropped without delivering (the pool went away with the request) still answers,
/// with `{:checkout_failed, _}`, so no caller waits for a reply that cannot come.
struct BeamReply {
    to: Option<(LocalPid, OwnedEnv, SavedTerm)>,
    /// The lease the request belongs to: intermediate events name it, for `control/3`.
    lease: u64,
    /// The caller's `receive` handles `{ref, {:"$dspex_readable", worker, lease}}` by calling
    /// `read/3`: the worker's stdout may be armed for it.
    reads: bool,
}

impl BeamReply {
    fn new(env: Env, reference: Term, lease: u64, reads: bool) -> BeamReply {
        let owned = OwnedEnv::new();
        let saved = owned.save(reference);
        BeamReply {
            to: Some((env.pid(), owned, saved)),
            lease,
            reads,
        }
    }

    fn send(&mut self, delivery: Delivery) {
        let Some((pid, env, reference)) = self.to.take() else {
            return;
        };
        let Some(delivery) = crate::beam_poll::capture(&pid, self.lease, delivery) else {
            return;
        };
        crate::beam_poll::send(env, pid, self.lease, move |env| {
            (reference.load(env), payload(env, &delivery)).encode(env)
        });
    }
}

impl ReplySink for BeamReply {
    fn deliver(mut self: Box<Self>, delivery: Delivery) {
        self.send(delivery);
    }

    fn discard(mut self: Box<Self>) {
        self.to = None;
    }

    /// `{ref, {:event, lease, map}}` to the caller; the reply is still to come.
    fn event(&self, body: bytes::Bytes) -> Option<Box<dyn FnOnce() + Send>> {
        let (pid, env, saved) = self.to.as_ref()?;
        // The reference, copied out of the reply's env (a few bytes).
        let reference = env.run(|e| saved.load(e).to_binary().as_slice().to_vec());
        let (pid, lease) = (*pid, self.lease);
        Some(Box::new(move || {
            crate::beam_poll::send(OwnedEnv::new(), pid, lease, move |env| {
                let r = match env.binary_to_term(&reference) {
                    Some((r, _)) => r,
                    None => atoms::nil().encode(env),
                };
                let payload = match crate::term::json_to_term(env, &body) {
                    Ok(map) => (atoms::event(), lease, map).encode(env),
                    Err(e) => {
                        let e = PoolError::Decode(e.to_string());
                        (atoms::event(), lease, (atoms::error(), Reason(&e))).encode(env)
                    }
                };
                (r, payload).encode(env)
            });
        }))
    }

    fn reads_itself(&self) -> bool {
        self.reads && self.to.is_some()
    }

    fn arm(&self, watch: &dyn Watch, worker: u64) -> bool {
        let Some((pid, env, saved)) = &self.to else {
            return false;
        };
        let Some(watch) = watch.as_any().downcast_ref::<BeamWatch>() else {
            return false;
        };
        // Built in the reply's own env (a few words, freed with it); ERTS copies it.
        env.run(|e| {
            let msg = crate::beam_poll::readable(e, saved.load(e), worker, self.lease);
            watch.select(pid, msg)
        })
    }
}

impl Drop for BeamReply {
    fn drop(&mut self) {
        let gone = PoolError::CheckoutFailed("the pool stopped before answering".into());
        self.send(Delivery::Reply(Err(gone)));
    }
}

struct BeamEvents {
    owner: LocalPid,
    logs: Arc<crate::logs::Batcher>,
}

impl BeamEvents {
    fn send(&self, build: impl for<'a> FnOnce(Env<'a>) -> Term<'a> + Send + 'static) {
        let owner = self.owner;
        off_scheduler(move || {
            let _ = OwnedEnv::new().send_and_clear(&owner, build);
        });
    }
}

impl EventSink for BeamEvents {
    fn log(&self, worker: u64, level: &'static str, line: String) {
        self.logs.push(worker, level, line);
    }

    fn worker_started(&self, worker: u64, pid: Option<u32>, start_ms: u64) {
        self.send(move |env| {
            let meta = Term::map_from_pairs(
                env,
                &[
                    (atoms::pid().encode(env), pid.encode(env)),
                    (atoms::start_ms().encode(env), start_ms.encode(env)),
                ],
            )
            .unwrap();
            (
                atoms::dspex_native_pool_event(),
                atoms::worker_started(),
                worker,
                meta,
            )
                .encode(env)
        });
    }

    fn worker_exited(&self, worker: u64, reason: String) {
        self.send(move |env| {
            let meta =
                Term::map_from_pairs(env, &[(atoms::reason().encode(env), reason.encode(env))])
                    .unwrap();
            (
                atoms::dspex_native_pool_event(),
                atoms::worker_exited(),
                worker,
                meta,
            )
                .encode(env)
        });
    }

    fn stopped(&self) {
        self.send(|env| (atoms::dspex_native_pool_event(), atoms::stopped()).encode(env));
    }
}

#[derive(rustler::NifMap)]
struct Config {
    pool_size: usize,
    max_overflow: usize,
    lazy: bool,
    max_frame_size: usize,
    start_timeout: u64,
    overflow_idle_timeout: u64,
    affinity_wait: u64,
    shutdown_grace: u64,
    worker_concurrency: Option<u32>,
    heartbeat_timeout: u64,
    python: String,
    script: String,
    worker_args: Vec<String>,
    env: Vec<(String, String)>,
    start_method: Atom,
    fork_server: String,
    /// The process that reads workers' stdout when no caller does (`drain/2`).
    reader: LocalPid,
}

#[rustler::nif]
fn pool_start(env: Env, config: Config) -> Term {
    let pool_config = PoolConfig {
        pool_size: config.pool_size,
        max_overflow: config.max_overflow,
        lazy: config.lazy,
        max_frame_size: config.max_frame_size,
        start_timeout: Duration::from_millis(config.start_timeout),
        overflow_idle: Duration::from_millis(config.overflow_idle_timeout),
        affinity_wait: Duration::from_millis(config.affinity_wait),
        shutdown_grace: Duration::from_millis(config.shutdown_grace),
        worker_concurrency: config.worker_concurrency,
        heartbeat_timeout: Duration::from_millis(config.heartbeat_timeout.max(1)),
    };
    let mode = if config.start_method == atoms::fork_server() {
        crate::zygote::Mode::Fork
    } else {
        crate::zygote::Mode::Spawn
    };
    let spawner = PythonSpawner::new(
        PathBuf::from(config.python),
        PathBuf::from(config.script),
        config.worker_args,
        config.env,
        PathBuf::from(config.fork_server),
        mode,
    );
    let events = BeamEvents {
        owner: env.pid(),
        logs: crate::logs::for_owner(env.pid()),
    };
    let poller = BeamPoller {
        reader: config.reader,
    };
    let pool = Pool::start_polled(
        pool_config,
        Box::new(spawner),
        Box::new(events),
        Some(Box::new(poller)),
    );
    ResourceArc::new(PoolResource {
        shared: Shared::new(pool, config.max_frame_size),
    })
    .encode(env)
}

#[rustler::nif]
fn pool_stop(pool: ResourceArc<PoolResource>) -> Atom {
    pool.shared.pool.stop();
    atoms::ok()
}

fn decode_mode(term: Term) -> NifResult<Mode> {
    if let Ok(a) = term.decode::<Atom>() {
        if a == atoms::anonymous() {
            return Ok(Mode::Anonymous);
        }
    }
    if let Ok((tag, id)) = term.decode::<(Atom, String)>() {
        if tag == atoms::session() {
            return Ok(Mode::Session {
                id: id.into(),
                strict: false,
            });
        }
    }
    if let Ok((tag, id, flag)) = term.decode::<(Atom, String, Atom)>() {
        if tag == atoms::session() && flag == atoms::strict() {
            return Ok(Mode::Session {
                id: id.into(),
                strict: true,
            });
        }
    }
    Err(rustler::Error::BadArg)
}

fn decode_command(term: Term) -> NifResult<String> {
    if term.is_atom() {
        return term.atom_to_string();
    }
    term.decode::<String>()
}

/// On a normal scheduler a NIF must stay short: arguments whose JSON outgrows this budget are
/// encoded again by the `_dirty` variant of the NIF, on a dirty CPU scheduler.
const SCHEDULER_BUDGET: usize = 64 * 1024;

/// Where arguments are encoded: on the calling (normal) scheduler within
/// [`SCHEDULER_BUDGET`], or on a dirty one, within the frame limit only.
#[derive(Clone, Copy, PartialEq)]
enum Scheduler {
    Normal,
    Dirty,
}

/// What became of a request's arguments.
enum Args {
    Json(Vec<u8>),
    Invalid(PoolError),
    /// Too large for a normal scheduler: the NIF returns `:dirty`.
    OverBudget,
    /// The arguments hold structs: the NIF returns `:structs` and the Elixir side converts
    /// them (`DSPex.NativePool.Structs`) and calls again.
    Structs,
}

/// Encodes a request's arguments, refusing them as soon as the request would exceed
/// `max_frame` (before copying a binary that would, not after building the frame).
fn encode_args(args: Term, command: &str, max_frame: usize, on: Scheduler) -> Args {
    // `{"id":<u64>,"command":<command>,"args":` ... `}`
    let envelope = 48 + command.len();
    let frame_budget = max_frame.saturating_sub(envelope);
    let budget = match on {
        Scheduler::Normal => frame_budget.min(SCHEDULER_BUDGET),
        Scheduler::Dirty => frame_budget,
    };
    let mut out = Vec::with_capacity(128);
    match crate::term::write_json(args, &mut out, budget) {
        Ok(()) => Args::Json(out),
        Err(EncodeError::Invalid(msg)) => Args::Invalid(PoolError::InvalidArgs(msg)),
        Err(EncodeError::Struct(_)) => Args::Structs,
        Err(EncodeError::OverBudget) if on == Scheduler::Normal && budget < frame_budget => {
            Args::OverBudget
        }
        Err(EncodeError::OverBudget) => Args::Invalid(PoolError::InvalidArgs(format!(
            "the arguments are more than {frame_budget} bytes of JSON: the request would \
             exceed the pool's max_frame_size of {max_frame} bytes"
        ))),
    }
}

/// The NIF's answer when the arguments did not become JSON.
fn unencoded(env: Env, args: Args) -> Term {
    match args {
        Args::Json(_) => unreachable!("encoded"),
        Args::Invalid(e) => error(env, e),
        Args::OverBudget => atoms::dirty().encode(env),
        Args::Structs => atoms::structs().encode(env),
    }
}

fn error<'a>(env: Env<'a>, e: PoolError) -> Term<'a> {
    (atoms::error(), Reason(&e)).encode(env)
}

/// Claims a worker and sends it the request; the reply comes as `{reference, result}`.
/// Returns `:ok`, `{:error, reason}`, `:dirty` when the arguments are too large to encode
/// here (call `execute_dirty/7`), or `:structs` when they hold structs (convert them with
/// `DSPex.NativePool.Structs.convert/1` and call again).
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn execute<'a>(
    env: Env<'a>,
    pool: ResourceArc<PoolResource>,
    reference: Term<'a>,
    mode: Term<'a>,
    command: Term<'a>,
    arguments: Term<'a>,
    pool_timeout: u64,
    timeout: u64,
    reads: bool,
) -> NifResult<Term<'a>> {
    let request = Call {
        reference,
        command,
        arguments,
        timeout,
        reads,
    };
    execute_impl(env, pool, mode, request, pool_timeout, Scheduler::Normal)
}

#[rustler::nif(schedule = "DirtyCpu")]
#[allow(clippy::too_many_arguments)]
fn execute_dirty<'a>(
    env: Env<'a>,
    pool: ResourceArc<PoolResource>,
    reference: Term<'a>,
    mode: Term<'a>,
    command: Term<'a>,
    arguments: Term<'a>,
    pool_timeout: u64,
    timeout: u64,
    reads: bool,
) -> NifResult<Term<'a>> {
    let request = Call {
        reference,
        command,
        arguments,
        timeout,
        reads,
    };
    execute_impl(env, pool, mode, request, pool_timeout, Scheduler::Dirty)
}

/// A request's arguments as the NIF got them.
struct Call<'a> {
    reference: Term<'a>,
    command: Term<'a>,
    arguments: Term<'a>,
    timeout: u64,
    /// The caller reads its worker's replies itself (see `read/3`).
    reads: bool,
}

fn execute_impl<'a>(
    env: Env<'a>,
    pool: ResourceArc<PoolResource>,
    mode: Term<'a>,
    call: Call<'a>,
    pool_timeout: u64,
    on: Scheduler,
) -> NifResult<Term<'a>> {
    let mode = decode_mode(mode)?;
    let command = decode_command(call.command)?;
    let args = match encode_args(call.arguments, &command, pool.shared.max_frame_size, on) {
        Args::Json(a) => a,
        other => return Ok(unencoded(env, other)),
    };
    let owner = pool.shared.owner(env);
    let id = pool.shared.pool.new_lease_id();
    let request = Request {
        command,
        args,
        timeout: Duration::from_millis(call.timeout),
        members: None,
        frame: None,
    };
    let reply = Box::new(BeamReply::new(env, call.reference, id, call.reads));
    let pool_timeout = Duration::from_millis(pool_timeout);
    let (acquired, _) = in_nif(env, None, || {
        pool.shared
            .pool
            .acquire(id, mode, Some(request), reply, pool_timeout, owner)
    });
    match acquired {
        Ok(_) => Ok(atoms::ok().encode(env)),
        Err(e) => Ok(error(env, e)),
    }
}

#[rustler::nif]
fn checkout<'a>(
    env: Env<'a>,
    pool: ResourceArc<PoolResource>,
    reference: Term<'a>,
    mode: Term<'a>,
    pool_timeout: u64,
) -> NifResult<Term<'a>> {
    let mode = decode_mode(mode)?;
    let owner = pool.shared.owner(env);
    let id = pool.shared.pool.new_lease_id();
    let lease = ResourceArc::new(CheckoutHandle::new(pool.shared.clone(), id));
    let reply = Box::new(BeamReply::new(env, reference, id, false));
    let pool_timeout = Duration::from_millis(pool_timeout);
    let (acquired, _) = in_nif(env, None, || {
        pool.shared
            .pool
            .acquire(id, mode, None, reply, pool_timeout, owner)
    });
    match acquired {
        Ok(Acquired::Now(_)) => Ok((atoms::ok(), lease).encode(env)),
        Ok(Acquired::Queued(_)) => Ok((atoms::queued(), lease).encode(env)),
        Err(e) => Ok(error(env, e)),
    }
}

/// Sends a request on a held checkout (`lease`, which must be `pool`'s); like `execute/8`, may
/// return `:dirty` or `:structs`.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn call<'a>(
    env: Env<'a>,
    pool: Term<'a>,
    lease: Term<'a>,
    reference: Term<'a>,
    command: Term<'a>,
    arguments: Term<'a>,
    timeout: u64,
    reads: bool,
) -> NifResult<Term<'a>> {
    let request = Call {
        reference,
        command,
        arguments,
        timeout,
        reads,
    };
    call_impl(env, pool, lease, request, Scheduler::Normal)
}

#[rustler::nif(schedule = "DirtyCpu")]
#[allow(clippy::too_many_arguments)]
fn call_dirty<'a>(
    env: Env<'a>,
    pool: Term<'a>,
    lease: Term<'a>,
    reference: Term<'a>,
    command: Term<'a>,
    arguments: Term<'a>,
    timeout: u64,
    reads: bool,
) -> NifResult<Term<'a>> {
    let request = Call {
        reference,
        command,
        arguments,
        timeout,
        reads,
    };
    call_impl(env, pool, lease, request, Scheduler::Dirty)
}

fn call_impl<'a>(
    env: Env<'a>,
    pool: Term<'a>,
    lease: Term<'a>,
    call: Call<'a>,
    on: Scheduler,
) -> NifResult<Term<'a>> {
    let lease = match checkout_handle(pool, lease) {
        Ok(lease) => lease,
        Err(why) => return Ok(error(env, PoolError::CheckoutFailed(why.into()))),
    };
    let command = decode_command(call.command)?;
    let args = match encode_args(call.arguments, &command, lease.shared.max_frame_size, on) {
        Args::Json(a) => a,
        other => return Ok(unencoded(env, other)),
    };
    let request = Request {
        command,
        args,
        timeout: Duration::from_millis(call.timeout),
        members: None,
        frame: None,
    };
    let reply = Box::new(BeamReply::new(env, call.reference, lease.id, call.reads));
    let (called, _) = in_nif(env, None, || {
        lease.shared.pool.call(lease.id, request, reply)
    });
    match called {
        Ok(()) => Ok(atoms::ok().encode(env)),
        Err(e) => Ok(error(env, e)),
    }
}

/// Writes a control frame (`body`, a map such as
/// `%{control: "tool_result", call_id: 1, ok: true, result: 3}`) for the request in flight of
/// `lease` (the integer of its `{ref, {:event, lease, map}}` messages). Returns `:ok`,
/// `{:error, reason}`, `:dirty` when the body is too large to encode here (call
/// `control_dirty/3`), or `:structs` when it holds structs (convert them and call again).
#[rustler::nif]
fn control<'a>(
    env: Env<'a>,
    pool: ResourceArc<PoolResource>,
    lease: u64,
    body: Term<'a>,
) -> NifResult<Term<'a>> {
    control_impl(env, pool, lease, body, Scheduler::Normal)
}

#[rustler::nif(schedule = "DirtyCpu")]
fn control_dirty<'a>(
    env: Env<'a>,
    pool: ResourceArc<PoolResource>,
    lease: u64,
    body: Term<'a>,
) -> NifResult<Term<'a>> {
    control_impl(env, pool, lease, body, Scheduler::Dirty)
}

fn control_impl<'a>(
    env: Env<'a>,
    pool: ResourceArc<PoolResource>,
    lease: u64,
    body: Term<'a>,
    on: Scheduler,
) -> NifResult<Term<'a>> {
    // The frame is `{"id":N,` and the body's members: within the request envelope's allowance.
    let body = match encode_args(body, "", pool.shared.max_frame_size, on) {
        Args::Json(b) => b,
        other => return Ok(unencoded(env, other)),
    };
    match pool.shared.pool.control(lease, body) {
        Ok(()) => Ok(atoms::ok().encode(env)),
        Err(e) => Ok(error(env, e)),
    }
}

/// Returns `:ok`, or `{:error, {:checkout_failed, _}}` for a term that is no lease of `pool`.
#[rustler::nif]
fn checkin<'a>(env: Env<'a>, pool: Term<'a>, lease: Term<'a>) -> Term<'a> {
    let lease = match checkout_handle(pool, lease) {
        Ok(lease) => lease,
        Err(why) => return error(env, PoolError::CheckoutFailed(why.into())),
    };
    in_nif(env, None, || lease.shared.pool.release(lease.id));
    atoms::ok().encode(env)
}

/// `lease` when it is a lease of `pool`; else why not (a `%Checkout{}` built by hand: its reply
/// would be read, its tool calls answered and its request cancelled on the wrong pool).
fn checkout_handle(pool: Term, lease: Term) -> Result<ResourceArc<CheckoutHandle>, &'static str> {
    let Ok(lease) = lease.decode::<ResourceArc<CheckoutHandle>>() else {
        return Err("not a checkout made by checkout/2 (its lease is no worker lease)");
    };
    match pool.decode::<ResourceArc<PoolResource>>() {
        Ok(pool) if Arc::ptr_eq(&pool.shared, &lease.shared) => Ok(lease),
        _ => Err("not a checkout made by checkout/2 (its lease is not its pool's)"),
    }
}

/// Reads what `worker` wrote, for the caller of `lease` whose `receive` got
/// `{ref, {:"$dspex_readable", worker, lease}}`: returns that request's reply (`{:ok, term}`
/// or `{:error, reason}`) when it came, else `:wait` (keep receiving: other frames were
/// handed on, the reply comes later, or as a message).
#[rustler::nif]
fn read(env: Env, pool: ResourceArc<PoolResource>, worker: u64, lease: u64) -> Term {
    let ((), captured) = in_nif(env, Some(lease), || pool.shared.pool.drain(worker, true));
    match captured {
        Some(delivery) => payload(env, &delivery),
        None => atoms::wait().encode(env),
    }
}

/// Reads what `worker` wrote, for the pool's reader process (`{:"$dspex_readable", worker}`),
/// and sends each reply to its caller.
#[rustler::nif]
fn drain(env: Env, pool: ResourceArc<PoolResource>, worker: u64) -> Atom {
    in_nif(env, None, || pool.shared.pool.drain(worker, true));
    atoms::ok()
}

#[rustler::nif]
fn end_session(pool: ResourceArc<PoolResource>, session_id: String) -> Atom {
    pool.shared.pool.end_session(&session_id);
    atoms::ok()
}

#[rustler::nif]
fn status(env: Env, pool: ResourceArc<PoolResource>) -> Term {
    let s = pool.shared.pool.status();
    let c = &s.counters;
    let counters = Term::map_from_pairs(
        env,
        &keyed(
            env,
            &[
                (atoms::requests(), c.requests.encode(env)),
                (atoms::errors(), c.errors.encode(env)),
                (atoms::timeouts(), c.timeouts.encode(env)),
                (atoms::pool_timeouts(), c.pool_timeouts.encode(env)),
                (atoms::recycled(), c.recycled.encode(env)),
                (atoms::worker_starts(), c.worker_starts.encode(env)),
                (atoms::start_failures(), c.start_failures.encode(env)),
                (atoms::restores(), c.restores.encode(env)),
                (atoms::cancelled(), c.cancelled.encode(env)),
            ],
        ),
    )
    .unwrap();
    Term::map_from_pairs(
        env,
        &keyed(
            env,
            &[
                (atoms::pool_size(), s.pool_size.encode(env)),
                (atoms::max_overflow(), s.max_overflow.encode(env)),
                (atoms::ready(), s.ready.encode(env)),
                (atoms::busy(), s.busy.encode(env)),
                (atoms::in_flight(), s.in_flight.encode(env)),
                (atoms::capacity(), s.capacity.encode(env)),
                (atoms::starting(), s.starting.encode(env)),
                (atoms::overflow(), s.overflow.encode(env)),
                (atoms::queued_callers(), s.queued.encode(env)),
                (atoms::native_sessions(), s.sessions.encode(env)),
                (atoms::open_leases(), s.open_leases.encode(env)),
                (atoms::last_start_error(), s.last_start_error.encode(env)),
                (atoms::counters(), counters),
                (atoms::worker_pids(), s.worker_pids.encode(env)),
            ],
        ),
    )
    .unwrap()
}

#[rustler::nif]
fn live_leases() -> i64 {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

fn keyed<'a>(env: Env<'a>, pairs: &[(Atom, Term<'a>)]) -> Vec<(Term<'a>, Term<'a>)> {
    pairs.iter().map(|(k, v)| (k.encode(env), *v)).collect()
}

/// The JSON text the pool would send for `term` (tests and benchmarks of the conversion).
/// On a dirty scheduler: a large term takes milliseconds.
#[rustler::nif(schedule = "DirtyCpu")]
fn json_encode<'a>(env: Env<'a>, term: Term<'a>) -> Term<'a> {
    let mut out = Vec::with_capacity(128);
    match crate::term::write_json(term, &mut out, usize::MAX) {
        Ok(()) => {
            let mut bin = rustler::NewBinary::new(env, out.len());
            bin.as_mut_slice().copy_from_slice(&out);
            (atoms::ok(), Term::from(bin)).encode(env)
        }
        Err(EncodeError::Invalid(msg) | EncodeError::Struct(msg)) => {
            error(env, PoolError::InvalidArgs(msg))
        }
        Err(EncodeError::OverBudget) => unreachable!("no budget"),
    }
}

/// The term the pool would deliver for the JSON text `json`. On a dirty scheduler too.
#[rustler::nif(schedule = "DirtyCpu")]
fn json_decode<'a>(env: Env<'a>, json: rustler::Binary<'a>) -> Term<'a> {
    match crate::term::json_to_term(env, json.as_slice()) {
        Ok(term) => (atoms::ok(), term).encode(env),
        Err(e) => error(env, PoolError::Decode(e.to_string())),
    }
}

/// Input size up to which `json_decode_small` decodes on the calling scheduler (well under
/// 1 ms of work); larger input returns `:dirty` (use `json_decode/1`).
const SMALL_DECODE_BUDGET: usize = 16 * 1024;

/// `json_decode/1` on the calling (normal) scheduler, for small input: the bench's baselines
/// decode replies with it, at the speed their users get from Jason.
#[rustler::nif]
fn json_decode_small<'a>(env: Env<'a>, json: rustler::Binary<'a>) -> Term<'a> {
    if json.len() > SMALL_DECODE_BUDGET {
        return atoms::dirty().encode(env);
    }
    match crate::term::json_to_term(env, json.as_slice()) {
        Ok(term) => (atoms::ok(), term).encode(env),
        Err(e) => error(env, PoolError::Decode(e.to_string())),
    }
}
