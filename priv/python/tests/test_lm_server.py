"""priv/python/lm_server.py: DSPy 3.4.1 -> LiteLLM/lm15 -> HTTP -> the server, offline."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import time
import unittest

from support import LMServerProcess, execute, handshake, pool_bridge, program, read_replies

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def post(port: int, payload: dict) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(payload), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


PROMPT = [
    {"role": "system", "content": "Your input fields are:\n1. `question` (str):\nYour output fields are:\n"
                                  "1. `answer` (str): \n2. `score` (int):\nAll interactions will be structured..."},
    {"role": "user", "content": "[[ ## question ## ]]\nwhy?\n\nRespond with the corresponding output fields, "
                                "starting with the field `[[ ## answer ## ]]`, then `[[ ## score ## ]]` (must be "
                                "formatted as a valid Python int), and then ending with the marker for "
                                "`[[ ## completed ## ]]`."},
]


class LMServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        import dspy  # noqa: F401  (imported here: the other test modules never need it in-process)
        cls.server = LMServerProcess("--latency", "1.0", "--jitter", "0.1", "--chunk-delay", "0.01")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def lm(self):
        import dspy
        return dspy.LM("openai/test", api_base=self.server.api_base, api_key="x", cache=False, num_retries=0)

    def test_predict_chain_of_thought_and_json_adapter(self) -> None:
        import dspy
        with dspy.context(lm=self.lm()):
            self.assertEqual(dspy.Predict("question -> answer")(question="hi").answer, "answer: answer to hi")
            result = dspy.ChainOfThought("question -> answer, score: int")(question="hi")
            self.assertEqual((result.reasoning, result.answer, result.score),
                             ("reasoning: answer to hi", "answer: answer to hi", 0))
        with dspy.context(lm=self.lm(), adapter=dspy.JSONAdapter()):
            result = dspy.Predict("question -> answer, tags: list[str]")(question="hi")
            self.assertEqual(result.answer, "answer: answer to hi")
            self.assertEqual(len(result.tags), 1)

    def test_fifty_concurrent_acalls_wait_together(self) -> None:
        import dspy
        program_ = dspy.Predict("question -> answer")
        lm = self.lm()

        async def run() -> list:
            with dspy.context(lm=lm):
                return await asyncio.gather(*[program_.acall(question=f"q{i}") for i in range(50)])

        before = self.server.stats()["served"]
        started = time.monotonic()
        results = asyncio.run(run())
        elapsed = time.monotonic() - started
        self.assertEqual([r.answer for r in results], [f"answer: answer to q{i}" for i in range(50)])
        stats = self.server.stats()
        self.assertEqual(stats["served"] - before, 50)
        self.assertGreaterEqual(stats["peak_in_flight"], 40)  # they waited together, not in turn
        self.assertLess(elapsed, 25)  # one at a time: >= 50 s

    def test_streaming_sends_the_same_text_in_chunks(self) -> None:
        status, ctype, body = post(self.server.port, {"model": "test", "messages": PROMPT})
        self.assertEqual((status, ctype), (200, "application/json"))
        whole = json.loads(body)["choices"][0]["message"]["content"]
        self.assertEqual(whole, "[[ ## answer ## ]]\nanswer: answer to why?\n\n[[ ## score ## ]]\n0\n\n"
                                "[[ ## completed ## ]]")
        status, ctype, body = post(self.server.port, {"model": "test", "messages": PROMPT, "stream": True})
        self.assertEqual((status, ctype), (200, "text/event-stream"))
        events = [line[len("data: "):] for line in body.decode().split("\n\n") if line.startswith("data: ")]
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        self.assertEqual(text, whole)
        self.assertGreater(len(chunks), 5)
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")

    def test_hundreds_of_concurrent_connections(self) -> None:
        body = json.dumps({"model": "test", "messages": PROMPT}).encode()
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body

        async def one() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
            writer.write(request)
            data = await reader.read()
            writer.close()
            return data

        async def run() -> list:
            return await asyncio.gather(*[one() for _ in range(300)])

        before = self.server.stats()
        answers = asyncio.run(run())
        self.assertTrue(all(a.startswith(b"HTTP/1.1 200 OK") and b"answer to why?" in a for a in answers))
        after = self.server.stats()
        self.assertEqual(after["served"] - before["served"], 300)
        self.assertGreaterEqual(after["peak_in_flight"], 250)  # latency 1 s: they all waited together

    def test_bad_requests(self) -> None:
        status, _, body = post(self.server.port, {"nope": 1})
        self.assertEqual(status, 400)
        self.assertIn("messages", json.loads(body)["error"]["message"])


class BridgeOverHTTPTest(unittest.TestCase):
    def test_bridge_runs_programs_concurrently_against_the_http_lm(self) -> None:
        server = LMServerProcess("--latency", "1.0")
        w = pool_bridge("http")
        try:
            handshake(w)
            w.ok("configure_lm", {"provider": "openai", "model": "test", "api_base": server.api_base,
                                  "api_key": "x", "session_id": "s", "cache": False})
            w.ok("create_program", program("s", "p", "chain_of_thought"))
            ids = [w.send("execute_program", execute("s", "p", question=f"q{i}")) for i in range(20)]
            replies = read_replies(w, ids)
            for i, rid in enumerate(ids):
                self.assertTrue(replies[rid]["success"], replies[rid])
                self.assertEqual(replies[rid]["result"]["outputs"]["answer"], f"answer: answer to q{i}")
            self.assertGreaterEqual(server.stats()["peak_in_flight"], 15)
        finally:
            w.stop()
            server.stop()


if __name__ == "__main__":
    unittest.main()
