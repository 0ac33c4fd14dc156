#!/usr/bin/env python3
"""A fast, dependency-free stand-in for dspy_bridge.py, for the pool's tests.

Speaks the same protocol (4-byte big-endian length + UTF-8 JSON on
stdin/stdout), mimics the bridge's session commands without DSPy, and has
commands that misbehave on purpose (die, hang, write garbage, answer with the
wrong id) so every failure path of the pool can be exercised.

    python test_worker.py [--worker-id ID] [--mode pool-worker]

Environment knobs: TEST_WORKER_FAIL_ON_START=1 (traceback, exit 1, never
answers), TEST_WORKER_START_DELAY_MS=n (sleep before serving).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TEST_WORKER_FAIL_ON_START") == "1":
    raise RuntimeError("TEST_WORKER_FAIL_ON_START is set")

import argparse
import json
import logging
import signal
import time
from typing import Any, Callable

try:
    import orjson
except ImportError:
    orjson = None

log = logging.getLogger("test_worker")


def read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def write_frame(fd: int, body: bytes) -> None:
    view = memoryview(len(body).to_bytes(4, "big") + body)
    while view:
        view = view[os.write(fd, view):]


def encode(obj: Any) -> bytes:
    if orjson:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS, default=str)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def decode(body: bytes) -> Any:
    return orjson.loads(body) if orjson else json.loads(body)


class Reply(Exception):
    """Raised by a command that answers with something other than a normal frame."""

    def __init__(self, body: bytes | None) -> None:
        super().__init__()
        self.body = body  # None: send nothing at all


class Worker:
    COMMANDS = frozenset({
        "ping", "echo", "sleep", "exit", "kill_self", "print_stdout", "garbage_stdout", "garbage_json",
        "wrong_id", "no_success_key", "fail", "big", "stderr", "stats", "shutdown", "configure_lm",
        "create_program", "execute_program", "list_programs", "delete_program", "cleanup_session",
        "restore_session",
    })

    def __init__(self, worker_id: str | None, proto_fd: int) -> None:
        self.worker_id, self.proto_fd = worker_id, proto_fd
        self.calls = 0
        self.sessions: dict[str, dict[str, dict[str, Any]]] = {}  # session -> program id -> spec
        self.session_lms: dict[str, dict[str, Any]] = {}
        self.global_lm: dict[str, Any] | None = None
        self.counter = 0
        self.shutdown_requested = False
        self.request_id = 0

    # -- helpers

    @staticmethod
    def _session(args: dict[str, Any]) -> str:
        sid = args.get("session_id")
        if not isinstance(sid, str) or not sid:
            raise ValueError("session_id is required in pool-worker mode")
        return sid

    def _program(self, args: dict[str, Any]) -> tuple[str, str]:
        sid, pid = self._session(args), args.get("program_id")
        if pid not in self.sessions.get(sid, {}):
            raise ValueError(f"Program not found: {pid}")
        return sid, pid

    # -- plain commands

    def ping(self, args):
        return {"status": "ok", "worker_id": self.worker_id, "pid": os.getpid()}

    def echo(self, args):
        return args

    def sleep(self, args):
        time.sleep(args.get("ms", 0) / 1000)
        return {"slept": args.get("ms", 0)}

    def exit(self, args):
        os._exit(int(args.get("code", 0)))

    def kill_self(self, args):
        os.kill(os.getpid(), signal.SIGKILL)

    def print_stdout(self, args):
        print(args.get("text", ""))  # sys.stdout is stderr: must not reach the protocol
        return {"printed": True}

    def garbage_stdout(self, args):
        os.write(self.proto_fd, b"this is not a frame\n")
        raise Reply(None)

    def garbage_json(self, args):
        raise Reply(b"not json{")

    def wrong_id(self, args):
        raise Reply(encode({"id": self.request_id + 1000, "success": True, "result": {}}))

    def no_success_key(self, args):
        raise Reply(encode({"id": self.request_id, "result": 1}))

    def fail(self, args):
        raise ValueError(args.get("message", "failed on request"))

    def big(self, args):
        return {"data": "x" * int(args.get("bytes", 0))}

    def stderr(self, args):
        sys.stderr.write(str(args.get("line", "")) + "\n")
        sys.stderr.flush()
        return {"ok": True}

    def stats(self, args):
        return {"calls": self.calls, "pid": os.getpid(),
                "sessions": {sid: list(progs) for sid, progs in self.sessions.items()}}

    def shutdown(self, args):
        self.shutdown_requested = True
        return {"status": "shutting_down", "worker_id": self.worker_id}

    # -- session mimicry of dspy_bridge.py (pool-worker mode)

    def configure_lm(self, args):
        sid = args.get("session_id")
        cfg = {k: v for k, v in args.items() if k != "session_id"}
        if isinstance(sid, str) and sid:
            self.session_lms[sid] = cfg
        else:
            self.global_lm = cfg
        return {"configured": True, "status": "configured", "scope": "session" if sid else "global"}

    def create_program(self, args):
        programs = self.sessions.setdefault(self._session(args), {})
        pid = args.get("id")
        if not pid:
            while (pid := f"prog_{self.counter + 1}") in programs:
                self.counter += 1
            self.counter += 1
        elif pid in programs:
            raise ValueError(f"Program already exists: {pid}")
        programs[pid] = {**{k: v for k, v in args.items() if k != "session_id"}, "id": pid}
        return {"program_id": pid}

    def execute_program(self, args):
        _, pid = self._program(args)
        return {"outputs": {"answer": "ok"}, "program_id": pid, "worker_pid": os.getpid()}

    def list_programs(self, args):
        programs = list(self.sessions.get(self._session(args), {}))
        return {"programs": programs, "total_count": len(programs)}

    def delete_program(self, args):
        sid, pid = self._program(args)
        del self.sessions[sid][pid]
        return {"program_id": pid, "status": "deleted"}

    def cleanup_session(self, args):
        sid = self._session(args)
        programs = self.sessions.pop(sid, None)
        self.session_lms.pop(sid, None)
        return {"status": "cleaned" if programs is not None else "not_found", "session_id": sid,
                "programs_removed": len(programs or {})}

    def restore_session(self, args):
        sid = self._session(args)
        specs = args.get("programs") or []
        if not all(isinstance(s, dict) and s.get("id") for s in specs):
            raise ValueError("restore_session: every program spec needs an id")
        self.sessions[sid] = {s["id"]: s for s in specs}
        if args.get("lm") is not None:
            self.session_lms[sid] = args["lm"]
        else:
            self.session_lms.pop(sid, None)
        return {"session_id": sid, "programs": len(specs)}

    # -- dispatch

    def handle(self, body: bytes) -> bytes | None:
        self.calls += 1
        try:
            request = decode(body)
        except ValueError as exc:
            return encode({"id": 0, "success": False, "error": f"invalid request: {exc}"})
        if not isinstance(request, dict) or not isinstance(request.get("id"), int):
            return encode({"id": 0, "success": False, "error": "invalid request: expected an object with an integer id"})
        self.request_id = request["id"]
        command, args = request.get("command"), request.get("args") or {}
        if command not in self.COMMANDS:
            return encode({"id": self.request_id, "success": False, "error": f"Unknown command: {command}"})
        handler: Callable[[dict[str, Any]], Any] = getattr(self, command)
        try:
            return encode({"id": self.request_id, "success": True, "result": handler(args)})
        except Reply as reply:
            return reply.body
        except Exception as exc:
            return encode({"id": self.request_id, "success": False, "error": str(exc)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker-id", default=None)
    opts, _ = parser.parse_known_args()  # accepts --mode etc. like the real bridge

    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    delay_ms = int(os.environ.get("TEST_WORKER_START_DELAY_MS", "0") or 0)
    if delay_ms > 0:
        time.sleep(delay_ms / 1000)

    worker = Worker(opts.worker_id, proto_fd)
    log.info("worker %s ready (pid %d)", opts.worker_id or "-", os.getpid())
    while True:
        header = read_exact(0, 4)
        body = read_exact(0, int.from_bytes(header, "big")) if header else None
        if body is None:
            os._exit(0)  # stdin closed: the VM is gone
        reply = worker.handle(body)
        if reply is not None:
            try:
                write_frame(proto_fd, reply)
            except BrokenPipeError:
                os._exit(0)
        if worker.shutdown_requested:
            os._exit(0)


if __name__ == "__main__":
    main()
