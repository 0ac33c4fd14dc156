//! The library's one Tokio runtime.
//!
//! Created at NIF load with two worker threads (this work is I/O, not CPU): they read worker
//! pipes, fire timeouts and start processes. The SIGCHLD handler is installed here, before any
//! child exists: ERTS sets SIGCHLD to SIG_IGN, under which the kernel reaps children itself and
//! `waitpid` fails with ECHILD, so no exit status could ever be reported.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

const THREADS: usize = 2;

/// Returns the runtime, creating it (and the SIGCHLD handler) on first use.
pub fn handle() -> &'static Handle {
    RUNTIME
        .get_or_init(|| {
            let rt = Builder::new_multi_thread()
                .worker_threads(THREADS)
                .thread_name("dspex-pool")
                .enable_all()
                .build()
                .expect("failed to start the Tokio runtime");
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let mut sigchld = signal(SignalKind::child()).expect("SIGCHLD handler");
                // Keep the stream alive; tokio's process driver does the reaping.
                tokio::spawn(async move { while sigchld.recv().await.is_some() {} });
            });
            rt
        })
        .handle()
}

pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    handle().spawn(fut)
}

/// Whether the current thread belongs to the runtime (where `OwnedEnv::send_and_clear` works).
pub fn on_runtime_thread() -> bool {
    Handle::try_current().is_ok()
}
