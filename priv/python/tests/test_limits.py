"""Bounded input and output (issue 8 items 5 and 12): frame sizes, unparseable
requests, integers beyond 64 bits, the calculator tool."""

from __future__ import annotations

import json
import sys
import time
import unittest

from support import ROOT, execute, handshake, pool_bridge, program

sys.path.insert(0, str(ROOT / "priv" / "python"))
import dspy_bridge  # noqa: E402  (pure helpers only: dspy itself is imported by main())


class FrameLimitTest(unittest.TestCase):
    def setUp(self) -> None:
        self.w = pool_bridge("lim")
        self.assertEqual(handshake(self.w, max_frame_size=4096)["protocol"], 2)
        self.w.ok("configure_lm", {"provider": "dummy"})

    def tearDown(self) -> None:
        self.w.stop()

    def test_request_over_max_frame_size_is_refused_for_its_id(self) -> None:
        self.w.ok("create_program", program("s", "p"))
        big = json.dumps({"id": 4242, "command": "execute_program",
                          "args": execute("s", "p", question="x" * 10_000)}).encode()
        self.w.send_body(big)
        self.assertEqual(self.w.read_reply(), {"id": 4242, "success": False,
                                               "error": f"request of {len(big)} bytes exceeds max_frame_size 4096"})
        self.w.send_body(b"[" + b"1," * 5000 + b"1]")  # no id to read: id null
        self.assertIsNone(self.w.read_reply()["id"])
        self.assertEqual(self.w.ok("execute_program", execute("s", "p", question="small"))["outputs"],
                         {"answer": "answer: dummy answer for small"})

    def test_reply_over_max_frame_size_becomes_an_error_reply(self) -> None:
        for i in range(40):
            self.w.ok("create_program", program("many", f"program_number_{i}"))
        error = self.w.error("list_programs", {"session_id": "many"})
        self.assertRegex(error, r"^reply of \d+ bytes exceeds max_frame_size 4096$")
        self.assertEqual(self.w.ok("ping")["status"], "ok")  # the worker, and its sessions, live on
        self.assertEqual(self.w.ok("get_program_info", {"session_id": "many", "program_id": "program_number_7"})
                         ["program_id"], "program_number_7")

    def test_unparseable_request_is_answered_for_the_id_of_its_first_bytes(self) -> None:
        self.w.send_body(b'{"id":42,"command": oops')
        reply = self.w.read_reply()
        self.assertEqual((reply["id"], reply["success"]), (42, False))
        self.assertIn("invalid request", reply["error"])
        self.w.send_body(b'{"id":"x","command":"ping"}')
        self.assertIsNone(self.w.read_reply()["id"])
        # Nested deeper than any parser's stack, with a long number (the stdlib parser's path).
        for deep in (b'{"id":43,"x":' + b"[" * 2000 + b"12345678901234567890" + b"]" * 2000 + b"}",
                     b'{"id":44,"x":' + b"[" * 2000 + b"]" * 2000 + b"}"):
            self.w.send_body(deep)
            reply = self.w.read_reply()
            self.assertEqual((reply["id"], reply["success"]), (int(deep[6:8]), False))
        self.assertEqual(self.w.ok("ping")["status"], "ok")


class BigIntegerTest(unittest.TestCase):
    def test_integers_beyond_64_bits_are_read_and_written_exactly(self) -> None:
        w = pool_bridge("ints")
        try:
            huge = 2 ** 1100
            w.ok("configure_lm", {"provider": "dummy", "session_id": "s", "answers": [{"score": huge}]})
            sig = {"inputs": ["question"], "outputs": [{"name": "score", "type": "int"}]}
            w.ok("create_program", program("s", "p", signature=sig))
            result = w.ok("execute_program", execute("s", "p", question=huge + 1))
            self.assertEqual(result["outputs"], {"score": huge})  # orjson cannot write it; the reply is exact
            # The input reached the prompt exactly (orjson alone would have read a float).
            w.ok("configure_lm", {"provider": "dummy", "session_id": "s"})
            w.ok("create_program", program("s", "echo"))
            result = w.ok("execute_program", execute("s", "echo", question=2 ** 70 + 1))
            self.assertEqual(result["outputs"], {"answer": f"answer: dummy answer for {2 ** 70 + 1}"})
            self.assertEqual(w.ok("ping")["status"], "ok")
        finally:
            w.stop()

    def test_encode_and_decode_helpers(self) -> None:
        self.assertEqual(dspy_bridge.decode(b'{"n": 123456789012345678901234567890}'),
                         {"n": 123456789012345678901234567890})
        self.assertEqual(json.loads(dspy_bridge.encode({"n": -(2 ** 200)})), {"n": -(2 ** 200)})
        self.assertEqual(json.loads(dspy_bridge.encode({"o": object.__new__(object)}))["o"][:8], "<object ")
        with self.assertRaises(ValueError):
            dspy_bridge.encode({"n": 2 ** 70, "x": float("nan")})  # the caller turns it into an error reply
        self.assertEqual(dspy_bridge.request_id_from_prefix(b' { "id" : 17 , garbage'), 17)
        self.assertIsNone(dspy_bridge.request_id_from_prefix(b'{"command":"x","id":3}'))


class CalculatorTest(unittest.TestCase):
    def test_arithmetic(self) -> None:
        calc = dspy_bridge.calculator
        self.assertEqual(calc("(2 + 3) * 4 / 5"), "4.0")
        self.assertEqual(calc("2 ** 10 - 7 // 2 % 3"), "1024")
        self.assertEqual(calc("+".join(["1"] * 150)), "150")
        self.assertEqual(calc("-(2 ** 100)"), str(-(2 ** 100)))

    def test_refusals_are_quick_and_bounded(self) -> None:
        calc = dspy_bridge.calculator
        bombs = ["9**9**9**9", "((99**99)**99)**99", "(10**1000)*(10**1000)*(10**1000)",
                 "2**4097", "(" * 400 + "1" + ")" * 400, "1+" * 600 + "1", "__import__('os')",
                 "1e308**2", "1/0"]
        for expr in bombs:
            with self.subTest(expr=expr[:30]):
                started = time.monotonic()
                with self.assertRaises((ValueError, OverflowError, ZeroDivisionError)):
                    calc(expr)
                self.assertLess(time.monotonic() - started, 1.0)


if __name__ == "__main__":
    unittest.main()
