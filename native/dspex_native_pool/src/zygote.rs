//! The client side of the fork server (`priv/python/fork_server.py`): one helper process per
//! pool that starts the pool's workers, so the VM never forks per worker.
//!
//! The helper is started with `posix_spawn` (no `pre_exec`, so std never forks the VM), from
//! one dedicated thread that lives as long as the VM: its `PR_SET_PDEATHSIG` follows that
//! thread. The pool talks to it over a `SOCK_SEQPACKET` socket (its stdin): a fork request
//! carries the worker's three pipe ends (`SCM_RIGHTS`), the answer carries the worker's pid and
//! a pidfd, and the helper reports each worker's exit status. See the Python file for the
//! messages.
//!
//! # Caveats
//! * A helper that dies is started again (with backoff) at the next spawn; workers it had
//!   started keep running. Their exits are then seen through their pidfds, without a status
//!   ([`ExitInfo::Unknown`]), and their process groups are killed from here.
//! * Signals go through the worker's pidfd, so a reused pid is never signalled; its process
//!   group is signalled only while the pidfd says the leader has not exited.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use crate::error::ExitInfo;
use crate::worker::{BoxRead, Spawned};

/// How long a new helper may take to import the worker module (and DSPy) and say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one fork may take once the helper is ready.
const FORK_TIMEOUT: Duration = Duration::from_secs(30);
/// A helper that lived at least this long before dying is restarted at once.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Helpers dying young in a row after which a dead one is restarted only on demand.
const MAX_EAGER_RESTARTS: u32 = 3;
/// Lines of the helper's own stderr kept for the next worker's log (and start-up errors).
const LOG_LINES: usize = 50;

/// Whether workers are forks of a process that imported the script once, or exec'd afresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Fork,
    Spawn,
}

/// What the helper runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub python: PathBuf,
    pub helper: PathBuf,
    pub script: PathBuf,
    pub env: Vec<(String, String)>,
    pub mode: Mode,
}

type Forked = Result<(u32, OwnedFd, oneshot::Receiver<ExitInfo>), String>;

/// One running helper process.
struct Helper {
    pid: u32,
    sock: AsyncFd<OwnedFd>,
    alive: AtomicBool,
    started: Instant,
    mode: Mode,
    forks: Mutex<HashMap<u64, oneshot::Sender<Forked>>>,
    exits: Mutex<HashMap<u32, oneshot::Sender<ExitInfo>>>,
}

struct Restarts {
    /// Consecutive helpers that died young.
    failures: u32,
    last: Option<Arc<Helper>>,
}

/// The pool's fork server: starts (and restarts) the helper and forks workers through it.
pub struct ForkServer {
    config: Config,
    current: tokio::sync::Mutex<Restarts>,
    /// The running helper, for `Drop` (which cannot wait for `current`).
    live: Mutex<Option<Arc<Helper>>>,
    me: std::sync::Weak<ForkServer>,
    seq: AtomicU64,
    log: Arc<Mutex<VecDeque<String>>>,
    /// Set once the pool has stopped: no helper is started or restarted after that.
    closed: AtomicBool,
}

impl ForkServer {
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new_cyclic(|me| ForkServer {
            me: me.clone(),
            config,
            current: tokio::sync::Mutex::new(Restarts {
                failures: 0,
                last: None,
            }),
            seq: AtomicU64::new(1),
            log: Arc::new(Mutex::new(VecDeque::new())),
            live: Mutex::new(None),
            closed: AtomicBool::new(false),
        })
    }

    /// The pool has stopped: end the helper now (EOF on its control socket; it kills any worker
    /// still running) and start none again. Idempotent.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(h) = self.live.lock().unwrap().take() {
            // SAFETY: shutdown on a socket the helper owns and keeps open.
            unsafe { libc::shutdown(h.sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
        // Let go of the helper (and so of its socket) now, not when the pool is dropped; a
        // `helper()` under way lets go of it itself when it sees `closed`.
        if let Ok(mut cur) = self.current.try_lock() {
            cur.last = None;
        }
    }

    /// The helper's pid and the mode it serves in, starting it if needed.
    pub async fn helper_info(&self) -> io::Result<(u32, Mode)> {
        let h = self.helper().await?;
        Ok((h.pid, h.mode))
    }

    async fn helper(&self) -> io::Result<Arc<Helper>> {
        let mut cur = self.current.lock().await;
        if self.closed.load(Ordering::SeqCst) {
            cur.last = None;
            return Err(io::Error::other("the pool has stopped"));
        }
        if let Some(h) = &cur.last {
            if h.alive.load(Ordering::SeqCst) {
                return Ok(h.clone());
            }
            if h.started.elapsed() < STABLE_AFTER {
                cur.failures += 1;
            } else {
                cur.failures = 0;
            }
        }
        if cur.failures > 0 {
            let backoff = Duration::from_millis(100)
                .saturating_mul(1 << cur.failures.min(6))
                .min(MAX_BACKOFF);
            tokio::time::sleep(backoff).await;
        }
        let started = self.launch().await;
        match started {
            Ok(h) if self.closed.load(Ordering::SeqCst) => {
                // Closed while this one started: end it too.
                // SAFETY: shutdown on a socket the helper owns and keeps open.
                unsafe { libc::shutdown(h.sock.as_raw_fd(), libc::SHUT_RDWR) };
                cur.last = None;
                Err(io::Error::other("the pool has stopped"))
            }
            Ok(h) => {
                cur.last = Some(h.clone());
                *self.live.lock().unwrap() = Some(h.clone());
                if self.closed.load(Ordering::SeqCst) {
                    // Closed in between: `close` may have missed this one.
                    self.close();
                }
                Ok(h)
            }
            Err(e) => {
                cur.failures += 1;
                Err(e)
            }
        }
    }

    async fn launch(&self) -> io::Result<Arc<Helper>> {
        let (ours, theirs) = socketpair()?;
        let c = &self.config;
        let mut cmd = tokio::process::Command::new(&c.python);
        cmd.arg(&c.helper)
            .arg("--script")
            .arg(&c.script)
            .arg("--python")
            .arg(&c.python)
            .arg("--parent")
            .arg(std::process::id().to_string())
            .arg("--mode")
            .arg(match c.mode {
                Mode::Fork => "fork",
                Mode::Spawn => "spawn",
            })
            .envs(c.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::from(theirs))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .process_group(0);
        let python = c.python.display().to_string();
        let mut child = on_launcher(move || cmd.spawn())
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("could not start {python}: {e}")))?;
        let pid = child.id().unwrap_or(0);
        let stderr = child.stderr.take().expect("piped");
        let log = self.log.clone();
        let log_task =
            crate::runtime::spawn(crate::worker::drain_stderr(Box::new(stderr), move |line| {
                let mut log = log.lock().unwrap();
                if log.len() == LOG_LINES {
                    log.pop_front();
                }
                log.push_back(line);
            }));
        // SAFETY: the AsyncFd owns the socket, so the descriptor stays open and the same.
        let sock =
            unsafe { AsyncFd::register(ours) }.map_err(|e| io::Error::other(e.to_string()))?;
        let ready = tokio::time::timeout(READY_TIMEOUT, recv(&sock)).await;
        if !matches!(ready, Ok(Ok(Some(_)))) {
            // Never ready: make sure it is gone (Child knows whether it was reaped already).
            let _ = child.start_kill();
        }
        // Reap it whenever it exits.
        crate::runtime::spawn(async move {
            let _ = child.wait().await;
        });
        let msg = match ready {
            Ok(Ok(Some((msg, _)))) => msg,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let _ = tokio::time::timeout(Duration::from_millis(500), log_task).await;
                let tail = self.take_log().join("\n");
                return Err(io::Error::other(format!(
                    "the fork server exited before it was ready; its stderr ends with:\n{tail}"
                )));
            }
            Err(_) => {
                return Err(io::Error::other(format!(
                    "the fork server was not ready within {} s",
                    READY_TIMEOUT.as_secs()
                )))
            }
        };
        let mode = match msg.get("mode").and_then(|m| m.as_str()) {
            Some("fork") => Mode::Fork,
            _ => Mode::Spawn,
        };
        let helper = Arc::new(Helper {
            pid,
            sock,
            alive: AtomicBool::new(true),
            started: Instant::now(),
            mode,
            forks: Mutex::new(HashMap::new()),
            exits: Mutex::new(HashMap::new()),
        });
        crate::runtime::spawn(read_helper(helper.clone(), self.me.clone()));
        Ok(helper)
    }

    fn take_log(&self) -> Vec<String> {
        self.log.lock().unwrap().drain(..).collect()
    }

    /// Starts one worker: `argv` are the script's arguments. A helper found dead on the way
    /// (it died since the last fork) is replaced once.
    pub async fn fork(&self, argv: Vec<String>) -> io::Result<Spawned> {
        match self.fork_once(argv.clone()).await {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => self.fork_once(argv).await,
            other => other,
        }
    }

    async fn fork_once(&self, argv: Vec<String>) -> io::Result<Spawned> {
        let helper = self.helper().await?;
        let (stdin_r, stdin_w) = pipe_pair()?;
        let (stdout_r, stdout_w) = pipe_pair()?;
        let (stderr_r, stderr_w) = pipe_pair()?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        helper.forks.lock().unwrap().insert(seq, tx);
        let msg = serde_json::json!({"op": "fork", "seq": seq, "argv": argv}).to_string();
        let sent = send(
            &helper.sock,
            msg.as_bytes(),
            &[
                stdin_r.as_raw_fd(),
                stdout_w.as_raw_fd(),
                stderr_w.as_raw_fd(),
            ],
        )
        .await;
        drop((stdin_r, stdout_w, stderr_w));
        if let Err(e) = sent {
            helper.forks.lock().unwrap().remove(&seq);
            helper.alive.store(false, Ordering::SeqCst);
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("the fork server did not take the request: {e}"),
            ));
        }
        let (pid, pidfd, exit_rx) = match tokio::time::timeout(FORK_TIMEOUT, rx).await {
            Ok(Ok(Ok(forked))) => forked,
            Ok(Ok(Err(e))) => return Err(io::Error::other(format!("the fork server: {e}"))),
            Ok(Err(_)) => {
                helper.alive.store(false, Ordering::SeqCst);
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the fork server exited while forking",
                ));
            }
            Err(_) => {
                helper.forks.lock().unwrap().remove(&seq);
                return Err(io::Error::other("the fork server did not answer in time"));
            }
        };
        let pidfd = Arc::new(pidfd);
        let exited = Arc::new(AtomicBool::new(false));
        let exited_w = exited.clone();
        let pidfd_w = pidfd.clone();
        let exit = Box::pin(async move {
            let info = match exit_rx.await {
                Ok(info) => info,
                Err(_) => {
                    // The helper died: it can no longer reap this worker (init does), so wait
                    // for the pidfd and end the worker's group from here.
                    // SAFETY: `pidfd_w` keeps the pidfd open until this AsyncFd is dropped.
                    let fd = unsafe {
                        AsyncFd::register_with_interest(
                            PidFd(pidfd_w.as_raw_fd()),
                            tokio::io::Interest::READABLE,
                        )
                    };
                    if let Ok(fd) = fd {
                        let _ = fd.readable().await.map(|mut g| g.retain_ready());
                    }
                    // SAFETY: plain syscall; the group id stays reserved while any member lives.
                    unsafe { libc::killpg(pid as libc::pid_t, libc::SIGKILL) };
                    ExitInfo::Unknown
                }
            };
            exited_w.store(true, Ordering::SeqCst);
            info
        });
        let signal = Box::new(move |sig: i32| {
            if exited.load(Ordering::SeqCst) {
                return;
            }
            pidfd_send_signal(pidfd.as_raw_fd(), sig);
            if !pidfd_exited(pidfd.as_raw_fd()) {
                // SAFETY: plain syscall; the leader has not exited, so its pid is its own.
                unsafe { libc::killpg(pid as libc::pid_t, sig) };
            }
        });
        let prefix: Vec<u8> = self
            .take_log()
            .into_iter()
            .flat_map(|l| (l + "\n").into_bytes())
            .collect();
        let stderr: BoxRead =
            Box::new(std::io::Cursor::new(prefix).chain(pipe::Receiver::from_owned_fd(stderr_r)?));
        Ok(Spawned {
            pid: Some(pid),
            stdin: pipe::Sender::from_owned_fd(stdin_w)?,
            stdout: crate::worker::Stdout::Fd(stdout_r),
            stderr: Some(stderr),
            exit,
            signal,
        })
    }
}

impl Drop for ForkServer {
    /// The pool is gone: EOF on its control socket ends the helper (which kills any worker
    /// still running) and the task reading the socket.
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads the helper's messages until it exits; then every pending fork fails and every live
/// worker's exit falls back to its pidfd.
async fn read_helper(h: Arc<Helper>, server: std::sync::Weak<ForkServer>) {
    while let Ok(Some((msg, mut fds))) = recv(&h.sock).await {
        match msg.get("op").and_then(|o| o.as_str()) {
            Some("forked") => {
                let seq = msg["seq"].as_u64().unwrap_or(0);
                let pid = msg["pid"].as_u64().unwrap_or(0) as u32;
                let Some(tx) = h.forks.lock().unwrap().remove(&seq) else {
                    continue;
                };
                let Some(pidfd) = fds.pop() else {
                    let _ = tx.send(Err("no pidfd came with the worker".into()));
                    continue;
                };
                let (etx, erx) = oneshot::channel();
                h.exits.lock().unwrap().insert(pid, etx);
                let _ = tx.send(Ok((pid, pidfd, erx)));
            }
            Some("error") => {
                let seq = msg["seq"].as_u64().unwrap_or(0);
                if let Some(tx) = h.forks.lock().unwrap().remove(&seq) {
                    let err = msg["error"].as_str().unwrap_or("fork failed").to_owned();
                    let _ = tx.send(Err(err));
                }
            }
            Some("exit") => {
                let pid = msg["pid"].as_u64().unwrap_or(0) as u32;
                let info = match (msg["code"].as_i64(), msg["signal"].as_i64()) {
                    (Some(c), _) => ExitInfo::Code(c as i32),
                    (None, Some(s)) => ExitInfo::Signal(s as i32),
                    _ => ExitInfo::Unknown,
                };
                if let Some(tx) = h.exits.lock().unwrap().remove(&pid) {
                    let _ = tx.send(info);
                }
            }
            _ => {}
        }
    }
    h.alive.store(false, Ordering::SeqCst);
    h.forks.lock().unwrap().clear();
    h.exits.lock().unwrap().clear();
    // Start the next one now (with the backoff), so the next worker does not wait for its
    // import; a helper that keeps dying young is left to be started by the next spawn.
    if let Some(server) = server.upgrade() {
        restart(server);
    }
}

/// A plain function, so `read_helper`'s future does not contain `helper`'s (which contains a
/// `read_helper` spawn): the compiler could not prove such a cycle `Send`.
fn restart(server: Arc<ForkServer>) {
    crate::runtime::spawn(async move {
        if server.current.lock().await.failures < MAX_EAGER_RESTARTS {
            let _ = server.helper().await;
        }
    });
}

struct PidFd(RawFd);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

fn pidfd_send_signal(pidfd: RawFd, sig: i32) {
    // SAFETY: plain syscall with a valid pidfd; no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable from then on).
fn pidfd_exited(pidfd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The helper's end becomes its (blocking) stdin.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(b.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(b.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
    }
    Ok((a, b))
}

/// A pipe whose both ends are close-on-exec: (read end, write end).
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

async fn send(sock: &AsyncFd<OwnedFd>, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    loop {
        let mut guard = sock.writable().await?;
        match guard.try_io(|s| sendmsg(s.as_raw_fd(), data, fds)) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

fn sendmsg(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    let payload = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut cbuf = vec![0u8; space.max(1)];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr() as *mut _;
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                payload as usize,
            );
        }
        if libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

type Message = (serde_json::Value, Vec<OwnedFd>);

/// One message, or None at EOF.
async fn recv(sock: &AsyncFd<OwnedFd>) -> io::Result<Option<Message>> {
    loop {
        let mut guard = sock.readable().await?;
        match guard.try_io(|s| recvmsg(s.as_raw_fd())) {
            Ok(Ok(None)) => return Ok(None),
            Ok(Ok(Some((data, fds)))) => {
                let value = serde_json::from_slice(&data).map_err(io::Error::other)?;
                return Ok(Some((value, fds)));
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

#[allow(clippy::type_complexity)]
fn recvmsg(fd: RawFd) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut data = vec![0u8; 64 * 1024];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(8 * std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut fds = Vec::new();
    // SAFETY: msghdr is plain data; the buffers outlive the call; the descriptors the kernel
    // installed are taken into OwnedFds exactly once.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut _;
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = len / std::mem::size_of::<RawFd>();
                let ptr = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(ptr.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if n == 0 {
            return Ok(None);
        }
        data.truncate(n as usize);
    }
    Ok(Some((data, fds)))
}

type Job = Box<dyn FnOnce() + Send>;

/// Runs `f` on the launcher thread, which never exits: a child's `PR_SET_PDEATHSIG` fires when
/// the thread that started it ends, so helpers must not be started from threads that come and
/// go (Tokio's blocking pool, `block_in_place`).
async fn on_launcher<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    static LAUNCHER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let launcher = LAUNCHER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("dspex-launcher".into())
            .spawn(move || {
                let _rt = crate::runtime::handle().enter();
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("launcher thread");
        Mutex::new(tx)
    });
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    launcher
        .lock()
        .unwrap()
        .send(job)
        .expect("the launcher thread never exits");
    rx.await.expect("the launcher thread never exits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{PythonSpawner, Spawner};
    use tokio::io::AsyncReadExt;

    fn helper() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../priv/python/fork_server.py")
    }

    fn ppid(pid: u32) -> u32 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(1).unwrap().parse().unwrap()
    }

    fn spawner(mode: Mode, body: &str) -> (PythonSpawner, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let script = dir.0.join("w.py");
        std::fs::write(&script, body).unwrap();
        let s = PythonSpawner::new(
            "python3".into(),
            script,
            vec!["--extra".into()],
            vec![("ZYGOTE_TEST".into(), "on".into())],
            helper(),
            mode,
        );
        (s, dir)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "zygote_test_{}_{}",
                    std::process::id(),
                    rand_suffix()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        fn rand_suffix() -> u64 {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            N.fetch_add(1, Ordering::Relaxed)
        }
    }

    const SCRIPT: &str = r#"
import os, sys
def main(argv):
    os.write(1, (" ".join(argv) + " " + os.environ["ZYGOTE_TEST"] + " " + str(__name__ == "__main__") + "\n").encode())
    line = sys.stdin.readline()
    sys.exit(int(line))
if __name__ == "__main__":
    main(sys.argv[1:])
"#;

    async fn run(mode: Mode, forked: &str) {
        let (s, _dir) = spawner(mode, SCRIPT);
        let w = s.spawn(7).unwrap();
        let pid = w.pid.unwrap();
        let (helper_pid, served) = s.server().helper_info().await.unwrap();
        assert_eq!(served, mode);
        assert_eq!(ppid(pid), helper_pid, "a child of the fork server");
        assert_eq!(ppid(helper_pid), std::process::id());
        let mut out = vec![0u8; 200];
        let mut stdout = w.stdout.into_stream().unwrap();
        let n = stdout.read(&mut out).await.unwrap();
        assert_eq!(
            std::str::from_utf8(&out[..n]).unwrap(),
            format!("--mode pool-worker --worker-id 7 --extra on {forked}\n")
        );
        w.stdin.try_write(b"5\n").unwrap();
        assert!(matches!(w.exit.await, ExitInfo::Code(5)));

        let w = s.spawn(8).unwrap();
        (w.signal)(libc::SIGKILL);
        assert!(matches!(w.exit.await, ExitInfo::Signal(9)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fork_mode_runs_main_in_a_fork_and_reports_exits() {
        run(Mode::Fork, "False").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spawn_mode_execs_the_script_and_reports_exits() {
        run(Mode::Spawn, "True").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_script_without_main_argv_is_served_by_exec() {
        let (s, _dir) = spawner(Mode::Fork, "import sys\nsys.exit(4)\n");
        let w = s.spawn(1).unwrap();
        assert_eq!(s.server().helper_info().await.unwrap().1, Mode::Spawn);
        assert!(matches!(w.exit.await, ExitInfo::Code(4)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_fork_server_is_restarted_and_its_workers_live_on() {
        let (s, _dir) = spawner(Mode::Fork, SCRIPT);
        let w = s.spawn(1).unwrap();
        let (first, _) = s.server().helper_info().await.unwrap();
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(first as i32, libc::SIGKILL) };
        while std::path::Path::new(&format!("/proc/{first}/task")).exists()
            && ppid(w.pid.unwrap()) == first
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let w2 = s.spawn(2).unwrap();
        let (second, _) = s.server().helper_info().await.unwrap();
        assert_ne!(first, second);
        assert_eq!(ppid(w2.pid.unwrap()), second);
        // The orphan still runs; its end is seen through its pidfd, without a status.
        assert!(std::path::Path::new(&format!("/proc/{}", w.pid.unwrap())).exists());
        (w.signal)(libc::SIGKILL);
        assert!(matches!(w.exit.await, ExitInfo::Unknown));
        (w2.signal)(libc::SIGKILL);
        assert!(matches!(w2.exit.await, ExitInfo::Signal(9)));
    }
}
