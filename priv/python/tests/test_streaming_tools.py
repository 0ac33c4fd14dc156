"""Issue 12, bridge side: execute_program streaming (chunk events through
dspy.streamify over the LM's real streaming) and ReAct tools whose
implementation is a tool_call round trip to the pool."""

from __future__ import annotations

import json
import unittest

from support import LMServerProcess, Worker, execute, handshake, pool_bridge, program, read_replies

LOOKUP = {"name": "lookup", "description": "Looks a key up in the app's table.", "args": {"key": "string"}}


def agent_lm(session_id: str, key: str, answer: str) -> dict:
    """A dummy LM scripted to call lookup(key) once, then finish, then answer."""
    return {"provider": "dummy", "session_id": session_id, "answers": [
        {"next_thought": "look it up", "next_tool_name": "lookup", "next_tool_args": {"key": key}},
        {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
        {"answer": answer}]}


def tool_result(w: Worker, rid: int, call_id: int, **payload) -> None:
    w.send_body(json.dumps({"id": rid, "control": "tool_result", "call_id": call_id, **payload}).encode())


class StreamingTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.server = LMServerProcess("--latency", "0.1", "--chunk-delay", "0.005")
        cls.slow = LMServerProcess("--latency", "0.1", "--chunk-delay", "1.0")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()
        cls.slow.stop()

    def setUp(self) -> None:
        self.w = pool_bridge("stream")
        handshake(self.w)
        for sid, server in (("s", self.server), ("slow", self.slow)):
            self.w.ok("configure_lm", {"provider": "openai", "model": "test", "api_base": server.api_base,
                                       "api_key": "x", "session_id": sid, "cache": False})

    def tearDown(self) -> None:
        self.w.stop()

    def test_chunks_arrive_in_order_complete_and_before_the_reply(self) -> None:
        sig = {"inputs": ["question"], "outputs": ["answer", "summary"]}
        self.w.ok("create_program", program("s", "p", "chain_of_thought", signature=sig))
        rid = self.w.send("execute_program", {**execute("s", "p", question="why is the sky blue"), "stream": True})
        frames = []
        while True:
            frame = self.w.read_reply()
            frames.append(frame)
            if "success" in frame:
                break
        reply, events = frames[-1], frames[:-1]
        self.assertTrue(reply["success"], reply)
        outputs = reply["result"]["outputs"]
        self.assertGreater(len(events), 6)
        self.assertTrue(all(e["id"] == rid and e["event"] == "chunk" for e in events))
        order = list(dict.fromkeys(e["field"] for e in events))
        self.assertEqual(order, ["reasoning", "answer", "summary"])
        for field in order:
            self.assertEqual("".join(e["text"] for e in events if e["field"] == field).strip(), outputs[field])
        self.assertEqual(outputs["answer"], "answer: answer to why is the sky blue")
        self.assertEqual(self.w.ok("ping")["in_flight"], 0)  # nothing more for rid after its reply

    def test_cancel_while_streaming_and_the_worker_serves_on(self) -> None:
        self.w.ok("create_program", program("slow", "p"))
        rid = self.w.send("execute_program", {**execute("slow", "p", question="q"), "stream": True})
        first = self.w.read_reply()
        self.assertEqual((first["id"], first["event"]), (rid, "chunk"))
        self.w.send_body(f'{{"id":{rid},"control":"cancel"}}'.encode())
        while True:  # chunks already written may still come first
            frame = self.w.read_reply()
            if "success" in frame:
                break
        self.assertEqual(frame, {"id": rid, "success": False, "error": "cancelled"})
        self.w.ok("create_program", program("s", "p"))
        self.assertEqual(self.w.ok("execute_program", execute("s", "p", question="next"))["outputs"],
                         {"answer": "answer: answer to next"})

    def test_without_protocol_2_a_stream_request_just_replies(self) -> None:
        v1 = pool_bridge("v1")
        try:
            v1.ok("configure_lm", {"provider": "openai", "model": "test", "api_base": self.server.api_base,
                                   "api_key": "x", "cache": False})
            v1.ok("create_program", program("s", "p"))
            reply = v1.call("execute_program", {**execute("s", "p", question="q"), "stream": True})
            self.assertEqual(reply["result"]["outputs"], {"answer": "answer: answer to q"})
            self.assertIn("stream must be a boolean",
                          v1.error("execute_program", {**execute("s", "p", question="q"), "stream": "yes"}))
        finally:
            v1.stop()


class PoolToolsTest(unittest.TestCase):
    def setUp(self) -> None:
        self.w = pool_bridge("tools")
        handshake(self.w)

    def tearDown(self) -> None:
        self.w.stop()

    def test_agent_calls_a_pool_tool_and_uses_its_answer(self) -> None:
        self.w.ok("configure_lm", agent_lm("a", "k1", "the value is 42"))
        self.w.ok("create_program", program("a", "agent", "react", tools=[LOOKUP, "calculator"]))
        rid = self.w.send("execute_program", execute("a", "agent", question="what is k1?"))
        call = self.w.read_reply()
        self.assertEqual(call, {"id": rid, "event": "tool_call", "call_id": 1, "name": "lookup",
                                "args": {"key": "k1"}})
        tool_result(self.w, rid, 1, ok=True, result={"value": 42})
        reply = self.w.read_reply()
        outputs = reply["result"]["outputs"]
        self.assertEqual(outputs["trajectory"]["observation_0"], {"value": 42})
        self.assertEqual(outputs["answer"], "the value is 42")

    def test_a_failing_tool_is_an_error_string_the_agent_sees(self) -> None:
        self.w.ok("configure_lm", agent_lm("f", "k", "gave up"))
        self.w.ok("create_program", program("f", "agent", "react", tools=[LOOKUP]))
        rid = self.w.send("execute_program", execute("f", "agent", question="q"))
        call = self.w.read_reply()
        tool_result(self.w, rid, call["call_id"], ok=False, error="timeout after 5000 ms")
        outputs = self.w.read_reply()["result"]["outputs"]
        observation = outputs["trajectory"]["observation_0"]
        self.assertIn("Execution error in lookup", observation)
        self.assertIn("timeout after 5000 ms", observation)
        self.assertEqual(outputs["answer"], "gave up")

    def test_tool_calls_of_concurrent_requests_reach_their_own_requests(self) -> None:
        for sid in ("x", "y"):
            self.w.ok("configure_lm", agent_lm(sid, f"key-{sid}", f"answer {sid}"))
            self.w.ok("create_program", program(sid, "agent", "react", tools=[LOOKUP]))
        rx = self.w.send("execute_program", execute("x", "agent", question="q"))
        ry = self.w.send("execute_program", execute("y", "agent", question="q"))
        calls = {c["id"]: c for c in (self.w.read_reply(), self.w.read_reply())}
        self.assertEqual({rid: c["args"]["key"] for rid, c in calls.items()}, {rx: "key-x", ry: "key-y"})
        tool_result(self.w, ry, calls[ry]["call_id"], ok=True, result="for y")  # answered in reverse order
        tool_result(self.w, rx, calls[rx]["call_id"], ok=True, result="for x")
        replies = read_replies(self.w, [rx, ry])
        self.assertEqual(replies[rx]["result"]["outputs"]["trajectory"]["observation_0"], "for x")
        self.assertEqual(replies[ry]["result"]["outputs"]["trajectory"]["observation_0"], "for y")

    def test_cancel_while_a_tool_runs(self) -> None:
        self.w.ok("configure_lm", agent_lm("c", "k", "never"))
        self.w.ok("create_program", program("c", "agent", "react", tools=[LOOKUP]))
        rid = self.w.send("execute_program", execute("c", "agent", question="q"))
        self.assertEqual(self.w.read_reply()["event"], "tool_call")
        self.w.send_body(f'{{"id":{rid},"control":"cancel"}}'.encode())
        self.assertEqual(self.w.read_reply(), {"id": rid, "success": False, "error": "cancelled"})
        tool_result(self.w, rid, 1, ok=True, result="late")  # for a finished request: ignored
        self.assertEqual(self.w.ok("ping")["in_flight"], 0)

    def test_tool_declarations_are_validated_and_restorable(self) -> None:
        bad = [({"name": "finish"}, "invalid tool name"), ({"name": "1x"}, "invalid tool name"),
               ({"name": "t", "args": {"k": "tensor"}}, "needs a JSON type"),
               ({"name": "t", "args": ["k"]}, "must be an object"), (42, "tools must be a list")]
        for tool, message in bad:
            with self.subTest(tool=tool):
                self.assertIn(message, self.w.error("create_program", program("v", "a", "react", tools=[tool])))
        self.assertIn("duplicate names", self.w.error("create_program",
                                                      program("v", "a", "react", tools=[LOOKUP, LOOKUP])))
        self.assertIn("only supported by react", self.w.error("create_program", program("v", "a", tools=[LOOKUP])))
        spec = program("v", "agent", "react", tools=[LOOKUP])
        self.w.ok("create_program", spec)
        self.assertEqual(self.w.ok("restore_session", {"session_id": "v2", "programs": [spec], "lm": None})
                         ["programs"], 1)

    def test_without_protocol_2_a_pool_tool_is_an_error_observation(self) -> None:
        v1 = pool_bridge("v1tools")
        try:
            v1.ok("configure_lm", agent_lm("o", "k", "no tools"))
            v1.ok("create_program", program("o", "agent", "react", tools=[LOOKUP]))
            outputs = v1.ok("execute_program", execute("o", "agent", question="q"))["outputs"]
            self.assertIn("needs protocol 2", outputs["trajectory"]["observation_0"])
        finally:
            v1.stop()


if __name__ == "__main__":
    unittest.main()
