//! Worker processes: how they are started, written to, signalled and reaped.
//!
//! The pool only sees the [`Spawner`] trait, so its logic is tested with in-process fake
//! workers (see `crate::fake`) and runs in production with [`PythonSpawner`].
//!
//! # Caveats
//! * Workers are children of the pool's fork server, never of the VM (see [`crate::zygote`]).
//! * Each worker leads its own process group, so signals reach whatever it started too, and
//!   the group is killed whenever the worker exits.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;

use crate::error::ExitInfo;
use crate::zygote;

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;

/// Resolves once the process has exited and been reaped.
pub type ExitFuture = Pin<Box<dyn Future<Output = ExitInfo> + Send>>;

/// A worker's stdout: a pipe the pool may hand to the BEAM's poller (a real process), or any
/// byte stream (in-process fake workers).
pub enum Stdout {
    Fd(OwnedFd),
    Stream(BoxRead),
}

impl Stdout {
    /// As a Tokio stream (read by a Tokio task rather than polled by the BEAM).
    pub fn into_stream(self) -> io::Result<BoxRead> {
        match self {
            Stdout::Fd(fd) => Ok(Box::new(pipe::Receiver::from_owned_fd(fd)?)),
            Stdout::Stream(s) => Ok(s),
        }
    }
}

/// A started worker: its pipes, its exit, and a way to signal it.
pub struct Spawned {
    pub pid: Option<u32>,
    pub stdin: pipe::Sender,
    pub stdout: Stdout,
    pub stderr: Option<BoxRead>,
    /// Resolves once the process has exited and been reaped.
    pub exit: ExitFuture,
    /// Sends a signal (SIGTERM, SIGKILL) to the worker and its process group.
    pub signal: Box<dyn Fn(i32) + Send + Sync>,
}

/// Starts workers. Called on a Tokio worker thread.
pub trait Spawner: Send + Sync + 'static {
    fn spawn(&self, worker_id: u64) -> io::Result<Spawned>;

    /// The pool has stopped and every worker has exited: release what the spawner holds
    /// (the fork server) now rather than when the last reference to the pool is dropped.
    fn shutdown(&self) {}
}

/// The live side of a worker that the pool writes to.
pub struct Conn {
    pub pid: Option<u32>,
    stdin: pipe::Sender,
    /// Frames (or the rest of one) waiting for room in the pipe, in order; `Some` while a
    /// Tokio task writes them. Nothing is written to the pipe past them, so frames never
    /// interleave.
    backlog: Mutex<Option<VecDeque<Vec<u8>>>>,
    signal: Box<dyn Fn(i32) + Send + Sync>,
    /// Last lines of stderr, for start-up failure messages.
    pub stderr_tail: Mutex<VecDeque<String>>,
}

impl Conn {
    pub fn new(
        pid: Option<u32>,
        stdin: pipe::Sender,
        signal: Box<dyn Fn(i32) + Send + Sync>,
    ) -> Self {
        Conn {
            pid,
            stdin,
            backlog: Mutex::new(None),
            signal,
            stderr_tail: Mutex::new(VecDeque::new()),
        }
    }

    /// Writes `buf` without blocking the calling thread: small frames go straight into the pipe
    /// from whichever thread dispatches (a BEAM scheduler on the fast path, which saves a thread
    /// hop per request); what the pipe cannot take now is finished by a Tokio task, and frames
    /// written meanwhile queue behind it, so no two frames ever interleave.
    ///
    /// Returns false when the pipe refused the first byte (the worker is gone and read none
    /// of it); a failure after that is the reader's to report, as the worker's exit.
    pub fn write(self: &Arc<Self>, buf: Vec<u8>) -> bool {
        let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = backlog.as_mut() {
            queue.push_back(buf);
            return true;
        }
        let mut done = 0;
        while done < buf.len() {
            match self.stdin.try_write(&buf[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return done > 0,
            }
        }
        if done < buf.len() {
            let rest = if done == 0 { buf } else { buf[done..].to_vec() };
            *backlog = Some(VecDeque::from([rest]));
            let conn = Arc::clone(self);
            crate::runtime::spawn(async move { conn.write_backlog().await });
        }
        true
    }

    /// Writes the backlog in order as the pipe makes room, until it is empty.
    async fn write_backlog(&self) {
        loop {
            let next = {
                let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
                let queue = backlog.get_or_insert_with(VecDeque::new);
                match queue.pop_front() {
                    Some(frame) => frame,
                    None => {
                        *backlog = None;
                        return;
                    }
                }
            };
            let mut done = 0;
            while done < next.len() {
                if self.stdin.writable().await.is_err() {
                    return self.drop_backlog();
                }
                match self.stdin.try_write(&next[done..]) {
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => return self.drop_backlog(),
                }
            }
        }
    }

    /// The worker is gone: what waits is never written (its requests fail with its exit).
    /// The backlog stays `Some`, so nothing is written to the broken pipe past it either.
    fn drop_backlog(&self) {
        let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = backlog.as_mut() {
            queue.clear();
        }
    }

    pub fn signal(&self, sig: i32) {
        (self.signal)(sig)
    }

    pub fn remember_stderr(&self, line: &str) {
        let mut tail = self.stderr_tail.lock().unwrap();
        if tail.len() == 20 {
            tail.pop_front();
        }
        tail.push_back(line.to_owned());
    }

    pub fn stderr_summary(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap();
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Log level of a worker's stderr line, from its first word (Python logging's level names).
pub fn level_of(line: &str) -> &'static str {
    match line.split([' ', ':']).next().unwrap_or("") {
        "DEBUG" => "debug",
        "WARNING" | "WARN" => "warning",
        "ERROR" | "CRITICAL" | "Traceback" => "error",
        _ => "info",
    }
}

/// Longest stderr line passed on; the rest of a longer line is dropped and counted.
pub const MAX_LINE: usize = 8 * 1024;
/// Lines a worker may log at once before the rate limit applies.
pub const LINE_BURST: f64 = 1000.0;
/// Lines per second a worker may log in the long run; the excess is dropped and counted.
pub const LINES_PER_SEC: f64 = 500.0;

/// A token bucket: `burst` lines at once, `rate` per second after that.
struct RateLimit {
    tokens: f64,
    burst: f64,
    rate: f64,
    at: Instant,
}

impl RateLimit {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Reads stderr until EOF, handing each line to `sink`, without ever holding more than
/// [`MAX_LINE`] bytes of one line: longer lines are cut with a marker saying how much was
/// dropped. A worker logging faster than [`LINES_PER_SEC`] (after a burst of [`LINE_BURST`]) has
/// the excess dropped; how many is logged once a second, as a warning.
pub async fn drain_stderr(stderr: BoxRead, sink: impl FnMut(String)) {
    drain_stderr_limited(stderr, sink, LINE_BURST, LINES_PER_SEC).await
}

async fn drain_stderr_limited(
    mut stderr: BoxRead,
    mut sink: impl FnMut(String),
    burst: f64,
    rate: f64,
) {
    let mut limit = RateLimit {
        tokens: burst,
        burst,
        rate,
        at: Instant::now(),
    };
    let mut chunk = vec![0u8; 64 * 1024];
    let mut line: Vec<u8> = Vec::new();
    let mut cut = 0usize; // bytes of the current line beyond MAX_LINE
    let mut dropped = 0u64;
    let mut dropped_since = Instant::now();
    let mut emit =
        |line: &mut Vec<u8>, cut: &mut usize, dropped: &mut u64, sink: &mut dyn FnMut(String)| {
            if limit.take() {
                let mut text = String::from_utf8_lossy(line)
                    .trim_end_matches('\r')
                    .to_owned();
                if *cut > 0 {
                    text.push_str(&format!(" [... {} bytes truncated]", *cut));
                }
                sink(text);
            } else {
                *dropped += 1;
            }
            line.clear();
            *cut = 0;
        };
    let report = |dropped: &mut u64, sink: &mut dyn FnMut(String)| {
        if *dropped > 0 {
            sink(format!(
                "WARNING dspex_native_pool: dropped {} stderr lines of this worker (over {} lines/s)",
                *dropped, rate as u64
            ));
            *dropped = 0;
        }
    };
    loop {
        let read = if dropped > 0 {
            let wait =
                (dropped_since + Duration::from_secs(1)).saturating_duration_since(Instant::now());
            // `read` is cancellation safe: a timed-out read lost nothing.
            tokio::time::timeout(wait, stderr.read(&mut chunk))
                .await
                .ok()
        } else {
            Some(stderr.read(&mut chunk).await)
        };
        let n = match read {
            None => 0,
            Some(Ok(0)) | Some(Err(_)) => break,
            Some(Ok(n)) => n,
        };
        let mut rest = &chunk[..n];
        while !rest.is_empty() {
            let (part, newline) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            let keep = part.len().min(MAX_LINE.saturating_sub(line.len()));
            line.extend_from_slice(&part[..keep]);
            cut += part.len() - keep;
            rest = &rest[part.len() + usize::from(newline)..];
            if newline {
                let before = dropped;
                emit(&mut line, &mut cut, &mut dropped, &mut sink);
                if before == 0 && dropped > 0 {
                    dropped_since = Instant::now();
                }
            }
        }
        if dropped > 0 && dropped_since.elapsed() >= Duration::from_secs(1) {
            report(&mut dropped, &mut sink);
        }
    }
    if !line.is_empty() || cut > 0 {
        emit(&mut line, &mut cut, &mut dropped, &mut sink);
    }
    report(&mut dropped, &mut sink);
}

/// Starts the Python worker script (`script --mode pool-worker --worker-id N args...`) through
/// the pool's fork server ([`crate::zygote`]): forked from a process that imported the script
/// once ([`zygote::Mode::Fork`]), or exec'd afresh ([`zygote::Mode::Spawn`]). Either way the VM
/// itself never forks.
pub struct PythonSpawner {
    pub args: Vec<String>,
    server: Arc<zygote::ForkServer>,
}

impl PythonSpawner {
    /// `helper` is `priv/python/fork_server.py`; nothing starts until the first spawn.
    pub fn new(
        python: PathBuf,
        script: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        helper: PathBuf,
        mode: zygote::Mode,
    ) -> Self {
        PythonSpawner {
            args,
            server: zygote::ForkServer::new(zygote::Config {
                python,
                helper,
                script,
                env,
                mode,
            }),
        }
    }

    /// The fork server, e.g. to learn its pid in tests.
    pub fn server(&self) -> &Arc<zygote::ForkServer> {
        &self.server
    }
}

impl Spawner for PythonSpawner {
    /// # Caveats
    /// Waits for the fork server (at the first spawn, while it imports the script) with
    /// `block_in_place`, so it must run on a multi-threaded runtime or outside any runtime.
    fn spawn(&self, worker_id: u64) -> io::Result<Spawned> {
        let mut argv = vec![
            "--mode".to_owned(),
            "pool-worker".to_owned(),
            "--worker-id".to_owned(),
            worker_id.to_string(),
        ];
        argv.extend(self.args.iter().cloned());
        let server = self.server.clone();
        let fork = async move { server.fork(argv).await };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => tokio::task::block_in_place(|| handle.block_on(fork)),
            Err(_) => crate::runtime::handle().block_on(fork),
        }
    }

    fn shutdown(&self) {
        self.server.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(bytes: Vec<u8>) -> BoxRead {
        Box::new(std::io::Cursor::new(bytes))
    }

    #[tokio::test]
    async fn a_line_without_end_is_cut_with_a_marker_and_the_next_line_survives() {
        let mut input = vec![b'y'; 100_000];
        input.extend_from_slice(b"\r\nnext\npartial");
        let mut lines = Vec::new();
        drain_stderr(reader(input), |l| lines.push(l)).await;
        assert_eq!(lines.len(), 3);
        let cut = 100_000 - MAX_LINE + 1; // the \r too
        assert_eq!(
            lines[0],
            format!("{} [... {cut} bytes truncated]", "y".repeat(MAX_LINE))
        );
        assert_eq!(lines[1], "next");
        assert_eq!(lines[2], "partial");
    }

    #[tokio::test]
    async fn lines_over_the_rate_are_dropped_and_counted() {
        let input: Vec<u8> = (0..100)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let mut lines = Vec::new();
        drain_stderr_limited(reader(input), |l| lines.push(l), 10.0, 1.0).await;
        assert_eq!(lines.len(), 11, "{lines:?}");
        assert_eq!(lines[9], "line 9");
        assert_eq!(
            lines[10],
            "WARNING dspex_native_pool: dropped 90 stderr lines of this worker (over 1 lines/s)"
        );
        assert_eq!(level_of(&lines[10]), "warning");
    }

    #[test]
    fn stderr_levels_follow_python_logging_names() {
        assert_eq!(level_of("ERROR dspy: boom"), "error");
        assert_eq!(level_of("WARNING: careful"), "warning");
        assert_eq!(level_of("DEBUG x"), "debug");
        assert_eq!(level_of("Traceback (most recent call last):"), "error");
        assert_eq!(level_of("hello"), "info");
    }
}
