#!/usr/bin/env python3
"""Fork server ("zygote") of dspex_native_pool: starts a pool's workers so the VM never forks.

    python fork_server.py --script S --python P --parent BEAM_PID [--mode fork|spawn]

The pool starts this process once per pool, with posix_spawn (no code runs in a forked copy of
the VM). Its stdin (fd 0) is a SOCK_SEQPACKET control socket to the pool; each message is one
JSON object:

    pool -> server  {"op": "fork", "seq": N, "argv": [...]}  + SCM_RIGHTS [stdin, stdout, stderr]
    server -> pool  {"op": "ready", "mode": "fork"|"spawn", "pid": P, "note": str|null}
                    {"op": "forked", "seq": N, "pid": P}      + SCM_RIGHTS [pidfd of the worker]
                    {"op": "error", "seq": N, "error": str}
                    {"op": "exit", "pid": P, "code": C} | {"op": "exit", "pid": P, "signal": S}

Modes. ``fork``: the worker script is imported once here (with DSPy, when it imports it) and each
worker is a fork of this process that runs ``script.main(argv)``: no import per worker, and the
pages of the import are shared. A script supports this when it defines a top-level ``main(argv)``
and calls it only under ``if __name__ == "__main__"``; any other script (or one whose import
fails here, or starts threads) is served in ``spawn`` mode: each worker is a fork of this small process that execs
``python script argv...`` at once.

What is imported once: the script, then whatever its optional ``fork_server_preload()`` imports
(it may also set environment defaults); without that hook, DSPy when the script imports it.

Lifetime. The server dies with the VM: ``PR_SET_PDEATHSIG`` on itself (checked against the VM's
pid after the call) and EOF on its control socket both make it SIGKILL every worker's process
group and exit. A worker does not die with the server (the pool restarts a crashed server and
keeps its workers); a forked worker instead watches the VM itself through a pidfd, and every
worker reads stdin, which reaches EOF when the VM dies. At each worker exit the server signals
the worker's whole process group *before* reaping it (so the group id cannot be reused), which
ends whatever the worker left behind.
"""

from __future__ import annotations

import argparse
import ast
import errno
import gc
import json
import os
import select
import signal
import socket
import sys
import threading

MAX_MESSAGE = 1 << 20


def log(level: str, msg: str) -> None:
    try:
        os.write(2, f"{level} fork_server: {msg}\n".encode(errors="replace"))
    except OSError:
        pass


def set_death_signal(sig: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def supports_fork(script: str) -> str | None:
    """None when the script can be imported once and run per worker as ``main(argv)``; else why not."""
    try:
        with open(script, "rb") as f:
            tree = ast.parse(f.read(), script)
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot read {script}: {exc}"
    has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" and
                   (n.args.args or n.args.vararg) for n in tree.body)
    if not has_main:
        return "it defines no top-level main(argv)"
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            return "it runs code at import outside `if __name__ == \"__main__\"`"
    return None


def import_script(script: str):
    import importlib.util

    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    spec = importlib.util.spec_from_file_location("dspex_pool_worker", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["dspex_pool_worker"] = module
    spec.loader.exec_module(module)
    preload = getattr(module, "fork_server_preload", None)
    if callable(preload):
        preload()  # the script's own list of what to import once (and environment defaults)
        return module
    with open(script, encoding="utf-8", errors="replace") as f:
        source = f.read()
    if "import dspy" in source:
        # What main() imports anyway; doing it here is the point of the fork server. (Not
        # LiteLLM: DSPy imports it only for a real LM call, and it costs 3x DSPy's import.)
        import dspy  # noqa: F401
    return module


def os_thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


class Server:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.beam = opts.parent
        self.sock = socket.socket(fileno=0)
        self.sock.setblocking(True)
        self.children: set[int] = set()
        self.module = None
        self.mode = "spawn"
        self.note: str | None = None
        self.warned_files = False

    # ----------------------------------------------------------------- start

    def start(self) -> None:
        # Nothing of the VM stays open here: only the control socket and stdio.
        os.closerange(3, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") < 1 << 20 else 1 << 20)
        set_death_signal(signal.SIGTERM)
        if os.getppid() != self.beam:
            os._exit(1)  # the VM died before the death signal was armed
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        why = self.opts.fallback
        if self.opts.mode == "fork" and why is None:
            why = supports_fork(self.opts.script)
            if why is None:
                try:
                    self.module = import_script(self.opts.script)
                    if threading.active_count() != 1 or os_thread_count() != 1:
                        why = "importing it started threads, and fork() would copy only one"
                    else:
                        self.mode = "fork"
                except BaseException as exc:  # noqa: BLE001 - any failure means: exec instead
                    why = f"importing it failed: {type(exc).__name__}: {exc}"
                if why is not None:
                    # Whatever the import left (threads, half-built modules) must not be in
                    # the process that forks: start afresh, serving in spawn mode.
                    argv = [sys.executable, os.path.abspath(__file__), "--script", self.opts.script,
                            "--python", self.opts.python, "--parent", str(self.beam),
                            "--mode", "spawn", "--fallback", why]
                    sys.stderr.flush()
                    os.execv(sys.executable, argv)
        if why is not None:
            self.note = (f"{self.opts.script} does not support the fork server ({why}); "
                         "starting its workers with :spawn")
            log("WARNING", self.note)
        # The death signal and EOF both end us; SIGCHLD wakes the loop (ERTS ignores it, which
        # would make the kernel reap our children before we could read their status).
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        if self.mode == "fork":
            # What the import built is shared by every fork; keep the children's garbage
            # collector off it, or its bookkeeping writes would copy those pages into each.
            gc.collect()
            gc.freeze()
        self.send({"op": "ready", "mode": self.mode, "pid": os.getpid(), "note": self.note})

    # ----------------------------------------------------------------- loop

    def run(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.sock, self.wake_r], [], [])
            except InterruptedError:
                continue
            if self.wake_r in ready:
                try:
                    signals = os.read(self.wake_r, 4096)
                except BlockingIOError:
                    signals = b""
                self.reap()
                if signal.SIGTERM in signals or os.getppid() != self.beam:
                    self.die()
            if self.sock in ready:
                try:
                    msg, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 8)
                except OSError as exc:
                    log("ERROR", f"control socket: {exc}")
                    self.die()
                if not msg:
                    self.die()  # the pool is gone
                try:
                    self.handle(json.loads(msg), fds)
                finally:
                    for fd in fds:
                        os.close(fd)

    def handle(self, req: dict, fds: list[int]) -> None:
        if req.get("op") != "fork":
            return
        seq = req["seq"]
        try:
            if len(fds) != 3:
                raise ValueError(f"expected 3 descriptors, got {len(fds)}")
            self.check_single_threaded()
            self.check_no_open_files(fds)
            pid = self.fork(req["argv"], fds)
        except Exception as exc:  # noqa: BLE001 - reported to the pool as a start failure
            self.send({"op": "error", "seq": seq, "error": f"{type(exc).__name__}: {exc}"})
            return
        self.children.add(pid)
        pidfd = os.pidfd_open(pid)  # our unreaped child: this pid cannot have been reused
        try:
            self.send({"op": "forked", "seq": seq, "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)

    def check_single_threaded(self) -> None:
        """fork() copies only the calling thread: a lock held by another would never be released."""
        if threading.active_count() != 1 or os_thread_count() != 1:
            raise RuntimeError(f"the fork server has {threading.active_count()} Python threads and "
                               f"{os_thread_count()} OS threads; refusing to fork")

    def check_no_open_files(self, passing: list[int]) -> None:
        """Children close every descriptor above 2, but a Python object of the import still
        holding one (a database, a socket) would then be shared state gone wrong: say so once."""
        if self.warned_files:
            return
        ours = {0, 1, 2, self.wake_r, self.wake_w, *passing}
        try:
            extra = {int(fd) for fd in os.listdir("/proc/self/fd")} - ours
        except OSError:
            return
        extra = [fd for fd in extra if os.path.exists(f"/proc/self/fd/{fd}")]  # not listdir's own
        if extra:
            self.warned_files = True
            log("WARNING", f"descriptors {sorted(extra)} were opened by the import; forked "
                           "workers close them, so objects using them will fail")

    def fork(self, argv: list[str], fds: list[int]) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            try:
                os.setpgid(pid, pid)  # the child does it too: whichever runs first wins the race
            except OSError:
                pass  # it already exec'd (EACCES) or died
            return pid
        # ---- child: never return from here
        code = 1
        try:
            self.become_worker(fds)
            code = self.run_worker(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:  # noqa: BLE001
                pass
            os._exit(code)

    def become_worker(self, fds: list[int]) -> None:
        os.setpgid(0, 0)  # its own group: signals reach whatever it starts
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)  # dup2 clears close-on-exec on the target
        os.closerange(3, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") < 1 << 20 else 1 << 20)

    def run_worker(self, argv: list[str]) -> int:
        if self.mode == "spawn":
            python = self.opts.python
            os.execvp(python, [python, self.opts.script, *argv])
        watch_vm(self.beam)
        reinit_after_fork()
        sys.argv = [self.opts.script, *argv]
        self.module.main(argv)
        return 0

    # ----------------------------------------------------------------- exits

    def reap(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            # Still a zombie, so its group id cannot have been reused: end what it left behind.
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            _, status = os.waitpid(pid, 0)
            self.children.discard(pid)
            if os.WIFSIGNALED(status):
                self.send({"op": "exit", "pid": pid, "signal": os.WTERMSIG(status)})
            else:
                self.send({"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    def die(self) -> None:
        for pid in list(self.children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(0)

    def send(self, msg: dict, fds: list[int] | None = None) -> None:
        data = json.dumps(msg).encode()
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                self.die()
            raise


def watch_vm(beam: int) -> None:
    """A forked worker outlives a crashed fork server, so it watches the VM itself: when the VM
    dies, the worker's whole group (itself and whatever it started) is killed."""
    try:
        pidfd = os.pidfd_open(beam)
    except OSError:
        os._exit(1)  # the VM is already gone

    def run() -> None:
        select.select([pidfd], [], [])
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=run, name="vm-watch", daemon=True).start()


def reinit_after_fork() -> None:
    """State a forked worker must not share with its siblings."""
    import random

    random.seed()  # also done by CPython's at-fork hook; explicit for clarity
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            np.random.seed()
        except Exception:  # noqa: BLE001
            pass
    litellm = sys.modules.get("litellm")
    if litellm is not None:
        # Cached HTTP clients (and their connection pools) are per process.
        cache = getattr(litellm, "in_memory_llm_clients_cache", None)
        for name in ("flush_cache", "clear"):
            if cache is not None and hasattr(cache, name):
                try:
                    getattr(cache, name)()
                except Exception:  # noqa: BLE001
                    pass
                break


def main() -> None:
    parser = argparse.ArgumentParser(description="fork server of dspex_native_pool")
    parser.add_argument("--script", required=True)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--mode", choices=["fork", "spawn"], default="fork")
    parser.add_argument("--fallback", default=None, help="why fork mode was given up (internal)")
    server = Server(parser.parse_args())
    server.start()
    server.run()


if __name__ == "__main__":
    main()
