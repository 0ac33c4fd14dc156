//! The BEAM side of [`crate::reader`]: workers' stdout in ERTS's poll set (`enif_select`),
//! and sending from inside a NIF without a detour through a Tokio thread.
//!
//! rustler 0.39 registers resource types without the `stop` callback that `enif_select`
//! needs to close a descriptor safely, so the type of the polled descriptors is registered
//! here, by hand, at load. Its resources never reach Erlang: the pool holds one reference and
//! ERTS another while the descriptor is selected.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::c_void;
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;

use rustler::env::SavedTerm;
use rustler::sys::{
    enif_alloc_resource, enif_init_resource_type, enif_release_resource, enif_select,
    enif_select_x, enif_send, ErlNifEnv, ErlNifEvent, ErlNifResourceFlags, ErlNifResourceStop,
    ErlNifResourceType, ErlNifResourceTypeInit,
};
use rustler::{Encoder, Env, LocalPid, OwnedEnv, Term};

use crate::pool::{Delivery, WorkerId};
use crate::reader::{Poller, Watch};

mod atoms {
    rustler::atoms! { undefined, dspex_readable = "$dspex_readable" }
}

// `enum ErlNifSelectFlags` (erl_drv_nif.h).
const SELECT_READ: i32 = 1;
const SELECT_STOP: i32 = 1 << 2;
const SELECT_CANCEL: i32 = 1 << 3;
const SELECT_CUSTOM_MSG: i32 = 1 << 4;

static FD_TYPE: AtomicPtr<ErlNifResourceType> = AtomicPtr::new(std::ptr::null_mut());

/// ERTS calls this once the descriptor is out of its poll set: now it may be closed.
unsafe extern "C" fn fd_stop(_env: *mut ErlNifEnv, _obj: *mut c_void, fd: ErlNifEvent, _: i32) {
    // SAFETY: the descriptor was handed over (`into_raw_fd`) and is closed only here.
    unsafe { libc::close(fd) };
}

/// Registers the resource type of polled descriptors (from the NIF's `load`).
pub fn load(env: Env) -> bool {
    let init = ErlNifResourceTypeInit {
        dtor: std::ptr::null(),
        stop: fd_stop as *const ErlNifResourceStop,
        down: std::ptr::null(),
        members: 2,
        dyncall: std::ptr::null(),
    };
    let mut tried = ErlNifResourceFlags::ERL_NIF_RT_CREATE;
    // SAFETY: called from `load` with its env; the name is NUL-terminated.
    let rt = unsafe {
        enif_init_resource_type(
            env.as_c_arg(),
            c"dspex_native_pool_stdout".as_ptr(),
            &init,
            ErlNifResourceFlags::ERL_NIF_RT_CREATE,
            &mut tried,
        )
    };
    FD_TYPE.store(rt as *mut _, Ordering::Release);
    !rt.is_null()
}

/// Puts workers' stdout in ERTS's poll set; notifications nobody else should get go to the
/// pool's reader process as `{:"$dspex_readable", worker}`.
pub struct BeamPoller {
    pub reader: LocalPid,
}

impl Poller for BeamPoller {
    fn watch(&self, worker: WorkerId, fd: OwnedFd) -> Arc<dyn Watch> {
        // SAFETY: the type was registered at load; the object only marks the descriptor.
        let obj = unsafe { enif_alloc_resource(FD_TYPE.load(Ordering::Acquire), 1) };
        let env = OwnedEnv::new();
        let msg = env.save((atoms::dspex_readable(), worker));
        Arc::new(BeamWatch {
            obj,
            fd: fd.into_raw_fd(),
            reader: self.reader,
            reader_msg: (env, msg),
        })
    }
}

pub struct BeamWatch {
    obj: *mut c_void,
    fd: RawFd,
    reader: LocalPid,
    /// `{:"$dspex_readable", worker}`, built once.
    reader_msg: (OwnedEnv, SavedTerm),
}

// SAFETY: the resource object is only passed to thread-safe ERTS functions; the reader.s
// message is only read (copied by ERTS), never changed, after it is built.
unsafe impl Send for BeamWatch {}
unsafe impl Sync for BeamWatch {}

impl BeamWatch {
    /// Arms the descriptor (once) to send a copy of `msg` to `pid`.
    pub fn select(&self, pid: &LocalPid, msg: Term) -> bool {
        // SAFETY: with no msg_env, ERTS copies `msg` (alive in its env during the call); the
        // resource is alive while we hold it.
        let r = unsafe {
            enif_select_x(
                std::ptr::null_mut(),
                self.fd,
                SELECT_READ | SELECT_CUSTOM_MSG,
                self.obj,
                pid.as_c_arg(),
                msg.as_c_arg(),
                std::ptr::null_mut(),
            )
        };
        r >= 0
    }

    fn select_plain(&self, flags: i32) {
        // SAFETY: as above; STOP and CANCEL take no pid.
        unsafe {
            enif_select(
                std::ptr::null_mut(),
                self.fd,
                flags,
                self.obj,
                std::ptr::null(),
                atoms::undefined().as_c_arg(),
            );
        }
    }
}

impl Watch for BeamWatch {
    fn fd(&self) -> RawFd {
        self.fd
    }

    fn arm_reader(&self) -> bool {
        let (env, msg) = &self.reader_msg;
        env.run(|e| self.select(&self.reader, msg.load(e)))
    }

    fn cancel(&self) {
        self.select_plain(SELECT_READ | SELECT_CANCEL);
    }

    fn stop(&self) {
        self.select_plain(SELECT_STOP);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for BeamWatch {
    fn drop(&mut self) {
        // SAFETY: our one reference, from `enif_alloc_resource`.
        unsafe { enif_release_resource(self.obj) };
    }
}

/// Builds the readable notification a caller gets: `{ref, {:"$dspex_readable", worker, lease}}`.
pub fn readable<'a>(env: Env<'a>, reference: Term<'a>, worker: WorkerId, lease: u64) -> Term<'a> {
    (reference, (atoms::dspex_readable(), worker, lease)).encode(env)
}

/// The NIF running on this thread: its env (messages sent from it go straight to their
/// receiver) and, for a read, the reply it keeps for its own return value.
struct Ctx {
    env: *mut ErlNifEnv,
    pid: LocalPid,
    /// The lease whose reply the NIF returns instead of sending.
    lease: Option<u64>,
    captured: Option<Delivery>,
    /// Something for `lease` was already sent to the caller: its reply must follow it in
    /// the mailbox, not overtake it as a return value.
    sent_to_caller: bool,
}

thread_local! {
    static CTX: RefCell<Option<Ctx>> = const { RefCell::new(None) };
}

struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        CTX.with(|c| c.borrow_mut().take());
    }
}

/// Runs `f` as the NIF of `env`'s process; with `lease`, the reply delivered to this process
/// for that lease is returned rather than sent.
pub fn in_nif<R>(env: Env, lease: Option<u64>, f: impl FnOnce() -> R) -> (R, Option<Delivery>) {
    CTX.with(|c| {
        *c.borrow_mut() = Some(Ctx {
            env: env.as_c_arg(),
            pid: env.pid(),
            lease,
            captured: None,
            sent_to_caller: false,
        })
    });
    let reset = Reset;
    let r = f();
    let captured = CTX.with(|c| c.borrow_mut().as_mut().and_then(|ctx| ctx.captured.take()));
    drop(reset);
    (r, captured)
}

/// Keeps `delivery` as the running read's return value when it is the reply it waits for;
/// gives it back otherwise.
pub fn capture(pid: &LocalPid, lease: u64, delivery: Delivery) -> Option<Delivery> {
    CTX.with(|c| {
        let mut c = c.borrow_mut();
        match c.as_mut() {
            Some(ctx)
                if ctx.lease == Some(lease)
                    && ctx.pid == *pid
                    && !ctx.sent_to_caller
                    && ctx.captured.is_none() =>
            {
                ctx.captured = Some(delivery);
                None
            }
            _ => Some(delivery),
        }
    })
}

/// Sends the message `build` makes in `msg_env` to `pid`: straight from the running NIF's
/// env when there is one (no thread hop), else from a runtime thread.
pub fn send(
    msg_env: OwnedEnv,
    pid: LocalPid,
    lease: u64,
    build: impl for<'a> FnOnce(Env<'a>) -> Term<'a> + Send + 'static,
) {
    let caller = CTX.with(|c| {
        let mut c = c.borrow_mut();
        let ctx = c.as_mut()?;
        if ctx.pid == pid && ctx.lease == Some(lease) {
            ctx.sent_to_caller = true;
        }
        Some(ctx.env)
    });
    match caller {
        Some(caller) => msg_env.run(|e| {
            let msg = build(e);
            // SAFETY: on a scheduler thread inside the NIF of `caller`; the message lives in
            // the process-independent `msg_env`, which the call clears.
            unsafe { enif_send(caller, pid.as_c_arg(), e.as_c_arg(), msg.as_c_arg()) };
        }),
        None => {
            let mut msg_env = msg_env;
            off_scheduler(move || {
                let _ = msg_env.send_and_clear(&pid, build);
            });
        }
    }
}

/// Runs `f` with an env it may send from: directly on a runtime thread, else (a scheduler
/// thread, where `OwnedEnv::send_and_clear` would panic) on the runtime.
pub fn off_scheduler(f: impl FnOnce() + Send + 'static) {
    if crate::runtime::on_runtime_thread() {
        f()
    } else {
        crate::runtime::spawn(async move { f() });
    }
}
