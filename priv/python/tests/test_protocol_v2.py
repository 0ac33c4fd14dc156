"""Protocol 2 on the real bridge (issue 10): handshake, requests in flight at
once on one asyncio loop, cancel, pings answered while the loop is busy,
per-session LMs under concurrency. Overlap is proven by counting requests in
flight (the worker's own count, the LM server's peak), never by timing alone."""

from __future__ import annotations

import os
import time
import unittest

from support import (LAUNCH, QA, Worker, BRIDGE, execute, handshake, pool_bridge, program,  # noqa: F401
                     read_replies)

SLOW = {"provider": "dummy", "latency_ms": 60_000}  # an LM call that would take a minute


def wait_in_flight(w: Worker, n: int, timeout: float = 20.0) -> dict:
    """Pings (answered by the reader thread) until n requests are in flight."""
    deadline = time.monotonic() + timeout
    while True:
        result = w.ok("ping")
        if result["in_flight"] >= n or time.monotonic() > deadline:
            return result
        time.sleep(0.02)


class HandshakeTest(unittest.TestCase):
    def test_handshake_announces_protocol_2_concurrency_and_features(self) -> None:
        w = pool_bridge("h1")
        try:
            result = handshake(w)
            self.assertEqual((result["status"], result["protocol"], result["concurrency"]), ("ok", 2, 64))
            self.assertIn("cancel", result["features"])
            self.assertEqual(result["worker_id"], "h1")
            stats = w.ok("get_stats")
            self.assertEqual((stats["protocol"], stats["concurrency"], stats["in_flight"], stats["max_frame_size"]),
                             (2, 64, 0, 64 * 1024 * 1024))
        finally:
            w.stop()

    def test_concurrency_from_flag_and_env_and_a_v1_only_bridge(self) -> None:
        for args, env, expected in [(("--concurrency", "8"), {}, 8),
                                    ((), {"DSPY_BRIDGE_CONCURRENCY": "3"}, 3)]:
            w = pool_bridge("h2", env=env) if not args else Worker(
                BRIDGE, "--mode", "pool-worker", "--worker-id", "h2", *args)
            try:
                self.assertEqual(handshake(w)["concurrency"], expected)
            finally:
                w.stop()
        w = pool_bridge("h3", env={"DSPY_BRIDGE_PROTOCOL": "1"})
        try:
            result = handshake(w)
            self.assertEqual(result["status"], "ok")
            self.assertNotIn("protocol", result)  # the pool treats it as protocol 1
        finally:
            w.stop()

    def test_bad_concurrency_flag_exits_with_a_message(self) -> None:
        w = Worker(BRIDGE, "--concurrency", "0")
        try:
            self.assertNotEqual(w.wait(), 0)
            self.assertIn("--concurrency must be a positive integer, got: '0'", w.stderr_text())
        finally:
            w.stop()

    def test_plain_ping_keeps_protocol_1(self) -> None:
        w = pool_bridge("h4")
        try:
            self.assertNotIn("protocol", w.ok("ping"))
        finally:
            w.stop()


class ConcurrencyTest(unittest.TestCase):
    def setUp(self) -> None:
        self.w = pool_bridge("c1")
        handshake(self.w)

    def tearDown(self) -> None:
        self.w.stop()

    def test_requests_overlap_and_each_can_be_cancelled(self) -> None:
        self.w.ok("configure_lm", {**SLOW, "session_id": "slow"})
        self.w.ok("create_program", program("slow", "p", "chain_of_thought"))
        ids = [self.w.send("execute_program", execute("slow", "p", question=f"q{i}")) for i in range(10)]
        # All ten wait on their LM at once (one at a time, the second would not start for a minute).
        self.assertEqual(wait_in_flight(self.w, 10)["in_flight"], 10)
        # Other commands are answered meanwhile.
        self.assertEqual(self.w.ok("list_programs", {"session_id": "slow"})["total_count"], 1)
        self.w.ok("configure_lm", {"provider": "dummy"})  # global configure while tasks run
        for rid in ids[:5]:
            self.w.send_body(f'{{"id":{rid},"control":"cancel"}}'.encode())
        self.w.send_body(b'{"id":999999,"control":"cancel"}')  # unknown id: ignored
        replies = read_replies(self.w, ids[:5])
        for rid in ids[:5]:
            self.assertEqual(replies[rid], {"id": rid, "success": False, "error": "cancelled"})
        self.assertEqual(wait_in_flight(self.w, 5)["in_flight"], 5)
        for rid in ids[5:]:
            self.w.send_body(f'{{"id":{rid},"control":"cancel"}}'.encode())
        read_replies(self.w, ids[5:])
        self.assertEqual(self.w.ok("ping")["in_flight"], 0)
        # The worker serves on, and the program was not counted as executed.
        self.w.ok("create_program", program("fast", "p"))
        self.assertEqual(self.w.ok("execute_program", execute("fast", "p", question="x"))["outputs"],
                         {"answer": "answer: dummy answer for x"})
        self.assertEqual(self.w.ok("get_program_info", {"session_id": "slow", "program_id": "p"})["executions"], 0)

    def test_concurrent_sessions_each_see_their_own_lm_and_programs(self) -> None:
        sessions = [f"s{i}" for i in range(6)]
        for sid in sessions:
            self.w.ok("configure_lm", {"provider": "dummy", "latency_ms": 200, "session_id": sid,
                                       "answers": [{"answer": f"from {sid}"}]})
            self.w.ok("create_program", program(sid, "p", "chain_of_thought"))
        sent = {}
        for round_ in range(5):
            for sid in sessions:
                sent[self.w.send("execute_program", execute(sid, "p", question=f"{sid}-{round_}"))] = (sid, round_)
        replies = read_replies(self.w, list(sent))
        for rid, (sid, round_) in sent.items():
            outputs = replies[rid]["result"]["outputs"]
            self.assertEqual(outputs["answer"], f"from {sid}")
            self.assertEqual(outputs["reasoning"], f"reasoning: dummy answer for {sid}-{round_}")
        for sid in sessions:
            info = self.w.ok("get_program_info", {"session_id": sid, "program_id": "p"})
            self.assertEqual(info["executions"], 5)

    def test_state_changes_during_an_execution_of_the_same_session(self) -> None:
        self.w.ok("configure_lm", {"provider": "dummy", "latency_ms": 300, "session_id": "s"})
        self.w.ok("create_program", program("s", "p"))
        first = self.w.send("execute_program", execute("s", "p", question="one"))
        second = self.w.send("execute_program", execute("s", "p", question="two"))
        wait_in_flight(self.w, 2)
        # While both run: delete their program, create another, re-configure the session's LM.
        self.assertEqual(self.w.ok("delete_program", {"session_id": "s", "program_id": "p"})["status"], "deleted")
        self.w.ok("create_program", program("s", "q"))
        self.w.ok("configure_lm", {"provider": "dummy", "session_id": "s", "answers": [{"answer": "new lm"}]})
        replies = read_replies(self.w, [first, second])
        self.assertEqual(replies[first]["result"]["outputs"], {"answer": "answer: dummy answer for one"})
        self.assertEqual(replies[second]["result"]["outputs"], {"answer": "answer: dummy answer for two"})
        self.assertEqual([p["id"] for p in self.w.ok("list_programs", {"session_id": "s"})["programs"]], ["q"])
        self.assertEqual(self.w.ok("execute_program", execute("s", "q", question="x"))["outputs"],
                         {"answer": "new lm"})

    def test_duplicate_in_flight_id_is_refused(self) -> None:
        self.w.ok("configure_lm", {**SLOW, "session_id": "d"})
        self.w.ok("create_program", program("d", "p"))
        rid = self.w.send("execute_program", execute("d", "p", question="x"))
        wait_in_flight(self.w, 1)
        self.w.send("execute_program", execute("d", "p", question="x"), request_id=rid)
        self.assertEqual(self.w.read_reply(),
                         {"id": rid, "success": False, "error": f"request id {rid} is already in flight"})
        self.w.send_body(f'{{"id":{rid},"control":"cancel"}}'.encode())
        self.assertEqual(self.w.read_reply()["error"], "cancelled")


class BusyLoopTest(unittest.TestCase):
    def test_ping_is_answered_while_the_loop_is_blocked_and_stdin_eof_still_ends_it(self) -> None:
        w = pool_bridge("busy", env={"LAUNCH_NOISY_DSPY": "1"}, launcher=LAUNCH)
        try:
            handshake(w)
            w.ok("configure_lm", {"provider": "dummy"})
            w.ok("create_program", program("s", "p"))
            blocked = w.send("execute_program", execute("s", "p", question="__block__"))
            w.wait_for_stderr("LONG-CALL-STARTED")
            for _ in range(3):  # the loop thread is stuck; the reader thread answers
                result = w.ok("ping")
                self.assertEqual((result["status"], result["protocol"], result["in_flight"]), ("ok", 2, 1))
            self.assertNotEqual(blocked, None)
            w.close_stdin()
            self.assertEqual(w.wait(timeout=10), 0)
        finally:
            w.stop()


if __name__ == "__main__":
    unittest.main()
