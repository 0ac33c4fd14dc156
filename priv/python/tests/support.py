"""Helpers shared by the tests: drive a worker subprocess over its real framing."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
BRIDGE = ROOT / "priv" / "python" / "dspy_bridge.py"
TEST_WORKER = ROOT / "test" / "support" / "test_worker.py"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
REPLY_TIMEOUT = 20.0

# Runs a worker script after optionally hiding orjson (to exercise the stdlib
# json path) or making dspy.Predict misbehave like a noisy library: print to
# sys.stdout, write to fd 1 from C level and from a child process, or block.
LAUNCHER = textwrap.dedent("""
    import os, runpy, subprocess, sys, threading
    script = sys.argv[1]
    if os.environ.get("LAUNCH_BLOCK_ORJSON") == "1":
        sys.modules["orjson"] = None  # "import orjson" now raises ImportError
    if os.environ.get("LAUNCH_NOISY_DSPY") == "1":
        import dspy
        original, original_async = dspy.Predict.forward, dspy.Predict.aforward
        def misbehave(kwargs):
            values = " ".join(str(v) for v in kwargs.values())
            if "__print__" in values:
                print("PRINTED-BY-LIBRARY")
                os.write(1, b"WRITTEN-TO-FD-1\\n")
                subprocess.run(["echo", "CHILD-STDOUT"], check=True)
            if "__block__" in values:  # blocks the whole event loop
                sys.stderr.write("LONG-CALL-STARTED\\n")
                sys.stderr.flush()
                threading.Event().wait(120)
        def forward(self, **kwargs):
            misbehave(kwargs)
            return original(self, **kwargs)
        async def aforward(self, **kwargs):
            misbehave(kwargs)
            return await original_async(self, **kwargs)
        dspy.Predict.forward, dspy.Predict.aforward = forward, aforward
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
""")

QA = {"inputs": [{"name": "question", "description": "a question"}],
      "outputs": [{"name": "answer", "description": "the answer"}]}


class Worker:
    """A worker subprocess driven over its stdin/stdout pipes."""

    def __init__(self, script: Path, *args: str, env: dict[str, str] | None = None,
                 launcher: Path | None = None) -> None:
        argv = [sys.executable, *([str(launcher)] if launcher else []), str(script), *args]
        full_env = {**os.environ, "DSPY_CACHEDIR": CACHE_DIR, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0, env=full_env)
        self.next_id = 1
        self.stderr_lines: list[str] = []
        self._stderr_changed = threading.Condition()
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self._drain.start()

    def _drain_stderr(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            with self._stderr_changed:
                self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._stderr_changed.notify_all()

    def wait_for_stderr(self, needle: str, timeout: float = REPLY_TIMEOUT) -> None:
        with self._stderr_changed:
            if not self._stderr_changed.wait_for(
                    lambda: any(needle in line for line in self.stderr_lines), timeout):
                raise AssertionError(f"{needle!r} not on stderr: {self.stderr_lines}")

    def stderr_until_closed(self) -> list[str]:
        """All stderr lines, once the worker has exited and closed stderr."""
        self._drain.join(REPLY_TIMEOUT)
        with self._stderr_changed:
            return list(self.stderr_lines)

    def stderr_text(self) -> str:
        with self._stderr_changed:
            return "\n".join(self.stderr_lines)

    # -- framing

    def send_body(self, body: bytes) -> None:
        self.proc.stdin.write(len(body).to_bytes(4, "big") + body)
        self.proc.stdin.flush()

    def send(self, command: str, args: Any = None, request_id: int | None = None) -> int:
        if request_id is None:
            request_id, self.next_id = self.next_id, self.next_id + 1
        request = {"id": request_id, "command": command, "args": {} if args is None else args,
                   "timestamp": time.time()}
        self.send_body(json.dumps(request).encode())
        return request_id

    def read_exact(self, n: int, timeout: float = REPLY_TIMEOUT) -> bytes:
        fd, buf = self.proc.stdout.fileno(), bytearray()
        deadline = time.monotonic() + timeout
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply within {timeout}s; stderr:\n{self.stderr_text()}")
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, n - len(buf))
                if not chunk:
                    raise EOFError(f"worker closed stdout; stderr:\n{self.stderr_text()}")
                buf += chunk
        return bytes(buf)

    def read_body(self) -> bytes:
        return self.read_exact(int.from_bytes(self.read_exact(4), "big"))

    def read_reply(self) -> dict[str, Any]:
        return json.loads(self.read_body())

    def call(self, command: str, args: Any = None) -> dict[str, Any]:
        request_id = self.send(command, args)
        reply = self.read_reply()
        assert reply["id"] == request_id, reply
        return reply

    def ok(self, command: str, args: Any = None) -> Any:
        reply = self.call(command, args)
        assert reply["success"] is True, reply
        return reply["result"]

    def error(self, command: str, args: Any = None) -> str:
        reply = self.call(command, args)
        assert reply["success"] is False and isinstance(reply["error"], str), reply
        assert set(reply) == {"id", "success", "error"}, reply
        return reply["error"]

    # -- lifecycle

    def close_stdin(self) -> None:
        self.proc.stdin.close()

    def wait(self, timeout: float = REPLY_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._drain.join(REPLY_TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


# One scratch directory per test run: DSPy's disk cache and the launcher script.
TMP = tempfile.TemporaryDirectory(prefix="dspex_bridge_test_")
CACHE_DIR = os.path.join(TMP.name, "dspy_cache")
LAUNCH = Path(TMP.name) / "launch.py"
LAUNCH.write_text(LAUNCHER)


def bridge(*args: str, **kwargs: Any) -> Worker:
    return Worker(BRIDGE, *args, **kwargs)


def pool_bridge(worker_id: str, **kwargs: Any) -> Worker:
    return bridge("--mode", "pool-worker", "--worker-id", worker_id, **kwargs)


def program(session_id: str, program_id: str | None, program_type: str = "predict",
            signature: dict[str, Any] = QA, **extra: Any) -> dict[str, Any]:
    spec = {"session_id": session_id, "signature": signature, "program_type": program_type, **extra}
    if program_id is not None:
        spec["id"] = program_id
    return spec


def execute(session_id: str, program_id: str, **inputs: Any) -> dict[str, Any]:
    return {"session_id": session_id, "program_id": program_id, "inputs": inputs}


LM_SERVER = ROOT / "priv" / "python" / "lm_server.py"


class LMServerProcess:
    """priv/python/lm_server.py on a free port."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(LM_SERVER), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"lm_server did not print its port: {line!r}")
        self.port = int(line)
        self.api_base = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        import urllib.request
        with urllib.request.urlopen(f"{self.api_base}/stats", timeout=REPLY_TIMEOUT) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def handshake(w: Worker, max_frame_size: int = 64 * 1024 * 1024) -> dict[str, Any]:
    """The pool's first request under protocol 2."""
    return w.ok("ping", {"handshake": True, "protocol": 2, "max_frame_size": max_frame_size})


def read_replies(w: Worker, ids: list[int]) -> dict[int, dict[str, Any]]:
    """Read frames until every id has its final reply (events are collected under "events")."""
    replies: dict[int, dict[str, Any]] = {}
    events: dict[int, list[dict[str, Any]]] = {}
    while not set(ids) <= set(replies):
        frame = w.read_reply()
        if "event" in frame:
            events.setdefault(frame["id"], []).append(frame)
        else:
            assert frame["id"] not in replies, f"two replies for {frame['id']}: {frame}"
            replies[frame["id"]] = frame
    for rid, evs in events.items():
        replies.setdefault(rid, {})["events"] = evs
    return replies
