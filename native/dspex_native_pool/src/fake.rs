//! In-process fake workers speaking the real protocol over real pipes, so the pool's logic is
//! tested in milliseconds without Python. Commands mirror `test/support/test_worker.py`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use crate::error::{ExitInfo, PoolError};
use crate::pool::{Delivery, EventSink, ReplySink, WorkerId};
use crate::protocol;
use crate::worker::{Spawned, Spawner};

/// What every fake worker received, in order: (worker id, command).
pub type Journal = Arc<Mutex<Vec<(u64, String)>>>;

#[derive(Default, Clone)]
pub struct FakeSpawner {
    pub journal: Journal,
    /// When set, `spawn` fails with this message.
    pub fail: Arc<Mutex<Option<String>>>,
    pub spawns: Arc<Mutex<u32>>,
    /// How the next workers behave at start-up, one entry per spawn (then [`Start::Normal`]).
    pub starts: Arc<Mutex<VecDeque<Start>>>,
}

/// A fake worker's behaviour before and at its start-up ping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Normal,
    /// Prints a banner to stdout before anything else (garbage for the protocol).
    Banner,
    /// Answers its start-up ping with an error.
    PingFails,
    /// Answers its start-up ping with another id.
    WrongId,
    /// Exits before answering anything.
    Exit,
    /// `spawn` takes this many ms (a slow exec), then the worker never answers.
    SlowSpawnThenHang(u64),
    /// Answers its start-up ping after this many ms.
    SlowPing(u64),
}

impl FakeSpawner {
    /// A spawner whose next workers start as `starts` says.
    pub fn with_starts(starts: &[Start]) -> FakeSpawner {
        let s = FakeSpawner::default();
        s.starts.lock().unwrap().extend(starts.iter().copied());
        s
    }
}

impl Spawner for FakeSpawner {
    fn spawn(&self, worker_id: u64) -> io::Result<Spawned> {
        *self.spawns.lock().unwrap() += 1;
        if let Some(msg) = self.fail.lock().unwrap().clone() {
            return Err(io::Error::new(io::ErrorKind::NotFound, msg));
        }
        let start = self
            .starts
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Start::Normal);
        if let Start::SlowSpawnThenHang(ms) = start {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let (stdin_tx, stdin_rx) = pipe::pipe()?;
        let (stdout_tx, stdout_rx) = pipe::pipe()?;
        let (exit_tx, exit_rx) = oneshot::channel::<ExitInfo>();
        let (sig_tx, sig_rx) = mpsc::unbounded_channel::<i32>();
        let journal = self.journal.clone();
        tokio::spawn(async move {
            let exit = serve(worker_id, start, stdin_rx, stdout_tx, sig_rx, journal).await;
            let _ = exit_tx.send(exit);
        });
        Ok(Spawned {
            pid: None,
            stdin: stdin_tx,
            stdout: crate::worker::Stdout::Stream(Box::new(stdout_rx)),
            stderr: None,
            exit: Box::pin(async move { exit_rx.await.unwrap_or(ExitInfo::Unknown) }),
            signal: Box::new(move |sig| {
                let _ = sig_tx.send(sig);
            }),
        })
    }
}

async fn serve(
    wid: u64,
    start: Start,
    stdin: pipe::Receiver,
    mut stdout: pipe::Sender,
    mut signals: mpsc::UnboundedReceiver<i32>,
    journal: Journal,
) -> ExitInfo {
    let mut frames = FramedRead::new(stdin, protocol::codec(protocol::DEFAULT_MAX_FRAME));
    let mut sessions: HashMap<String, Vec<String>> = HashMap::new();
    match start {
        Start::Banner => {
            let _ = stdout.write_all(b"Loading model weights...\n").await;
        }
        Start::Exit => return ExitInfo::Code(2),
        _ => {}
    }
    let mut first = true;
    loop {
        let body = tokio::select! {
            sig = signals.recv() => return ExitInfo::Signal(sig.unwrap_or(9)),
            frame = frames.next() => match frame {
                Some(Ok(b)) => b,
                _ => return ExitInfo::Code(0),
            },
        };
        let req: Value = serde_json::from_slice(&body).unwrap();
        let id = req["id"].as_u64().unwrap();
        let cmd = req["command"].as_str().unwrap().to_owned();
        let args = req["args"].clone();
        journal.lock().unwrap().push((wid, cmd.clone()));
        let sid = args["session_id"].as_str().unwrap_or("").to_owned();
        let handshake = std::mem::take(&mut first);
        let reply: Option<Vec<u8>> = match cmd.as_str() {
            "ping" if handshake && start != Start::Normal => match start {
                Start::PingFails => err(id, "ImportError: no module named dspy"),
                Start::WrongId => ok(id + 7, json!({})),
                Start::SlowPing(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    ok(id, json!({"status": "ok", "worker_id": wid}))
                }
                _ => {
                    // Hangs (a stuck import) until it is signalled.
                    let sig = signals.recv().await;
                    return ExitInfo::Signal(sig.unwrap_or(9));
                }
            },
            "ping" => ok(id, json!({"status": "ok", "worker_id": wid})),
            "echo" | "configure_lm" => ok(id, args),
            "cleanup" => {
                sessions.clear();
                ok(id, json!({}))
            }
            "cleanup_session" => {
                sessions.remove(&sid);
                ok(id, json!({}))
            }
            "sleep" => {
                let ms = args["ms"].as_u64().unwrap_or(0);
                tokio::select! {
                    sig = signals.recv() => return ExitInfo::Signal(sig.unwrap_or(9)),
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                }
                ok(id, json!({"slept": ms}))
            }
            "exit" => return ExitInfo::Code(args["code"].as_i64().unwrap_or(1) as i32),
            "garbage" => Some(b"this is not a frame\n".to_vec()),
            "wrong_id" => ok(id + 1000, json!(1)),
            "fail" => err(id, args["message"].as_str().unwrap_or("failed")),
            "create_program" => {
                if let Some(ms) = args["ms"].as_u64() {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let pid = args["id"].as_str().unwrap_or("p").to_owned();
                sessions.entry(sid).or_default().push(pid.clone());
                ok(id, json!({"program_id": pid}))
            }
            "restore_session" => {
                let ids = args["programs"].as_array().unwrap().iter();
                let ids = ids.map(|p| p["id"].as_str().unwrap().to_owned()).collect();
                sessions.insert(sid, ids);
                ok(id, json!({}))
            }
            "execute_program" => {
                let pid = args["program_id"].as_str().unwrap_or("");
                if sessions
                    .get(&sid)
                    .is_some_and(|p| p.iter().any(|x| x == pid))
                {
                    ok(id, json!({"worker": wid}))
                } else {
                    err(id, &format!("Program not found: {pid}"))
                }
            }
            "shutdown" => {
                let _ = stdout.write_all(&ok(id, json!({})).unwrap()).await;
                return ExitInfo::Code(0);
            }
            other => err(id, &format!("Unknown command: {other}")),
        };
        if let Some(bytes) = reply {
            if stdout.write_all(&bytes).await.is_err() {
                return ExitInfo::Code(1);
            }
        }
    }
}

fn frame(v: Value) -> Option<Vec<u8>> {
    let body = serde_json::to_vec(&v).unwrap();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    Some(out)
}

fn ok(id: u64, result: Value) -> Option<Vec<u8>> {
    frame(json!({"id": id, "success": true, "result": result}))
}

fn err(id: u64, msg: &str) -> Option<Vec<u8>> {
    frame(json!({"id": id, "success": false, "error": msg}))
}

/// A reply sink backed by a oneshot channel.
pub struct Chan(pub oneshot::Sender<Delivery>);

impl ReplySink for Chan {
    fn deliver(self: Box<Self>, d: Delivery) {
        let _ = self.0.send(d);
    }
}

pub fn sink() -> (Box<dyn ReplySink>, oneshot::Receiver<Delivery>) {
    let (tx, rx) = oneshot::channel();
    (Box::new(Chan(tx)), rx)
}

/// Lifecycle events, as a stream tests can await instead of sleeping.
#[derive(Debug, PartialEq)]
pub enum Event {
    Started(WorkerId),
    Exited(WorkerId),
    Stopped,
}

pub struct Events(pub mpsc::UnboundedSender<Event>);

impl EventSink for Events {
    fn log(&self, _w: WorkerId, _level: &'static str, _line: String) {}
    fn worker_started(&self, w: WorkerId, _pid: Option<u32>, _ms: u64) {
        let _ = self.0.send(Event::Started(w));
    }
    fn worker_exited(&self, w: WorkerId, _reason: String) {
        let _ = self.0.send(Event::Exited(w));
    }
    fn stopped(&self) {
        let _ = self.0.send(Event::Stopped);
    }
}

/// Unwraps a reply delivery.
pub fn reply(d: Delivery) -> Result<Value, PoolError> {
    match d {
        Delivery::Reply(r) => r.map(|json| serde_json::from_slice(&json).expect("a JSON result")),
        Delivery::Assigned => panic!("expected a reply, got Assigned"),
    }
}
