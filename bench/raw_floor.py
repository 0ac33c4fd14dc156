#!/usr/bin/env python3
"""The raw-Python floor of the pool benchmarks.

A Python parent does framed JSON round trips (4-byte big-endian length + UTF-8 JSON, the
pool's protocol) to N children over pipes, with nothing in between: no BEAM, no pool. The
children are the same worker script the pools run (test/support/test_worker.py), so the
figures are what the hardware and Python allow, and the pools are compared against them.

  * sequential: one child, one request at a time (the latency floor of a ping), placed by the
    OS, then again with parent and child pinned to one CPU;
  * pipelined: N children, each kept `depth` requests deep (depth 1 is a pool's model: one
    request per worker at a time; depth 32 is the ceiling), the parent multiplexing their
    stdout with `selectors` and writing every refill as one `write` (the throughput ceiling of N
    Python workers on this machine: the parent does less per request than any pool can).

    python3 raw_floor.py --python PY --script test_worker.py --workers 1,2,4,8 \
        --seq-iters 5000 --duration 1.0 --depths 1,32

Prints one JSON object on stdout. Uses orjson when it is installed (as the worker does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import subprocess
import sys
import time

try:
    import orjson

    dumps, loads = orjson.dumps, orjson.loads
except ImportError:  # pragma: no cover - depends on the interpreter
    orjson = None

    def dumps(obj):
        return json.dumps(obj, separators=(",", ":")).encode()

    loads = json.loads


def spawn(python: str, script: str, worker_id: int) -> subprocess.Popen:
    return subprocess.Popen(
        [python, script, "--mode", "pool-worker", "--worker-id", str(worker_id)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,
    )


def frame(req_id: int, command: str, args: dict) -> bytes:
    body = dumps({"id": req_id, "command": command, "args": args})
    return len(body).to_bytes(4, "big") + body


class Reader:
    """Splits a child's stdout into frames."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, bytearray()

    def frames(self, chunk: bytes) -> list[bytes]:
        self.buf += chunk
        out, buf, pos = [], self.buf, 0
        while len(buf) - pos >= 4:
            n = int.from_bytes(buf[pos:pos + 4], "big")
            if len(buf) - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        return out

    def read_one(self) -> bytes:
        while True:
            got = self.frames(b"")
            if got:
                return got[0]  # sequential use: never more than one frame buffered
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("worker closed its stdout")
            self.buf += chunk


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def wait_ready(child: subprocess.Popen, reader: Reader) -> None:
    os.write(child.stdin.fileno(), frame(0, "ping", {}))
    reply = loads(reader.read_one())
    assert reply["id"] == 0 and reply["success"], reply


def sequential(python: str, script: str, iters: int, warmup: int) -> dict:
    child = spawn(python, script, 1)
    try:
        reader = Reader(child.stdout.fileno())
        wfd = child.stdin.fileno()
        wait_ready(child, reader)
        lat = []
        for i in range(1, warmup + iters + 1):
            t0 = time.perf_counter_ns()
            os.write(wfd, frame(i, "ping", {}))
            reply = loads(reader.read_one())
            t1 = time.perf_counter_ns()
            if reply["id"] != i or not reply["success"]:
                raise RuntimeError(f"bad reply {reply!r}")
            if i > warmup:
                lat.append((t1 - t0) / 1000)
        lat.sort()
        return {
            "iters": iters,
            "median_us": percentile(lat, 0.5),
            "p99_us": percentile(lat, 0.99),
            "mean_us": sum(lat) / len(lat),
        }
    finally:
        stop([child])


def pipelined(python: str, script: str, workers: int, depth: int, duration: float,
              warmup: float) -> dict:
    children = [spawn(python, script, i + 1) for i in range(workers)]
    try:
        sel = selectors.DefaultSelector()
        readers = []
        for c in children:
            r = Reader(c.stdout.fileno())
            wait_ready(c, r)
            readers.append(r)
            sel.register(r.fd, selectors.EVENT_READ, (c.stdin.fileno(), r))
        next_id = 1
        in_flight = 0
        for c in children:
            batch = bytearray()
            for _ in range(depth):
                batch += frame(next_id, "ping", {})
                next_id += 1
            os.write(c.stdin.fileno(), batch)
            in_flight += depth
        start = time.perf_counter()
        measure_from = start + warmup
        deadline = measure_from + duration
        counted = 0
        while in_flight:
            for key, _ in sel.select(timeout=5.0):
                wfd, reader = key.data
                chunk = os.read(reader.fd, 1 << 20)
                if not chunk:
                    raise EOFError("worker closed its stdout")
                now = time.perf_counter()
                refill = bytearray()
                for body in reader.frames(chunk):
                    reply = loads(body)
                    if not reply.get("success"):
                        raise RuntimeError(f"bad reply {reply!r}")
                    in_flight -= 1
                    if measure_from <= now < deadline:
                        counted += 1
                    if now < deadline:
                        refill += frame(next_id, "ping", {})
                        next_id += 1
                        in_flight += 1
                if refill:
                    os.write(wfd, refill)
        return {
            "workers": workers,
            "depth": depth,
            "requests": counted,
            "seconds": duration,
            "throughput": counted / duration,
        }
    finally:
        stop(children)


def stop(children: list[subprocess.Popen]) -> None:
    for c in children:
        try:
            c.stdin.close()
        except OSError:
            pass
    for c in children:
        try:
            c.wait(timeout=2)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--script", required=True)
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--seq-iters", type=int, default=5000)
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--depths", default="1,32",
                   help="requests in flight per child; 1 is what a pool does, 32 the ceiling")
    p.add_argument("--skip-sequential", action="store_true")
    opts = p.parse_args()

    result = {
        "parent_python": platform.python_version(),
        "orjson": orjson is not None,
    }
    if not opts.skip_sequential:
        warmup = max(100, opts.seq_iters // 10)
        result["sequential"] = sequential(opts.python, opts.script, opts.seq_iters, warmup)
        # Where the OS puts parent and child decides the figure on some machines (a wake-up
        # across CPUs of a VM costs tens of µs): also measure both on one CPU.
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:1])
        try:
            result["sequential_one_cpu"] = sequential(opts.python, opts.script, opts.seq_iters,
                                                      warmup)
        finally:
            os.sched_setaffinity(0, cpus)
    result["pipelined"] = [
        pipelined(opts.python, opts.script, int(n), int(d), opts.duration, opts.warmup)
        for n in opts.workers.split(",") if n
        for d in opts.depths.split(",") if d
    ]
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
