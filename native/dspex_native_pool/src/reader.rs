//! A worker's stdout polled by the BEAM itself (the reply path without a Tokio hop).
//!
//! A real worker's stdout is not read by a Tokio task: it is registered with the BEAM's own
//! poller (`enif_select`, behind the [`Watch`] trait), armed for whoever should read next:
//!
//! * the caller waiting for the worker's only request in flight: ERTS wakes that process with
//!   `{ref, {:"$dspex_readable", worker, lease}}`, and a NIF it calls reads and decodes the
//!   frame in the caller's own process, so the reply wakes no other thread or process first;
//! * otherwise (a start-up handshake, chores, an idle worker that writes garbage, several
//!   requests of a protocol-2 worker in flight, a caller that reads no replies itself) the
//!   pool's owner process, which drains the pipe and sends each reply to its caller. A worker
//!   shared by several callers is not read by one of them, or every other caller would wait
//!   for that process to be scheduled (head-of-line blocking).
//!
//! Whoever reads takes the reader's lock, so frames are handled in order; a read on a normal
//! scheduler handles at most [`SCHEDULER_BYTES`] and frames up to [`SMALL_FRAME`] bytes, and
//! hands anything larger to a Tokio task. End of file wakes the worker's task, which reports
//! the exit; the descriptor is closed through ERTS (`ERL_NIF_SELECT_STOP`), never under it.

use std::any::Any;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use tokio::sync::Notify;
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

use crate::pool::{LeaseId, RequestId, WorkerId};

/// Registers workers' stdout with the BEAM's poller (production; tests read with Tokio).
pub trait Poller: Send + Sync + 'static {
    /// Takes ownership of `fd` (non-blocking): it is closed by [`Watch::stop`].
    fn watch(&self, worker: WorkerId, fd: std::os::fd::OwnedFd) -> Arc<dyn Watch>;
}

/// One worker's stdout in the BEAM's poll set.
pub trait Watch: Send + Sync + 'static {
    fn fd(&self) -> RawFd;
    /// Tells the pool's owner process, once, when the fd is readable. False on failure.
    fn arm_owner(&self) -> bool;
    /// Disarms the fd: once this returns, no notification for it can still be sent (one
    /// already sent is in its receiver's mailbox).
    fn cancel(&self);
    /// Stops polling and closes the fd (once no notification can still be in flight).
    fn stop(&self);
    fn as_any(&self) -> &dyn Any;
}

/// Bytes one read on a normal scheduler takes from the pipe before it lets the poller call
/// again (a level-triggered poll set fires at once while data is left).
pub const SCHEDULER_BYTES: usize = 64 * 1024;
/// Largest frame body decoded on a normal scheduler; larger ones go to a Tokio task.
pub const SMALL_FRAME: usize = 16 * 1024;

/// Who the worker's stdout is armed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Armed {
    /// Not armed (a notification was consumed, or never armed).
    Nobody,
    Owner,
    Caller(LeaseId, RequestId),
}

/// The pool's record of a polled stdout (under the pool's lock).
pub(crate) struct Slot {
    pub reader: Arc<Reader>,
    pub armed: Armed,
}

pub(crate) struct Reader {
    pub watch: Arc<dyn Watch>,
    state: Mutex<ReadState>,
    /// Signalled at end of file (or a broken stream): the worker's task reports the exit.
    pub eof: Notify,
}

pub(crate) struct ReadState {
    buf: BytesMut,
    codec: LengthDelimitedCodec,
    /// End of file seen, or the stream broke: nothing more is read.
    pub done: bool,
}

/// What the next step of a read found.
pub(crate) enum Next {
    Frame(BytesMut),
    /// A frame over [`SMALL_FRAME`] while limited: hand the read to a Tokio task.
    Large,
    /// The byte budget is spent; more may wait in the pipe.
    Pause,
    /// Nothing more for now.
    Empty,
    Eof,
    /// An unreadable stream: a header over `max_frame_size`, or a read error.
    Broken(io::Error),
}

impl Reader {
    pub fn new(watch: Arc<dyn Watch>, max_frame: usize) -> Reader {
        Reader {
            watch,
            state: Mutex::new(ReadState {
                buf: BytesMut::with_capacity(8 * 1024),
                codec: crate::protocol::codec(max_frame),
                done: false,
            }),
            eof: Notify::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, ReadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ReadState {
    /// The next frame, reading from `fd` while no whole frame is buffered. `limit`: a normal
    /// scheduler's budget (`Some(bytes read so far)`), `None` on a Tokio thread.
    pub fn next(&mut self, fd: RawFd, mut limit: Option<&mut usize>) -> Next {
        loop {
            if limit.is_some() && self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                if len as usize > SMALL_FRAME {
                    return Next::Large;
                }
            }
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => return Next::Frame(frame),
                Ok(None) => {}
                Err(e) => return Next::Broken(e),
            }
            if let Some(read) = limit.as_deref() {
                if *read >= SCHEDULER_BYTES {
                    return Next::Pause;
                }
            }
            self.buf.reserve(16 * 1024);
            let spare = self.buf.spare_capacity_mut();
            let want = match limit.as_deref() {
                Some(read) => spare.len().min(SCHEDULER_BYTES - *read),
                None => spare.len(),
            };
            // SAFETY: reads at most `want` bytes into the buffer's spare capacity.
            let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), want) };
            match n {
                0 => return Next::Eof,
                n if n > 0 => {
                    // SAFETY: the kernel initialised `n` bytes.
                    unsafe { self.buf.set_len(self.buf.len() + n as usize) };
                    if let Some(read) = limit.as_deref_mut() {
                        *read += n as usize;
                    }
                }
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return Next::Empty,
                        io::ErrorKind::Interrupted => continue,
                        _ => return Next::Broken(e),
                    }
                }
            }
        }
    }
}
