#!/usr/bin/env python3
"""A fast, dependency-free stand-in for dspy_bridge.py, for the pool's tests.

Speaks the same protocol (4-byte big-endian length + UTF-8 JSON on
stdin/stdout), mimics the bridge's session commands without DSPy, and has
commands that misbehave on purpose (die, hang, write garbage, answer with the
wrong id) so every failure path of the pool can be exercised.

    python test_worker.py [--worker-id ID] [--mode pool-worker]

A successful reply to a request whose args hold "nonce" carries that nonce in its result
(when the result is an object), so a caller can check the reply is its own.

Environment knobs:
  TEST_WORKER_FAIL_ON_START=1     traceback, exit 1, never answers
  TEST_WORKER_START_DELAY_MS=n    sleep before serving
  TEST_WORKER_BANNER=text         write text (and a newline) on the protocol stdout at start,
                                  as a library printing a banner would ("1": a default banner)
  TEST_WORKER_STDERR_FLOOD=n      write n lines to stderr at start
  TEST_WORKER_PROTOCOL=2          (or --protocol 2) answer the handshake ping with protocol 2;
                                  default/1: v1 only (the handshake gets a plain ping reply)
  TEST_WORKER_CONCURRENCY=n       (or --concurrency n) announced under protocol 2 (default 8)

Under protocol 2, sleep/chunks/tool run on their own threads (so they overlap
and can be cancelled with {"id": N, "control": "cancel"}, then reply
{"success": false, "error": "cancelled"}); everything else, pings included,
is answered at once by the reading thread.

Misbehaving commands: exit, kill_self, garbage_stdout, garbage_json, wrong_id,
no_success_key, reply_twice, unparseable, stderr_flood, spawn_grandchild,
go_silent (never write anything again, not even to pings), big, print_stdout.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TEST_WORKER_FAIL_ON_START") == "1":
    raise RuntimeError("TEST_WORKER_FAIL_ON_START is set")

import argparse
import json
import logging
import re
import signal
import subprocess
import threading
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


_ID_PREFIX = re.compile(rb'\A\s*\{\s*"id"\s*:\s*(-?\d{1,19})\s*[,}]')


def id_from_prefix(body: bytes) -> int | None:
    """The id of a request that cannot be parsed, from its first bytes ('{"id":N,'), else None."""
    match = _ID_PREFIX.match(body[:64])
    return int(match.group(1)) if match else None


class Cancelled(Exception):
    pass


class InFlight:
    """A protocol-2 request running on its own thread."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.tool_results: dict[int, Any] = {}
        self.changed = threading.Condition()

    def sleep(self, seconds: float) -> None:
        if self.cancelled.wait(seconds):
            raise Cancelled()


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
        "restore_session", "reply_twice", "unparseable", "stderr_flood", "spawn_grandchild", "go_silent",
        "chunks", "tool", "gate", "split",
    })
    THREADED = frozenset({"sleep", "chunks", "tool", "gate"})  # under protocol 2: run on their own threads

    def __init__(self, worker_id: str | None, proto_fd: int, protocol: int = 1, concurrency: int = 8) -> None:
        self.worker_id, self.proto_fd = worker_id, proto_fd
        self.max_protocol, self.concurrency = protocol, concurrency
        self.protocol = 1  # until a handshake ping asks for 2 (and we allow it)
        self.write_lock = threading.Lock()
        self.silent = False
        self.in_flight: dict[int, InFlight] = {}
        self.peak_in_flight = 0
        self.cancelled_ids: list[int] = []
        self.grandchildren: list[int] = []
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
        result = {"status": "ok", "worker_id": self.worker_id, "pid": os.getpid()}
        if args.get("handshake") and self.max_protocol >= 2 and isinstance(args.get("protocol"), int) \
                and args["protocol"] >= 2:
            self.protocol = 2
        if self.protocol >= 2:
            result.update(protocol=2, concurrency=self.concurrency, features=["cancel", "chunks", "tool_calls"],
                          in_flight=len(self.in_flight))
        return result

    def echo(self, args):
        return args

    def sleep(self, args, flight: InFlight | None = None):
        seconds = args.get("ms", 0) / 1000
        if flight is not None:
            flight.sleep(seconds)
        else:
            time.sleep(seconds)
        return {"slept": args.get("ms", 0)}

    def chunks(self, args, flight: InFlight | None = None):
        """n chunk events for one field, delay_ms apart, then the reply."""
        n, field = int(args.get("n", 3)), str(args.get("field", "answer"))
        delay = args.get("delay_ms", 0) / 1000
        for i in range(n):
            if i and delay:
                flight.sleep(delay) if flight else time.sleep(delay)
            if flight is not None and flight.cancelled.is_set():
                raise Cancelled()
            self.send({"id": self.current_id(), "event": "chunk", "field": field, "text": f"chunk {i} "})
        return {"chunks": n, "field": field}

    def tool(self, args, flight: InFlight | None = None):
        """A tool_call event per call; replies with what each tool_result carried."""
        if flight is None:
            raise ValueError("tool needs protocol 2")
        calls = args.get("calls") or [{"name": args.get("name", "lookup"), "args": args.get("args", {})}]
        rid, answers = self.current_id(), []
        for call_id, call in enumerate(calls, 1):
            self.send({"id": rid, "event": "tool_call", "call_id": call_id, "name": call.get("name"),
                       "args": call.get("args", {})})
            with flight.changed:
                while call_id not in flight.tool_results:
                    if flight.cancelled.is_set():
                        raise Cancelled()
                    flight.changed.wait(0.05)
                answers.append(flight.tool_results.pop(call_id))
        return {"tool_results": answers}

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

    def reply_twice(self, args):
        body = encode({"id": self.request_id, "success": True, "result": {"twice": True}})
        self.send_body(body)
        raise Reply(body)

    def unparseable(self, args):
        """Answer as a worker that could not parse this request: for its id, or (id_known: false) id null."""
        rid = self.request_id if args.get("id_known", True) else None
        raise Reply(encode({"id": rid, "success": False, "error": "invalid request: could not parse it"}))

    def stderr_flood(self, args):
        lines, size = int(args.get("lines", 1000)), int(args.get("bytes", 200))
        line = ("E" * size).encode()
        end = b"" if args.get("no_newline") else b"\n"
        for _ in range(lines):
            os.write(2, line + end)
        return {"lines": lines, "bytes": size}

    def spawn_grandchild(self, args):
        """Start a child that outlives us unless our process group is signalled."""
        child = subprocess.Popen(["sleep", str(int(args.get("seconds", 3600)))], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.grandchildren.append(child.pid)
        return {"pid": child.pid, "pgid": os.getpgid(child.pid)}

    def go_silent(self, args):
        """Never write anything again (reading continues: stdin EOF still ends us). With after_ms:
        reply now, fall silent that much later (requests in flight then never get their reply)."""
        after_ms = args.get("after_ms")
        if after_ms is None:
            self.silent = True
            raise Reply(None)
        timer = threading.Timer(after_ms / 1000, lambda: setattr(self, "silent", True))
        timer.daemon = True
        timer.start()
        return {"silent_in_ms": after_ms}

    def fail(self, args):
        raise ValueError(args.get("message", "failed on request"))

    def gate(self, args, flight: InFlight | None = None):
        """Answers once the file at `path` exists (the test opens the gate when it is ready)."""
        while not os.path.exists(args["path"]):
            if flight is not None:
                flight.sleep(0.001)
            else:
                time.sleep(0.001)
        return {"opened": True, "pid": os.getpid()}

    def split(self, args):
        """Writes its reply frame in `pieces` writes, pausing between them, so the pool reads
        it in several parts (`bytes`: the size of its data)."""
        body = encode({"id": self.current_id(), "success": True,
                       "result": {"data": "y" * int(args.get("bytes", 100)), "nonce": args.get("nonce")}})
        frame = memoryview(len(body).to_bytes(4, "big") + body)
        step = -(-len(frame) // max(1, int(args.get("pieces", 8))))
        with self.write_lock:
            for start in range(0, len(frame), step):
                piece = frame[start:start + step]
                while piece:
                    piece = piece[os.write(self.proto_fd, piece):]
                time.sleep(0.002)
        raise Reply(None)

    def big(self, args):
        return {"data": "x" * int(args.get("bytes", 0))}

    def stderr(self, args):
        sys.stderr.write(str(args.get("line", "")) + "\n")
        sys.stderr.flush()
        return {"ok": True}

    def stats(self, args):
        return {"calls": self.calls, "pid": os.getpid(),
                "sessions": {sid: list(progs) for sid, progs in self.sessions.items()},
                "protocol": self.protocol, "in_flight": len(self.in_flight), "peak_in_flight": self.peak_in_flight,
                "cancelled_ids": self.cancelled_ids[-100:], "grandchildren": self.grandchildren}

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

    # -- output

    def send_body(self, body: bytes) -> None:
        if self.silent:
            return
        with self.write_lock:
            try:
                write_frame(self.proto_fd, body)
            except BrokenPipeError:
                os._exit(0)

    def send(self, frame: dict[str, Any]) -> None:
        self.send_body(encode(frame))

    _local = threading.local()

    def current_id(self) -> int:
        return getattr(self._local, "request_id", self.request_id)

    # -- dispatch

    def handle(self, body: bytes) -> bytes | None:
        self.calls += 1
        try:
            request = decode(body)
        except ValueError as exc:
            return encode({"id": id_from_prefix(body), "success": False, "error": f"invalid request: {exc}"})
        if not isinstance(request, dict) or not isinstance(request.get("id"), int):
            return encode({"id": id_from_prefix(body), "success": False,
                           "error": "invalid request: expected an object with an integer id"})
        if "control" in request:
            self.control(request)
            return None
        self.request_id = request["id"]
        self._local.request_id = request["id"]
        command, args = request.get("command"), request.get("args") or {}
        if command not in self.COMMANDS:
            return encode({"id": self.request_id, "success": False, "error": f"Unknown command: {command}"})
        if self.protocol >= 2 and command in self.THREADED:
            self.start_thread(self.request_id, command, args)
            return None
        return self.run(self.request_id, command, args)

    def run(self, rid: int, command: str, args: dict[str, Any], flight: InFlight | None = None) -> bytes | None:
        handler: Callable[..., Any] = getattr(self, command)
        try:
            result = handler(args, flight) if command in self.THREADED else handler(args)
            if isinstance(result, dict) and "nonce" in args:
                result = {**result, "nonce": args["nonce"]}  # so a caller can check the reply is its own
            return encode({"id": rid, "success": True, "result": result})
        except Reply as reply:
            return reply.body
        except Cancelled:
            return encode({"id": rid, "success": False, "error": "cancelled"})
        except Exception as exc:
            return encode({"id": rid, "success": False, "error": str(exc)})

    def start_thread(self, rid: int, command: str, args: dict[str, Any]) -> None:
        if rid in self.in_flight:
            self.send({"id": rid, "success": False, "error": f"request id {rid} is already in flight"})
            return
        flight = self.in_flight[rid] = InFlight()
        self.peak_in_flight = max(self.peak_in_flight, len(self.in_flight))

        def work() -> None:
            self._local.request_id = rid
            try:
                reply = self.run(rid, command, args, flight)
            finally:
                self.in_flight.pop(rid, None)
            if reply is not None:
                self.send_body(reply)

        threading.Thread(target=work, name=f"request-{rid}", daemon=True).start()

    def control(self, frame: dict[str, Any]) -> None:
        flight = self.in_flight.get(frame["id"])
        if flight is None:
            return  # finished or unknown: ignored
        if frame.get("control") == "cancel":
            self.cancelled_ids.append(frame["id"])
            flight.cancelled.set()
        elif frame.get("control") == "tool_result":
            with flight.changed:
                flight.tool_results[frame.get("call_id")] = {k: v for k, v in frame.items()
                                                             if k not in ("id", "control")}
                flight.changed.notify_all()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--protocol", default=os.environ.get("TEST_WORKER_PROTOCOL", "1"))
    parser.add_argument("--concurrency", default=os.environ.get("TEST_WORKER_CONCURRENCY", "8"))
    opts, _ = parser.parse_known_args()  # accepts --mode etc. like the real bridge

    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    banner = os.environ.get("TEST_WORKER_BANNER")
    if banner:
        os.write(proto_fd, (("Welcome to some library v1.0" if banner == "1" else banner) + "\n").encode())
    flood = int(os.environ.get("TEST_WORKER_STDERR_FLOOD", "0") or 0)
    for i in range(flood):
        os.write(2, f"flood line {i} ".encode() + b"E" * 180 + b"\n")
    delay_ms = int(os.environ.get("TEST_WORKER_START_DELAY_MS", "0") or 0)
    if delay_ms > 0:
        time.sleep(delay_ms / 1000)

    worker = Worker(opts.worker_id, proto_fd, protocol=int(opts.protocol), concurrency=int(opts.concurrency))
    log.info("worker %s ready (pid %d)", opts.worker_id or "-", os.getpid())
    while True:
        header = read_exact(0, 4)
        body = read_exact(0, int.from_bytes(header, "big")) if header else None
        if body is None:
            os._exit(0)  # stdin closed: the VM is gone
        reply = worker.handle(body)
        if reply is not None:
            worker.send_body(reply)
        if worker.shutdown_requested:
            os._exit(0)


if __name__ == "__main__":
    main()
