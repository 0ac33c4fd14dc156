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
//!   pool's reader process (apart from the pool's server, so that a server busy in a call
//!   holds no reply up), which drains the pipe and sends each reply to its caller. A worker
//!   shared by several callers is not read by one of them, or every other caller would wait
//!   for that process to be scheduled (head-of-line blocking).
//!
//! Whoever reads takes the reader's lock, so frames are handled in order; a read on a normal
//! scheduler takes at most [`SCHEDULER_BYTES`] from the pipe and handles frames up to
//! [`SMALL_FRAME`] bytes, at most [`SCHEDULER_FRAMES`] of them or for [`SCHEDULER_TIME`], and
//! hands anything more to a Tokio task. End of file wakes the worker's task, which reports
//! the exit; the descriptor is closed through ERTS (`ERL_NIF_SELECT_STOP`), never under it.

use std::any::Any;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, BytesMut};
use tokio::sync::Notify;

use crate::pool::{LeaseId, RequestId, WorkerId};

/// Registers workers' stdout with the BEAM's poller (production; tests read with Tokio).
pub trait Poller: Send + Sync + 'static {
    /// Takes ownership of `fd` (non-blocking): it is closed by [`Watch::stop`].
    fn watch(&self, worker: WorkerId, fd: std::os::fd::OwnedFd) -> Arc<dyn Watch>;
}

/// One worker's stdout in the BEAM's poll set.
pub trait Watch: Send + Sync + 'static {
    fn fd(&self) -> RawFd;
    /// Tells the pool's reader process, once, when the fd is readable. False on failure.
    fn arm_reader(&self) -> bool;
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
/// Frames one read on a normal scheduler handles before a Tokio task reads on.
pub const SCHEDULER_FRAMES: usize = 32;
/// Time one read on a normal scheduler may take before a Tokio task reads on.
pub const SCHEDULER_TIME: std::time::Duration = std::time::Duration::from_micros(250);

/// Who the worker's stdout is armed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Armed {
    /// Not armed (a notification was consumed, or never armed).
    Nobody,
    /// The pool's reader process.
    Reader,
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
    max_frame: usize,
    /// The last read took less than it asked for: the pipe was empty then. One more read
    /// would only say so again; the poller, re-armed, tells when more comes.
    emptied: bool,
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
                max_frame,
                emptied: false,
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
    /// A new notification: the pipe may hold more than was read.
    pub fn notified(&mut self) {
        self.emptied = false;
    }

    /// The next frame, reading from `fd` while no whole frame is buffered. `limit`: a normal
    /// scheduler's budget (`Some(bytes read so far)`), `None` on a Tokio thread.
    pub fn next(&mut self, fd: RawFd, mut limit: Option<&mut usize>) -> Next {
        loop {
            // A 4-byte big-endian length, then the body (the same frames as `protocol::codec`).
            if self.buf.len() >= 4 {
                let head = [self.buf[0], self.buf[1], self.buf[2], self.buf[3]];
                let len = u32::from_be_bytes(head) as usize;
                if len > self.max_frame {
                    // Refused at the header: garbage never makes us buffer its "length".
                    return Next::Broken(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "frame length over max_frame_size",
                    ));
                }
                if limit.is_some() && len > SMALL_FRAME {
                    return Next::Large;
                }
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    return Next::Frame(self.buf.split_to(len));
                }
            }
            if self.emptied {
                return Next::Empty;
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
                    self.emptied = (n as usize) < want;
                    // SAFETY: the kernel initialised `n` bytes.
                    unsafe { self.buf.set_len(self.buf.len() + n as usize) };
                    if let Some(read) = limit.as_deref_mut() {
                        *read += n as usize;
                    }
                }
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => {
                            self.emptied = true;
                            return Next::Empty;
                        }
                        io::ErrorKind::Interrupted => continue,
                        _ => return Next::Broken(e),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for two descriptors.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) },
            0
        );
        // SAFETY: just created, owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn write(fd: &OwnedFd, bytes: &[u8]) {
        // SAFETY: writes from a live slice.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(n as usize, bytes.len());
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    fn state(max_frame: usize) -> ReadState {
        ReadState {
            buf: BytesMut::new(),
            max_frame,
            emptied: false,
            done: false,
        }
    }

    #[test]
    fn a_frame_split_across_writes_comes_out_whole_once_complete() {
        let (r, w) = pipe();
        let mut s = state(1 << 20);
        let f = frame(br#"{"id":1,"success":true,"result":{}}"#);
        for piece in f.chunks(5) {
            assert!(matches!(s.next(r.as_raw_fd(), Some(&mut 0)), Next::Empty));
            // Without a new notification the reader does not read again.
            write(&w, piece);
            assert!(matches!(s.next(r.as_raw_fd(), Some(&mut 0)), Next::Empty));
            s.notified();
        }
        match s.next(r.as_raw_fd(), Some(&mut 0)) {
            Next::Frame(body) => assert_eq!(&body[..], &f[4..]),
            _ => panic!("expected the frame"),
        }
        assert!(matches!(s.next(r.as_raw_fd(), Some(&mut 0)), Next::Empty));
    }

    #[test]
    fn a_large_frame_is_left_to_a_tokio_thread_but_read_whole_without_a_limit() {
        let (r, w) = pipe();
        let mut s = state(1 << 20);
        let body = vec![b'x'; SMALL_FRAME + 1];
        write(&w, &frame(&body));
        assert!(matches!(s.next(r.as_raw_fd(), Some(&mut 0)), Next::Large));
        match s.next(r.as_raw_fd(), None) {
            Next::Frame(got) => assert_eq!(got.len(), body.len()),
            _ => panic!("expected the frame"),
        }
    }

    #[test]
    fn a_scheduler_read_stops_at_its_byte_budget() {
        let (r, w) = pipe();
        // SAFETY: plain fcntl; room for more than one budget in the pipe.
        assert!(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) } > 0);
        let mut s = state(1 << 20);
        let small = frame(&vec![b'y'; 1000]);
        let count = SCHEDULER_BYTES / small.len() + 4;
        for _ in 0..count {
            write(&w, &small);
        }
        let mut read = 0;
        let mut frames = 0;
        loop {
            match s.next(r.as_raw_fd(), Some(&mut read)) {
                Next::Frame(_) => frames += 1,
                Next::Pause => break,
                _ => panic!("expected the budget to run out first"),
            }
        }
        assert!(read >= SCHEDULER_BYTES && frames < count);
        // The rest is read by the next call.
        let mut read = 0;
        while let Next::Frame(_) = s.next(r.as_raw_fd(), Some(&mut read)) {
            frames += 1;
        }
        assert_eq!(frames, count);
    }

    #[test]
    fn end_of_file_and_a_header_over_the_limit_are_reported() {
        let (r, w) = pipe();
        let mut s = state(64);
        write(&w, b"this is not a frame\n");
        assert!(matches!(s.next(r.as_raw_fd(), None), Next::Broken(_)));
        let (r, w) = pipe();
        let mut s = state(64);
        write(&w, &frame(b"{}"));
        drop(w);
        assert!(matches!(s.next(r.as_raw_fd(), None), Next::Frame(_)));
        // The pipe looked empty after the frame; end of file is the next notification.
        assert!(matches!(s.next(r.as_raw_fd(), None), Next::Empty));
        s.notified();
        assert!(matches!(s.next(r.as_raw_fd(), None), Next::Eof));
    }
}
