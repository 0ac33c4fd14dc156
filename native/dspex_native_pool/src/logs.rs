//! Worker stderr on its way to the pool's owner: batched, bounded, acknowledged.
//!
//! Each worker's stderr is already cut into bounded lines and rate-limited where it is read
//! (`worker::drain_stderr`). Here the lines of all of a pool's workers wait in one bounded
//! buffer and leave as **one** message per batch, `{:dspex_native_pool_logs, ack, lines}`;
//! the next batch leaves only after the owner has called `Native.log_ack(ack)`. So the owner's
//! mailbox holds at most one batch of a pool's logs however much its workers write, a slow
//! Logger slows nobody else, and lines that do not fit are dropped and counted in the next
//! batch.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Lines waiting for the owner, across the pool's workers; more are dropped and counted.
pub const MAX_PENDING_LINES: usize = 2_000;
/// Bytes waiting for the owner; more are dropped and counted.
pub const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;
/// How long the first line of a batch waits for company.
const GATHER: Duration = Duration::from_millis(10);

pub type Line = (u64, &'static str, String);

type SendBatch = dyn Fn(Arc<Batcher>, Vec<Line>) + Send + Sync;

#[derive(Default)]
struct State {
    lines: Vec<Line>,
    bytes: usize,
    dropped: u64,
    /// A flush is scheduled or a batch awaits its ack.
    busy: bool,
}

/// The pool's log buffer. `send` delivers a batch; the receiver calls [`Batcher::ack`].
pub struct Batcher {
    state: Mutex<State>,
    send: Box<SendBatch>,
}

impl Batcher {
    pub fn new(send: impl Fn(Arc<Batcher>, Vec<Line>) + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Batcher {
            state: Mutex::new(State::default()),
            send: Box::new(send),
        })
    }

    pub fn push(self: &Arc<Self>, worker: u64, level: &'static str, line: String) {
        let mut st = self.state.lock().unwrap();
        if st.lines.len() >= MAX_PENDING_LINES || st.bytes + line.len() > MAX_PENDING_BYTES {
            st.dropped += 1;
            return;
        }
        st.bytes += line.len();
        st.lines.push((worker, level, line));
        if !st.busy {
            st.busy = true;
            drop(st);
            let me = self.clone();
            crate::runtime::spawn(async move {
                tokio::time::sleep(GATHER).await;
                me.flush();
            });
        }
    }

    /// The owner has handled the last batch: send what gathered meanwhile.
    pub fn ack(self: &Arc<Self>) {
        self.flush();
    }

    fn flush(self: &Arc<Self>) {
        let mut st = self.state.lock().unwrap();
        if st.lines.is_empty() && st.dropped == 0 {
            st.busy = false;
            return;
        }
        let mut lines = std::mem::take(&mut st.lines);
        st.bytes = 0;
        if st.dropped > 0 {
            lines.push((
                0,
                "warning",
                format!(
                    "dspex_native_pool: dropped {} worker stderr lines (the pool's owner could not keep up)",
                    st.dropped
                ),
            ));
            st.dropped = 0;
        }
        st.busy = true;
        drop(st);
        (self.send)(self.clone(), lines);
    }
}

#[cfg(not(test))]
pub use beam::for_owner;

/// The BEAM side: the ack resource, the message, the `log_ack` NIF (left out of test builds,
/// which run without a BEAM).
#[cfg(not(test))]
mod beam {
    use std::sync::Arc;

    use rustler::{Atom, Encoder, Env, LocalPid, OwnedEnv, Resource, ResourceArc, Term};

    use super::{Batcher, Line};

    /// The ack handle that travels with a batch to the owner.
    pub struct LogAck(Arc<Batcher>);

    #[rustler::resource_impl]
    impl Resource for LogAck {}

    mod atoms {
        rustler::atoms! { ok, debug, info, warning, error, dspex_native_pool_logs }
    }

    /// A batcher whose batches go to `owner` as `{:dspex_native_pool_logs, ack, [{worker, level,
    /// line}]}`.
    pub fn for_owner(owner: LocalPid) -> Arc<Batcher> {
        Batcher::new(move |batcher, lines| {
            let send = move || {
                let _ = OwnedEnv::new().send_and_clear(&owner, |env| encode(env, batcher, lines));
            };
            if crate::runtime::on_runtime_thread() {
                send()
            } else {
                crate::runtime::spawn(async move { send() });
            }
        })
    }

    fn encode(env: Env<'_>, batcher: Arc<Batcher>, lines: Vec<Line>) -> Term<'_> {
        let lines: Vec<Term> = lines
            .into_iter()
            .map(|(worker, level, line)| {
                let level = match level {
                    "debug" => atoms::debug(),
                    "warning" => atoms::warning(),
                    "error" => atoms::error(),
                    _ => atoms::info(),
                };
                (worker, level, line).encode(env)
            })
            .collect();
        (
            atoms::dspex_native_pool_logs(),
            ResourceArc::new(LogAck(batcher)),
            lines,
        )
            .encode(env)
    }

    /// The owner has logged a batch; the next one may come.
    #[rustler::nif]
    fn log_ack(ack: ResourceArc<LogAck>) -> Atom {
        ack.0.ack();
        atoms::ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn one_batch_in_flight_and_the_excess_is_counted() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let b = Batcher::new(move |b, lines| tx.lock().unwrap().send((b, lines)).unwrap());
        for i in 0..(MAX_PENDING_LINES + 10) {
            b.push(1, "info", format!("line {i}"));
        }
        let (ack, first) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first.len(), MAX_PENDING_LINES + 1);
        assert!(first
            .last()
            .unwrap()
            .2
            .contains("dropped 10 worker stderr lines"));
        // Unacknowledged: what comes next waits.
        b.push(1, "info", "later".into());
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        ack.ack();
        let (ack, second) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(second, vec![(1, "info", "later".to_owned())]);
        // Nothing pending: an ack sends nothing, and the next line starts a batch again.
        ack.ack();
        b.push(2, "error", "again".into());
        let (_, third) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(third, vec![(2, "error", "again".to_owned())]);
    }
}
