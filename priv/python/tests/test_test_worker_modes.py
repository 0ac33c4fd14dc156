"""test/support/test_worker.py's misbehaviour modes and protocol 2 (issues 8 and 10)."""

from __future__ import annotations

import os
import signal
import time
import unittest

from support import TEST_WORKER, Worker, handshake, read_replies


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split(" ", 1)[0] != "Z"
    except OSError:
        return False


class MisbehaviourTest(unittest.TestCase):
    def test_banner_on_stdout_before_the_first_frame(self) -> None:
        w = Worker(TEST_WORKER, env={"TEST_WORKER_BANNER": "1"})
        try:
            self.assertEqual(w.read_exact(len(b"Welcome to some library v1.0\n")), b"Welcome to some library v1.0\n")
            self.assertEqual(w.ok("ping")["status"], "ok")
        finally:
            w.stop()

    def test_stderr_flood_at_start_and_on_request(self) -> None:
        w = Worker(TEST_WORKER, env={"TEST_WORKER_STDERR_FLOOD": "500"})
        try:
            w.wait_for_stderr("flood line 499 ")
            self.assertEqual(w.ok("stderr_flood", {"lines": 2000, "bytes": 100}), {"lines": 2000, "bytes": 100})
            self.assertEqual(w.ok("stderr_flood", {"lines": 1, "bytes": 3_000_000, "no_newline": True})["bytes"],
                             3_000_000)
            self.assertEqual(w.ok("ping")["status"], "ok")
        finally:
            w.stop()

    def test_reply_twice_unparseable_and_garbage_requests(self) -> None:
        w = Worker(TEST_WORKER)
        try:
            rid = w.send("reply_twice")
            self.assertEqual(w.read_reply(), {"id": rid, "success": True, "result": {"twice": True}})
            self.assertEqual(w.read_reply(), {"id": rid, "success": True, "result": {"twice": True}})
            rid = w.send("unparseable")
            self.assertEqual(w.read_reply(), {"id": rid, "success": False,
                                              "error": "invalid request: could not parse it"})
            w.send("unparseable", {"id_known": False})
            self.assertIsNone(w.read_reply()["id"])
            w.send_body(b'{"id":31,"command":')
            self.assertEqual(w.read_reply()["id"], 31)
        finally:
            w.stop()

    def test_grandchild_is_left_behind_when_the_worker_exits(self) -> None:
        w = Worker(TEST_WORKER)
        grandchild = None
        try:
            result = w.ok("spawn_grandchild")
            grandchild = result["pid"]
            self.assertEqual(result["pgid"], os.getpgid(w.proc.pid))  # the worker's group: signal it to clean up
            w.send("exit", {"code": 0})
            self.assertEqual(w.wait(), 0)
            self.assertTrue(alive(grandchild))
        finally:
            w.stop()
            if grandchild:
                os.kill(grandchild, signal.SIGKILL)

    def test_go_silent_stops_answering_even_pings(self) -> None:
        w = Worker(TEST_WORKER, env={"TEST_WORKER_PROTOCOL": "2"})
        try:
            handshake(w)
            w.send("go_silent")
            w.send("ping")
            self.assertRaises(TimeoutError, w.read_exact, 4, 0.5)
            self.assertIsNone(w.proc.poll())  # alive, just mute
            w.close_stdin()
            self.assertEqual(w.wait(), 0)
        finally:
            w.stop()

    def test_go_silent_later_leaves_requests_in_flight_unanswered(self) -> None:
        w = Worker(TEST_WORKER, env={"TEST_WORKER_PROTOCOL": "2"})
        try:
            handshake(w)
            w.send("sleep", {"ms": 300})
            self.assertEqual(w.ok("go_silent", {"after_ms": 50}), {"silent_in_ms": 50})
            self.assertRaises(TimeoutError, w.read_exact, 4, 1.0)  # neither the sleep's reply ...
            w.send("ping")
            self.assertRaises(TimeoutError, w.read_exact, 4, 0.5)  # ... nor a ping's
        finally:
            w.stop()


class ProtocolTwoTest(unittest.TestCase):
    def setUp(self) -> None:
        self.w = Worker(TEST_WORKER, "--worker-id", "v2", env={"TEST_WORKER_PROTOCOL": "2",
                                                              "TEST_WORKER_CONCURRENCY": "16"})
        result = handshake(self.w)
        self.assertEqual((result["protocol"], result["concurrency"]), (2, 16))
        self.assertEqual(result["features"], ["cancel", "chunks", "tool_calls"])

    def tearDown(self) -> None:
        self.w.stop()

    def test_sleeps_overlap_pings_answer_at_once_and_cancel_works(self) -> None:
        ids = [self.w.send("sleep", {"ms": 60_000}) for _ in range(10)]
        deadline = time.monotonic() + 10
        while self.w.ok("ping")["in_flight"] < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(self.w.ok("stats")["peak_in_flight"], 10)
        for rid in ids:
            self.w.send_body(f'{{"id":{rid},"control":"cancel"}}'.encode())
        replies = read_replies(self.w, ids)
        self.assertTrue(all(replies[rid] == {"id": rid, "success": False, "error": "cancelled"} for rid in ids))
        self.assertEqual(sorted(self.w.ok("stats")["cancelled_ids"]), ids)
        fast = [self.w.send("sleep", {"ms": 10}) for _ in range(3)]
        self.assertEqual({r["result"]["slept"] for r in read_replies(self.w, fast).values()}, {10})

    def test_chunks_then_reply(self) -> None:
        rid = self.w.send("chunks", {"n": 5, "field": "answer", "delay_ms": 5})
        reply = read_replies(self.w, [rid])[rid]
        self.assertEqual([e["text"] for e in reply["events"]], [f"chunk {i} " for i in range(5)])
        self.assertTrue(all(e["event"] == "chunk" and e["field"] == "answer" for e in reply["events"]))
        self.assertEqual(reply["result"], {"chunks": 5, "field": "answer"})

    def test_tool_call_round_trip(self) -> None:
        rid = self.w.send("tool", {"name": "lookup", "args": {"key": "k"}})
        call = self.w.read_reply()
        self.assertEqual(call, {"id": rid, "event": "tool_call", "call_id": 1, "name": "lookup",
                                "args": {"key": "k"}})
        self.w.send_body(f'{{"id":{rid},"control":"tool_result","call_id":1,"ok":true,"result":{{"v":42}}}}'
                         .encode())
        self.assertEqual(self.w.read_reply(), {"id": rid, "success": True,
                                               "result": {"tool_results": [{"call_id": 1, "ok": True,
                                                                            "result": {"v": 42}}]}})

    def test_v1_only_by_default(self) -> None:
        v1 = Worker(TEST_WORKER)
        try:
            result = handshake(v1)
            self.assertEqual(result, {"status": "ok", "worker_id": None, "pid": v1.proc.pid})
            self.assertEqual(v1.ok("stats")["protocol"], 1)
        finally:
            v1.stop()


if __name__ == "__main__":
    unittest.main()
