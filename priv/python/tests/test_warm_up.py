"""The bridge runs its request path before it answers the handshake (issue 9).

A fresh worker's first request otherwise pays for being the first to run that path in its
process: copy-on-write faults on the pages of the fork server's import, first calls. These
tests count what the kernel counts (page faults) and what the worker says; nothing is timed.

    priv/python/.venv/bin/python -m unittest discover -s priv/python/tests -v
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import unittest
from pathlib import Path

from support import handshake, pool_bridge

PRIV = Path(__file__).resolve().parents[1]

# Imports the bridge as the fork server does (its own import_script, then gc.freeze), forks
# two children as it does, and counts the minor page faults of each child's first plain ping
# through the reader's real path (Server._received), with and without warm_up() before it.
FORKED = textwrap.dedent('''
    import gc, json, os, resource, sys
    sys.path.insert(0, sys.argv[1])
    import fork_server
    bridge = fork_server.import_script(os.path.join(sys.argv[1], "dspy_bridge.py"))
    bridge.dspy = sys.modules["dspy"]  # main() sets this global
    gc.collect()
    gc.freeze()
    # A ping as DSPex sends it.
    body = bridge.encode({"id": 7, "command": "ping", "args": {"test": "cross_layer_layer1", "operation": 1}})

    def first_pings(warm):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            server = bridge.Server(bridge.Bridge("pool-worker", "w"), bridge.Wire(devnull, devnull, 1 << 20), 8, 2)
            server.protocol = 2
            if warm:
                server.warm_up()
            server.loop = object()  # as once the loop runs: the reader answers pings itself
            faults = []
            for _ in range(3):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                server._received(body)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            os.write(w, json.dumps(faults).encode())
            os._exit(0)
        os.close(w)
        data = os.read(r, 4096)
        os.waitpid(pid, 0)
        return json.loads(data)

    print(json.dumps({"cold": first_pings(False), "warm": first_pings(True)}))
''')


class WarmUpTest(unittest.TestCase):
    def test_warm_up_takes_the_first_requests_page_faults_in_a_forked_worker(self) -> None:
        out = subprocess.run([sys.executable, "-c", FORKED, str(PRIV)], capture_output=True,
                             text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        faults = json.loads(out.stdout.strip().splitlines()[-1])
        cold, warm = faults["cold"], faults["warm"]
        # Without it, the first ping copies tens of shared pages (80-90 here) and the next
        # ones none: the cost is the first request's alone.
        self.assertGreater(cold[0], 20, faults)
        # After it, what is left is what this request's own content is the first to touch
        # (new keys in orjson's key cache: ~10 pages here).
        self.assertLess(warm[0] * 3, cold[0], faults)

    def test_a_worker_warms_up_before_it_answers_the_handshake(self) -> None:
        w = pool_bridge("warm")
        try:
            handshake(w)
            # The line is written before the handshake is read (the loop answers it).
            w.wait_for_stderr("request path warmed in")
            ready = [line for line in w.stderr_lines if "worker warm ready" in line]
            self.assertEqual(len(ready), 1, w.stderr_lines)
            self.assertIn("request path warmed in", ready[0])
            self.assertEqual(w.ok("ping")["status"], "ok")
            # The warm-up pings went over a private pipe: they are none of the worker's
            # requests (the handshake is its one ping so far; the fast path counts none).
            stats = w.ok("get_stats")
            self.assertEqual(stats["commands"], {"ping": 1, "get_stats": 1}, stats)
            self.assertEqual(stats["errors"], 0, stats)
        finally:
            w.stop()

if __name__ == "__main__":
    unittest.main()
