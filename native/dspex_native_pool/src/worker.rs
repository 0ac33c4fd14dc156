//! Worker processes: how they are started, written to, signalled and reaped.
//!
//! The pool only sees the [`Spawner`] trait, so its logic is tested with in-process fake
//! workers (see `crate::fake`) and runs in production with [`PythonSpawner`].
//!
//! # Caveats
//! * Children get `PR_SET_PDEATHSIG(SIGKILL)`, which fires when the *forking thread* exits:
//!   spawn only from the pool's long-lived Tokio worker threads, never from `spawn_blocking`.
//! * Each child leads its own process group, so signals reach whatever it started too.
//! * ERTS ignores SIGCHLD; `crate::runtime` installs a handler at load so exit statuses exist.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::unix::pipe;

use crate::error::ExitInfo;

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;

/// A started worker: its pipes, its exit, and a way to signal it.
pub struct Spawned {
    pub pid: Option<u32>,
    pub stdin: pipe::Sender,
    pub stdout: BoxRead,
    pub stderr: Option<BoxRead>,
    /// Resolves once the process has exited and been reaped.
    pub exit: Pin<Box<dyn Future<Output = ExitInfo> + Send>>,
    /// Sends a signal (SIGTERM, SIGKILL) to the worker and its process group.
    pub signal: Box<dyn Fn(i32) + Send + Sync>,
}

/// Starts workers. Called on a Tokio worker thread.
pub trait Spawner: Send + Sync + 'static {
    fn spawn(&self, worker_id: u64) -> io::Result<Spawned>;
}

/// The live side of a worker that the pool writes to.
pub struct Conn {
    pub pid: Option<u32>,
    stdin: pipe::Sender,
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
            signal,
            stderr_tail: Mutex::new(VecDeque::new()),
        }
    }

    /// Writes `buf` without blocking the calling thread: small frames go straight into the pipe
    /// from whichever thread dispatches (a BEAM scheduler on the fast path, which saves a thread
    /// hop per request); what the pipe cannot take now is finished by a Tokio task.
    ///
    /// Returns false when the pipe refused the first byte (the worker is gone and read none
    /// of it); a failure after that is the reader's to report, as the worker's exit.
    pub fn write(self: &Arc<Self>, buf: Vec<u8>) -> bool {
        let mut done = 0;
        while done < buf.len() {
            match self.stdin.try_write(&buf[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return done > 0,
            }
        }
        if done < buf.len() {
            let conn = Arc::clone(self);
            crate::runtime::spawn(async move {
                while done < buf.len() {
                    if conn.stdin.writable().await.is_err() {
                        return;
                    }
                    match conn.stdin.try_write(&buf[done..]) {
                        Ok(n) => done += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(_) => return,
                    }
                }
            });
        }
        true
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

/// Reads stderr line by line until EOF, handing each line to `sink`.
pub async fn drain_stderr(stderr: BoxRead, mut sink: impl FnMut(String)) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                sink(line.trim_end_matches(['\n', '\r']).to_owned());
            }
        }
    }
}

/// Starts the Python worker script: `python script --mode pool-worker --worker-id N`.
pub struct PythonSpawner {
    pub python: PathBuf,
    pub script: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Spawner for PythonSpawner {
    fn spawn(&self, worker_id: u64) -> io::Result<Spawned> {
        use std::process::Stdio;
        let mut cmd = tokio::process::Command::new(&self.python);
        cmd.arg(&self.script)
            .args([
                "--mode",
                "pool-worker",
                "--worker-id",
                &worker_id.to_string(),
            ])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The VM may have died between fork and prctl: then nobody would kill us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                // ERTS ignores these; an ignored disposition survives exec.
                libc::signal(libc::SIGCHLD, libc::SIG_DFL);
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("could not start {}: {e}", self.python.display()),
            )
        })?;
        let pid = child.id();
        let stdin =
            pipe::Sender::from_owned_fd(child.stdin.take().expect("piped").into_owned_fd()?)?;
        let stdout: BoxRead = Box::new(child.stdout.take().expect("piped"));
        let stderr: BoxRead = Box::new(child.stderr.take().expect("piped"));
        let exited = Arc::new(AtomicBool::new(false));
        let exited_w = Arc::clone(&exited);
        let exit = Box::pin(async move {
            let status = child.wait().await;
            exited_w.store(true, Ordering::SeqCst);
            match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (s.code(), s.signal()) {
                        (Some(c), _) => ExitInfo::Code(c),
                        (None, Some(sig)) => ExitInfo::Signal(sig),
                        _ => ExitInfo::Unknown,
                    }
                }
                Err(_) => ExitInfo::Unknown,
            }
        });
        let signal = Box::new(move |sig: i32| {
            // After reaping, the pid may belong to someone else.
            if let (Some(pid), false) = (pid, exited.load(Ordering::SeqCst)) {
                // SAFETY: plain syscall; the group is the child's own (process_group(0)).
                unsafe {
                    libc::killpg(pid as libc::pid_t, sig);
                }
            }
        });
        Ok(Spawned {
            pid,
            stdin,
            stdout,
            stderr: Some(stderr),
            exit,
            signal,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_levels_follow_python_logging_names() {
        assert_eq!(level_of("ERROR dspy: boom"), "error");
        assert_eq!(level_of("WARNING: careful"), "warning");
        assert_eq!(level_of("DEBUG x"), "debug");
        assert_eq!(level_of("Traceback (most recent call last):"), "error");
        assert_eq!(level_of("hello"), "info");
    }
}
