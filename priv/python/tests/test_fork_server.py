"""Tests of priv/python/fork_server.py, driven over its real control socket.

Run with:

    priv/python/.venv/bin/python -m unittest discover -s priv/python/tests -v
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SERVER = ROOT / "priv" / "python" / "fork_server.py"
sys.path.insert(0, str(SERVER.parent))

import fork_server  # noqa: E402

WORKER = textwrap.dedent('''
    import os, sys, threading
    def main(argv):
        line = sys.stdin.readline()
        os.write(1, (" ".join(argv) + " " + str(threading.active_count()) + " "
                     + ",".join(sorted(os.listdir("/proc/self/fd"))) + "\\n").encode())
        sys.exit(int(line))
    if __name__ == "__main__":
        main(sys.argv[1:])
''')


class Server:
    """A fork server whose parent is this test process."""

    def __init__(self, script: str, mode: str = "fork") -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--script", script, "--parent", str(os.getpid()),
             "--mode", mode],
            stdin=theirs, stderr=subprocess.PIPE)
        theirs.close()
        self.sock.settimeout(60)
        self.hello = self.recv()[0]

    def recv(self) -> tuple[dict, list[int]]:
        msg, fds, _, _ = socket.recv_fds(self.sock, 65536, 4)
        return json.loads(msg), fds

    def fork(self, seq: int, argv: list[str]) -> tuple[dict, list[int], tuple[int, int]]:
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        socket.send_fds(self.sock, [json.dumps({"op": "fork", "seq": seq, "argv": argv}).encode()],
                        [stdin_r, stdout_w, stderr_w])
        for fd in (stdin_r, stdout_w, stderr_w, stderr_r):
            os.close(fd)
        msg, fds = self.recv()
        return msg, fds, (stdin_w, stdout_r)

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)
        self.proc.stderr.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(test: unittest.TestCase, pid: int) -> None:
    deadline = time.monotonic() + 10
    while alive(pid):
        if time.monotonic() > deadline:
            test.fail(f"process {pid} is still alive")
        time.sleep(0.01)


class ForkServerTest(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.script = os.path.join(self.dir.name, "w.py")
        with open(self.script, "w") as f:
            f.write(WORKER)

    def tearDown(self) -> None:
        self.dir.cleanup()

    def test_supports_fork_needs_main_argv_under_a_main_guard(self) -> None:
        self.assertIsNone(fork_server.supports_fork(self.script))
        bare = os.path.join(self.dir.name, "bare.py")
        with open(bare, "w") as f:
            f.write("import sys\nprint('hi')\n")
        self.assertIn("main(argv)", fork_server.supports_fork(bare))
        eager = os.path.join(self.dir.name, "eager.py")
        with open(eager, "w") as f:
            f.write("def main(argv):\n    pass\nmain([])\n")
        self.assertIn("outside", fork_server.supports_fork(eager))

    def test_a_script_whose_import_starts_threads_is_served_by_exec(self) -> None:
        script = os.path.join(self.dir.name, "threads.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent('''
                import sys, threading, time
                _started = threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
                def main(argv):
                    sys.exit(5)
                if __name__ == "__main__":
                    main(sys.argv[1:])
            '''))
        server = Server(script)
        try:
            self.assertEqual(server.hello["mode"], "spawn")
            self.assertIn("started threads", server.hello["note"])
            msg, fds, (stdin_w, stdout_r) = server.fork(1, [])
            os.close(fds[0])
            self.assertEqual(server.recv()[0], {"op": "exit", "pid": msg["pid"], "code": 5})
            os.close(stdin_w)
            os.close(stdout_r)
        finally:
            server.close()

    def test_the_preload_hook_runs_once_in_the_server(self) -> None:
        script = os.path.join(self.dir.name, "hook.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent('''
                import os, sys
                LOADED = []
                def fork_server_preload():
                    import json  # noqa: F401
                    LOADED.append(os.getpid())
                def main(argv):
                    os.write(1, f"{LOADED} {os.getppid()}\\n".encode())
                    sys.exit(0)
                if __name__ == "__main__":
                    main(sys.argv[1:])
            '''))
        server = Server(script)
        try:
            msg, fds, (stdin_w, stdout_r) = server.fork(1, [])
            os.close(fds[0])
            loaded, parent = os.read(stdout_r, 200).decode().split(" ")
            self.assertEqual(loaded, f"[{server.hello['pid']}]")
            self.assertEqual(int(parent), server.hello["pid"])
            os.close(stdin_w)
            os.close(stdout_r)
        finally:
            server.close()

    def run_worker(self, mode: str, forked: bool) -> None:
        server = Server(self.script, mode)
        try:
            self.assertEqual(server.hello["mode"], mode)
            msg, fds, (stdin_w, stdout_r) = server.fork(1, ["--worker-id", "1"])
            self.assertEqual(msg["op"], "forked")
            pid = msg["pid"]
            self.assertEqual(len(fds), 1)  # its pidfd
            os.close(fds[0])
            self.assertEqual(os.getpgid(pid), pid)  # its own process group
            os.write(stdin_w, b"3\n")
            *argv, threads, open_fds = os.read(stdout_r, 4096).decode().split()
            self.assertEqual(argv, ["--worker-id", "1"])
            # Only 0-2 (and the directory listdir opened); a forked worker adds its VM watch.
            self.assertEqual(open_fds, "0,1,2,3,4" if forked else "0,1,2,3")
            self.assertEqual(threads, "2" if forked else "1")
            exit_msg, _ = server.recv()
            self.assertEqual(exit_msg, {"op": "exit", "pid": pid, "code": 3})
            os.close(stdin_w)
            os.close(stdout_r)
        finally:
            server.close()

    def test_fork_mode_runs_main_in_a_fork(self) -> None:
        self.run_worker("fork", True)

    def test_spawn_mode_execs(self) -> None:
        self.run_worker("spawn", False)

    def test_a_worker_killed_by_a_signal_reports_it(self) -> None:
        server = Server(self.script)
        try:
            msg, fds, (stdin_w, stdout_r) = server.fork(1, [])
            pid = msg["pid"]
            signal.pidfd_send_signal(fds[0], signal.SIGKILL)
            os.close(fds[0])
            self.assertEqual(server.recv()[0], {"op": "exit", "pid": pid, "signal": 9})
            os.close(stdin_w)
            os.close(stdout_r)
        finally:
            server.close()

    def test_what_a_worker_started_dies_when_it_exits(self) -> None:
        script = os.path.join(self.dir.name, "grand.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent('''
                import os, subprocess, sys
                def main(argv):
                    child = subprocess.Popen(["sleep", "1000"])
                    os.write(1, f"{child.pid}\\n".encode())
                    sys.stdin.readline()
                    os._exit(0)
                if __name__ == "__main__":
                    main(sys.argv[1:])
            '''))
        server = Server(script)
        try:
            msg, fds, (stdin_w, stdout_r) = server.fork(1, [])
            os.close(fds[0])
            grandchild = int(os.read(stdout_r, 100))
            self.assertTrue(alive(grandchild))
            os.write(stdin_w, b"\n")
            self.assertEqual(server.recv()[0], {"op": "exit", "pid": msg["pid"], "code": 0})
            wait_dead(self, grandchild)
            os.close(stdin_w)
            os.close(stdout_r)
        finally:
            server.close()

    def test_eof_on_the_control_socket_ends_the_server_and_its_workers(self) -> None:
        server = Server(self.script)
        msg, fds, (stdin_w, stdout_r) = server.fork(1, [])
        pid = msg["pid"]
        os.close(fds[0])
        server.close()  # EOF: the server kills the worker's group and exits
        wait_dead(self, pid)
        os.close(stdin_w)
        os.close(stdout_r)


if __name__ == "__main__":
    unittest.main()
