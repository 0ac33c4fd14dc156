"""End-to-end tests of priv/python/dspy_bridge.py and test/support/test_worker.py.

Both scripts run as real subprocesses and are driven through the real framing
(4-byte big-endian length + JSON) over pipes; the bridge runs real DSPy with
its offline "dummy" LM. Run with:

    priv/python/.venv/bin/python -m unittest discover -s priv/python/tests -v
"""

from __future__ import annotations

import json
import os
import signal
import time
import unittest

from support import (LAUNCH, LEVELS, QA, TEST_WORKER, Worker, bridge, execute, pool_bridge,  # noqa: F401
                     program)


class BridgePoolWorkerTest(unittest.TestCase):
    """One pool-worker bridge with a global dummy LM; each test uses its own sessions."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.w = pool_bridge("w1")
        cls.w.ok("configure_lm", {"provider": "dummy"})

    @classmethod
    def tearDownClass(cls) -> None:
        cls.w.stop()

    def test_ping(self) -> None:
        result = self.w.ok("ping")
        self.assertEqual(result["status"], "ok")
        self.assertEqual(result["worker_id"], "w1")
        self.assertEqual(result["pid"], self.w.proc.pid)
        self.assertEqual(result["mode"], "pool-worker")
        self.assertEqual(result["dspy_version"], "3.4.1")
        self.assertIsInstance(result["timestamp"], float)

    def test_predict(self) -> None:
        created = self.w.ok("create_program", program("s-predict", "qa"))
        self.assertEqual(created["program_id"], "qa")
        self.assertEqual(created["program_type"], "predict")
        self.assertEqual(created["signature"], QA)
        self.assertIsInstance(created["created_at"], float)
        result = self.w.ok("execute_program", execute("s-predict", "qa", question="2+2?"))
        self.assertEqual(result["program_id"], "qa")
        self.assertEqual(result["outputs"], {"answer": "answer: dummy answer for 2+2?"})
        self.assertGreaterEqual(result["execution_time_ms"], 0)

    def test_chain_of_thought_returns_reasoning(self) -> None:
        sig = {"inputs": [{"name": "text", "description": "t"}],
               "outputs": [{"name": "summary", "description": "s"}, {"name": "score", "type": "int"}],
               "instructions": "Summarise."}
        self.w.ok("create_program", program("s-cot", "cot", "chain_of_thought", sig))
        outputs = self.w.ok("execute_program", execute("s-cot", "cot", text="héllo ✓"))["outputs"]
        self.assertEqual(outputs, {"reasoning": "reasoning: dummy answer for héllo ✓",
                                   "summary": "summary: dummy answer for héllo ✓", "score": 0})

    def test_react_with_and_without_tools(self) -> None:
        self.w.ok("create_program", program("s-react", "agent", "react"))
        self.w.ok("create_program", program("s-react", "calc", "react", tools=["calculator"]))
        for program_id in ("agent", "calc"):
            outputs = self.w.ok("execute_program", execute("s-react", program_id, question="q"))["outputs"]
            self.assertEqual(outputs["answer"], "answer: dummy answer for q")
            self.assertEqual(outputs["reasoning"], "reasoning: dummy answer for q")
            self.assertEqual(outputs["trajectory"]["tool_name_0"], "finish")
        error = self.w.error("create_program", program("s-react", "x", "react", tools=["rm_rf"]))
        self.assertIn("Unknown tools", error)
        error = self.w.error("create_program", program("s-react", "y", "predict", tools=["calculator"]))
        self.assertIn("only supported by react", error)

    def test_dummy_answers_forever_without_cache(self) -> None:
        self.w.ok("create_program", program("s-many", "qa"))
        for i in range(300):
            result = self.w.ok("execute_program", execute("s-many", "qa", question=f"q{i}"))
            self.assertEqual(result["outputs"]["answer"], f"answer: dummy answer for q{i}")
        info = self.w.ok("get_program_info", {"session_id": "s-many", "program_id": "qa"})
        self.assertEqual(info["executions"], 300)
        self.assertEqual(info["execution_count"], 300)

    def test_executions_do_not_accumulate_memory(self) -> None:
        # DSPy's default global trace/history would retain every input (~40 MB here).
        self.w.ok("create_program", program("s-mem", "p", "chain_of_thought"))
        self.w.ok("execute_program", execute("s-mem", "p", question="warm-up"))
        before = self.w.ok("get_stats")["rss_bytes"]
        for i in range(1000):
            self.w.ok("execute_program", execute("s-mem", "p", question=f"{i} " + "y" * 40_000))
        self.assertLess(self.w.ok("get_stats")["rss_bytes"] - before, 15_000_000)

    def test_sigint_is_ignored_in_pool_mode(self) -> None:
        # Ctrl-C in the VM's terminal must not kill pool workers; the pool owns their lifetime.
        os.kill(self.w.proc.pid, signal.SIGINT)
        self.assertEqual(self.w.ok("ping")["status"], "ok")

    def test_sessions_are_isolated(self) -> None:
        summary = {"inputs": ["text"], "outputs": ["summary"]}
        self.w.ok("create_program", program("iso-a", "p"))
        self.w.ok("create_program", program("iso-a", "only_a"))
        self.w.ok("create_program", program("iso-b", "p", signature=summary))
        self.assertEqual(self.w.ok("execute_program", execute("iso-a", "p", question="x"))["outputs"],
                         {"answer": "answer: dummy answer for x"})
        self.assertEqual(self.w.ok("execute_program", execute("iso-b", "p", text="y"))["outputs"],
                         {"summary": "summary: dummy answer for y"})
        ids = lambda sid: [p["program_id"] for p in self.w.ok("list_programs", {"session_id": sid})["programs"]]
        self.assertEqual(ids("iso-a"), ["p", "only_a"])
        self.assertEqual(ids("iso-b"), ["p"])
        self.assertEqual(self.w.error("execute_program", execute("iso-b", "only_a", question="x")),
                         "Program not found: only_a")
        self.w.ok("delete_program", {"session_id": "iso-a", "program_id": "p"})
        self.assertEqual(ids("iso-b"), ["p"])

    def test_session_lm_applies_only_to_its_session(self) -> None:
        result = self.w.ok("configure_lm", {"provider": "dummy", "session_id": "lm-a",
                                            "answers": [{"answer": "one"}, {"answer": "two"}]})
        self.assertEqual(result, {"configured": True, "status": "configured", "provider": "dummy",
                                  "model": "dummy", "scope": "session", "temperature": None})
        for sid in ("lm-a", "lm-b"):
            self.w.ok("create_program", program(sid, "cot", "chain_of_thought"))
        answers = [self.w.ok("execute_program", execute("lm-a", "cot", question="q"))["outputs"]
                   for _ in range(3)]
        self.assertEqual([a["answer"] for a in answers], ["one", "two", "one"])
        self.assertEqual(answers[0]["reasoning"], "reasoning: dummy answer for q")  # not scripted
        other = self.w.ok("execute_program", execute("lm-b", "cot", question="q"))["outputs"]
        self.assertEqual(other["answer"], "answer: dummy answer for q")

    def test_real_provider_is_built_but_not_called(self) -> None:
        result = self.w.ok("configure_lm", {"provider": "gemini", "model": "gemini-1.5-flash",
                                            "api_key": "secret", "temperature": 0.2, "max_tokens": 64,
                                            "session_id": "real"})
        self.assertEqual(result, {"configured": True, "status": "configured", "provider": "gemini",
                                  "model": "gemini-1.5-flash", "scope": "session", "temperature": 0.2})
        self.assertNotIn("secret", json.dumps(self.w.ok("get_stats", {"session_id": "real"})))
        inferred = self.w.ok("configure_lm", {"model": "gpt-4o-mini", "session_id": "real"})
        self.assertEqual(inferred["provider"], "openai")
        qualified = self.w.ok("configure_lm", {"model": "anthropic/claude-3-haiku", "session_id": "real"})
        self.assertEqual(qualified["provider"], "anthropic")
        self.w.ok("cleanup_session", {"session_id": "real"})

    def test_configure_lm_errors(self) -> None:
        self.assertTrue(self.w.error("configure_lm", {"provider": "nope", "model": "m"})
                        .startswith("Unknown provider: nope"))
        self.assertIn("model is required", self.w.error("configure_lm", {"provider": "openai"}))
        self.assertIn("provider is required", self.w.error("configure_lm", {"model": "mystery-model"}))
        self.assertIn("answers", self.w.error("configure_lm", {"provider": "dummy", "answers": "x"}))
        self.assertIn("temperature", self.w.error("configure_lm",
                                                  {"provider": "openai", "model": "m", "temperature": "hot"}))

    def test_create_program_errors(self) -> None:
        bad = {
            "no outputs": {"inputs": ["q"]},
            "empty outputs": {"inputs": ["q"], "outputs": []},
            "non-list inputs": {"inputs": "q", "outputs": ["a"]},
            "bad name": {"inputs": ["1q"], "outputs": ["a"]},
            "underscore name": {"inputs": ["_q"], "outputs": ["a"]},
            "nameless field": {"inputs": [{"description": "x"}], "outputs": ["a"]},
            "duplicate field": {"inputs": ["q"], "outputs": ["q"]},
            "shadows Signature": {"inputs": ["instructions"], "outputs": ["a"]},
            "Predict kwarg": {"inputs": ["demos"], "outputs": ["a"]},
            "unknown type": {"inputs": ["q"], "outputs": [{"name": "a", "type": "tensor"}]},
        }
        for label, sig in bad.items():
            with self.subTest(label):
                self.assertIn("signature", self.w.error("create_program", program("s-bad", "p", signature=sig)))
        self.assertIn("signature must be an object",
                      self.w.error("create_program", program("s-bad", "p", signature=None)))
        self.assertEqual(self.w.error("create_program", program("s-bad", "p", "cot")),
                         "Unknown program_type: 'cot' (supported: predict, chain_of_thought, react)")
        self.assertIn("reserved", self.w.error("create_program", program(
            "s-bad", "p", "react", {"inputs": ["trajectory"], "outputs": ["a"]})))
        self.w.ok("create_program", program("s-bad", "p"))
        self.assertEqual(self.w.error("create_program", program("s-bad", "p")), "Program already exists: p")
        self.w.ok("create_program", program("s-bad-2", "p"))  # same id, other session: fine

    def test_generated_program_ids(self) -> None:
        first = self.w.ok("create_program", program("s-gen", None))["program_id"]
        second = self.w.ok("create_program", program("s-gen", None))["program_id"]
        self.assertRegex(first, r"^program_\d+$")
        self.assertNotEqual(first, second)
        # A restored session may already hold the id the counter would pick next.
        n = int(second.split("_")[1])
        self.w.ok("create_program", program("s-gen", f"program_{n + 1}"))
        third = self.w.ok("create_program", program("s-gen", None))["program_id"]
        self.assertNotIn(third, (first, second, f"program_{n + 1}"))

    def test_execute_errors(self) -> None:
        self.assertEqual(self.w.error("execute_program", execute("s-exec", "ghost", question="q")),
                         "Program not found: ghost")
        two = {"inputs": ["question", "context"], "outputs": ["answer"]}
        self.w.ok("create_program", program("s-exec", "two", signature=two))
        self.assertEqual(self.w.error("execute_program", execute("s-exec", "two")),
                         "Missing required inputs for two: question, context")
        self.assertIn("program_id", self.w.error("execute_program", {"session_id": "s-exec"}))
        # Extra inputs are ignored.
        self.w.ok("execute_program", execute("s-exec", "two", question="q", context="c", extra=1))

    def test_session_id_required_in_pool_mode(self) -> None:
        for command, args in [("create_program", {"signature": QA}), ("execute_program", {"program_id": "p"}),
                              ("delete_program", {"program_id": "p"}),
                              ("get_program_info", {"program_id": "p"}), ("cleanup_session", {}),
                              ("restore_session", {"programs": []})]:
            with self.subTest(command):
                self.assertEqual(self.w.error(command, args), "session_id is required in pool-worker mode")

    def test_program_info_and_delete(self) -> None:
        self.w.ok("create_program", program("s-info", "p", "chain_of_thought"))
        self.w.ok("execute_program", execute("s-info", "p", question="q"))
        info = self.w.ok("get_program_info", {"session_id": "s-info", "program_id": "p"})
        self.assertEqual(info["program_id"], "p")
        self.assertEqual(info["session_id"], "s-info")
        self.assertEqual(info["program_type"], "chain_of_thought")
        self.assertEqual(info["signature"], QA)
        self.assertEqual(info["executions"], 1)
        self.assertIsInstance(info["last_executed"], float)
        listed = self.w.ok("list_programs", {"session_id": "s-info"})
        self.assertEqual(listed["total_count"], 1)
        self.assertEqual(listed["programs"][0]["id"], "p")
        self.assertEqual(listed["programs"][0]["executions"], 1)
        self.assertEqual(self.w.ok("delete_program", {"session_id": "s-info", "program_id": "p"}),
                         {"program_id": "p", "status": "deleted"})
        self.assertEqual(self.w.error("delete_program", {"session_id": "s-info", "program_id": "p"}),
                         "Program not found: p")
        self.assertEqual(self.w.error("get_program_info", {"session_id": "s-info", "program_id": "p"}),
                         "Program not found: p")
        self.assertEqual(self.w.ok("list_programs", {"session_id": "s-info"}),
                         {"programs": [], "total_count": 0})

    def test_cleanup_session_is_idempotent(self) -> None:
        self.w.ok("create_program", program("s-clean", "a"))
        self.w.ok("create_program", program("s-clean", "b"))
        self.assertEqual(self.w.ok("cleanup_session", {"session_id": "s-clean"}),
                         {"status": "cleaned", "session_id": "s-clean", "programs_removed": 2})
        self.assertEqual(self.w.ok("cleanup_session", {"session_id": "s-clean"}),
                         {"status": "not_found", "session_id": "s-clean", "programs_removed": 0})
        self.assertEqual(self.w.ok("list_programs", {"session_id": "s-clean"})["total_count"], 0)

    def test_get_stats(self) -> None:
        self.w.ok("create_program", program("s-stats", "p"))
        self.w.ok("execute_program", execute("s-stats", "p", question="q"))
        self.w.error("execute_program", execute("s-stats", "missing", question="q"))
        stats = self.w.ok("get_stats", {"session_id": "s-stats"})
        self.assertEqual((stats["worker_id"], stats["pid"], stats["mode"]), ("w1", self.w.proc.pid, "pool-worker"))
        self.assertGreaterEqual(stats["programs"], 1)
        self.assertGreaterEqual(stats["sessions"], 1)
        self.assertGreaterEqual(stats["commands"]["execute_program"], 2)
        self.assertGreaterEqual(stats["executions"], 1)
        self.assertGreaterEqual(stats["errors"], 1)
        self.assertGreater(stats["rss_bytes"], 10_000_000)
        self.assertTrue(stats["lm_configured"])
        self.assertEqual(stats["session"], {"session_id": "s-stats", "programs": 1, "executions": 1, "lm": None})

    def test_invalid_frames_and_commands(self) -> None:
        self.w.send_body(b"not json{")
        reply = self.w.read_reply()
        self.assertEqual((reply["id"], reply["success"]), (None, False))
        self.assertTrue(reply["error"].startswith("invalid request"), reply)
        self.w.send_body(b"\xff\xfe{}")  # not UTF-8
        self.assertEqual(self.w.read_reply()["id"], None)
        self.w.send_body(b"[1, 2]")
        self.assertEqual(self.w.read_reply()["id"], None)
        self.w.send_body(json.dumps({"id": 77, "command": "ping", "args": [1]}).encode())  # the fast ping path too
        reply = self.w.read_reply()
        self.assertEqual((reply["id"], reply["success"]), (77, False))
        self.assertEqual(self.w.error("frobnicate"), "Unknown command: frobnicate")
        self.assertEqual(self.w.ok("ping")["status"], "ok")  # still serving

    def test_pipelined_requests_are_answered_in_order(self) -> None:
        self.w.ok("create_program", program("s-pipe", "p"))
        ids = [self.w.send("execute_program", execute("s-pipe", "p", question=f"q{i}")) for i in range(20)]
        ids.append(self.w.send("ping"))
        replies = [self.w.read_reply() for _ in ids]
        self.assertEqual([r["id"] for r in replies], ids)
        self.assertEqual(replies[7]["result"]["outputs"]["answer"], "answer: dummy answer for q7")

    def test_large_unicode_payload(self) -> None:
        self.w.ok("create_program", program("s-big", "p"))
        text = "ünïcödé ✓ 漢字 " * 20_000  # ~300 KB of multi-byte UTF-8
        result = self.w.ok("execute_program", execute("s-big", "p", question=text))
        self.assertTrue(result["outputs"]["answer"].startswith("answer: dummy answer for ünïcödé ✓ 漢字"))


class BridgeRestoreTest(unittest.TestCase):
    """restore_session moves a session to a second, fresh worker."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.source, cls.target = pool_bridge("src"), pool_bridge("dst")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.source.stop()
        cls.target.stop()

    def test_restore_session(self) -> None:
        lm = {"provider": "dummy", "answers": [{"answer": "restored!"}]}
        specs = [program("r1", "a"), program("r1", "b", "chain_of_thought")]
        self.source.ok("configure_lm", {**lm, "session_id": "r1"})
        for spec in specs:
            self.source.ok("create_program", spec)

        # A fresh worker has neither the programs nor any LM.
        self.assertEqual(self.target.error("execute_program", execute("r1", "a", question="q")),
                         "Program not found: a")
        self.target.ok("create_program", program("no-lm", "p"))
        self.assertIn("No LM is configured", self.target.error("execute_program", execute("no-lm", "p", question="q")))

        self.target.ok("create_program", program("r1", "stale"))
        result = self.target.ok("restore_session", {"session_id": "r1", "programs": specs, "lm": lm})
        self.assertEqual(result, {"session_id": "r1", "programs": 2, "lm_configured": True})
        listed = self.target.ok("list_programs", {"session_id": "r1"})
        self.assertEqual([p["program_id"] for p in listed["programs"]], ["a", "b"])  # "stale" is gone
        self.assertEqual(self.target.ok("execute_program", execute("r1", "a", question="q"))["outputs"],
                         {"answer": "restored!"})
        outputs = self.target.ok("execute_program", execute("r1", "b", question="q"))["outputs"]
        self.assertEqual(outputs, {"reasoning": "reasoning: dummy answer for q", "answer": "restored!"})

        # A bad spec fails the whole restore and leaves the session as it was.
        error = self.target.error("restore_session", {"session_id": "r1", "lm": None,
                                                      "programs": [program("r1", "c", "nope")]})
        self.assertIn("Unknown program_type", error)
        self.assertIn("every program spec needs a string id",
                      self.target.error("restore_session", {"session_id": "r1", "programs": [{"signature": QA}]}))
        self.assertEqual(self.target.ok("list_programs", {"session_id": "r1"})["total_count"], 2)

        # lm: null restores the programs without a session LM (and there is no global one).
        self.target.ok("restore_session", {"session_id": "r1", "programs": specs, "lm": None})
        self.assertIn("No LM is configured", self.target.error("execute_program", execute("r1", "a", question="q")))


class BridgeStandaloneTest(unittest.TestCase):
    def test_global_namespace_cleanup_reset_and_shutdown(self) -> None:
        w = bridge()  # standalone is the default mode
        try:
            self.assertEqual(w.ok("ping")["mode"], "standalone")
            self.assertEqual(w.ok("configure_lm", {"provider": "dummy", "session_id": "ignored"})["scope"], "global")
            w.ok("create_program", {"id": "p", "signature": QA})  # no session_id needed
            w.ok("create_program", {"id": "q", "signature": QA, "session_id": "other"})
            self.assertEqual(w.ok("list_programs")["total_count"], 2)  # one global namespace
            self.assertEqual(w.ok("execute_program", {"program_id": "q", "inputs": {"question": "x"}})["outputs"],
                             {"answer": "answer: dummy answer for x"})
            self.assertEqual(w.ok("cleanup_session", {"session_id": "other"})["status"], "not_applicable")
            self.assertEqual(w.ok("list_programs")["total_count"], 2)
            self.assertEqual(w.ok("cleanup"), {"status": "cleaned", "programs_removed": 2})
            self.assertEqual(w.ok("list_programs")["total_count"], 0)
            self.assertTrue(w.ok("get_stats")["lm_configured"])  # cleanup keeps the LM

            w.ok("create_program", {"id": "p", "signature": QA})
            reset = w.ok("reset_state")
            self.assertEqual((reset["status"], reset["programs_cleared"]), ("reset", 1))
            stats = w.ok("get_stats")
            self.assertFalse(stats["lm_configured"])  # reset forgets the LM ...
            self.assertEqual(stats["commands"], {"get_stats": 1})  # ... and the counters
            self.assertEqual(stats["programs"], 0)

            self.assertEqual(w.ok("shutdown")["status"], "shutting_down")
            self.assertEqual(w.wait(), 0)
        finally:
            w.stop()


class BridgeProcessTest(unittest.TestCase):
    """Stdout protection, stdin EOF, the log format."""

    def test_library_writes_to_stdout_do_not_corrupt_frames(self) -> None:
        w = pool_bridge("noisy", env={"LAUNCH_NOISY_DSPY": "1"}, launcher=LAUNCH)
        try:
            w.ok("configure_lm", {"provider": "dummy"})
            w.ok("create_program", program("s", "p"))
            result = w.ok("execute_program", execute("s", "p", question="__print__"))
            self.assertEqual(result["outputs"], {"answer": "answer: dummy answer for __print__"})
            for needle in ("PRINTED-BY-LIBRARY", "WRITTEN-TO-FD-1", "CHILD-STDOUT"):
                w.wait_for_stderr(needle)
            self.assertEqual(w.ok("ping")["status"], "ok")  # the stream is still in sync
        finally:
            w.stop()

    def test_stdin_eof_ends_worker_during_a_long_call(self) -> None:
        w = pool_bridge("blocked", env={"LAUNCH_NOISY_DSPY": "1"}, launcher=LAUNCH)
        try:
            w.ok("configure_lm", {"provider": "dummy"})
            w.ok("create_program", program("s", "p"))
            w.send("execute_program", execute("s", "p", question="__block__"))
            w.wait_for_stderr("LONG-CALL-STARTED")
            started = time.monotonic()
            w.close_stdin()  # what the VM's death looks like to the worker
            self.assertEqual(w.wait(timeout=10), 0)
            self.assertLess(time.monotonic() - started, 10)
        finally:
            w.stop()

    def test_stdin_eof_exit_and_log_format(self) -> None:
        # (DSPy 3.4.1 imports orjson itself, so the bridge's stdlib json
        # fallback cannot run next to DSPy; test_worker's fallback is tested.)
        w = pool_bridge("plain")
        try:
            w.ok("configure_lm", {"provider": "dummy"})
            w.ok("create_program", program("s", "p", "chain_of_thought"))
            outputs = w.ok("execute_program", execute("s", "p", question="ça ✓"))["outputs"]
            self.assertEqual(outputs["answer"], "answer: dummy answer for ça ✓")
            w.error("execute_program", execute("s", "nope"))
            w.close_stdin()
            self.assertEqual(w.wait(), 0)
            lines = w.stderr_until_closed()
            self.assertEqual(sum("ready" in line for line in lines), 1, lines)
            self.assertTrue(all(line.split(" ", 1)[0] in LEVELS for line in lines), lines)
        finally:
            w.stop()


class TestWorkerTest(unittest.TestCase):
    """test/support/test_worker.py, the pool's DSPy-free test double."""

    def setUp(self) -> None:
        self.w = Worker(TEST_WORKER, "--worker-id", "t1")

    def tearDown(self) -> None:
        self.w.stop()

    def test_basic_commands(self) -> None:
        self.assertEqual(self.w.ok("ping"), {"status": "ok", "worker_id": "t1", "pid": self.w.proc.pid})
        args = {"session_id": "s", "nested": {"list": [1, "ü", None]}}
        self.assertEqual(self.w.ok("echo", args), args)
        self.assertEqual(self.w.ok("sleep", {"ms": 20}), {"slept": 20})
        self.assertEqual(self.w.ok("big", {"bytes": 1_000_000}), {"data": "x" * 1_000_000})
        self.assertEqual(self.w.error("fail", {"message": "boom"}), "boom")
        self.assertEqual(self.w.error("nope"), "Unknown command: nope")
        self.assertEqual(self.w.ok("stderr", {"line": "WARNING from the test"}), {"ok": True})
        self.w.wait_for_stderr("WARNING from the test")
        self.assertEqual(self.w.ok("print_stdout", {"text": "PRINTED"}), {"printed": True})
        self.w.wait_for_stderr("PRINTED")
        stats = self.w.ok("stats")
        self.assertEqual((stats["calls"], stats["pid"], stats["sessions"]), (9, self.w.proc.pid, {}))

    def test_malformed_replies(self) -> None:
        self.w.send("garbage_stdout")
        self.assertEqual(self.w.read_exact(len(b"this is not a frame\n")), b"this is not a frame\n")
        self.w.send("garbage_json")
        self.assertEqual(self.w.read_body(), b"not json{")
        request_id = self.w.send("wrong_id")
        self.assertEqual(self.w.read_reply(), {"id": request_id + 1000, "success": True, "result": {}})
        request_id = self.w.send("no_success_key")
        self.assertEqual(self.w.read_reply(), {"id": request_id, "result": 1})
        self.w.send_body(b"{not json")
        reply = self.w.read_reply()
        self.assertEqual((reply["id"], reply["success"]), (None, False))
        self.assertEqual(self.w.ok("ping")["status"], "ok")

    def test_sessions(self) -> None:
        self.assertEqual(self.w.ok("create_program", {"session_id": "a", "id": "p", "signature": QA}),
                         {"program_id": "p"})
        generated = self.w.ok("create_program", {"session_id": "a", "signature": QA})["program_id"]
        self.assertRegex(generated, r"^prog_\d+$")
        self.assertEqual(self.w.ok("execute_program", {"session_id": "a", "program_id": "p", "inputs": {}}),
                         {"outputs": {"answer": "ok"}, "program_id": "p", "worker_pid": self.w.proc.pid})
        self.assertEqual(self.w.error("execute_program", {"session_id": "b", "program_id": "p"}),
                         "Program not found: p")
        self.assertEqual(self.w.error("create_program", {"signature": QA}),
                         "session_id is required in pool-worker mode")
        self.assertEqual(self.w.ok("list_programs", {"session_id": "a"}),
                         {"programs": ["p", generated], "total_count": 2})
        self.assertTrue(self.w.ok("configure_lm", {"session_id": "a", "provider": "dummy"})["configured"])
        self.w.ok("delete_program", {"session_id": "a", "program_id": generated})
        self.assertEqual(self.w.ok("restore_session", {"session_id": "b", "lm": None,
                                                       "programs": [{"id": "x", "signature": QA}]}),
                         {"session_id": "b", "programs": 1})
        self.assertEqual(self.w.ok("stats")["sessions"], {"a": ["p"], "b": ["x"]})
        self.assertEqual(self.w.ok("cleanup_session", {"session_id": "a"})["status"], "cleaned")
        self.assertEqual(self.w.ok("stats")["sessions"], {"b": ["x"]})

    def test_shutdown(self) -> None:
        self.assertEqual(self.w.ok("shutdown")["status"], "shutting_down")
        self.assertEqual(self.w.wait(), 0)

    def test_exit_and_kill_self_die_without_reply(self) -> None:
        self.w.send("exit", {"code": 3})
        self.assertRaises(EOFError, self.w.read_exact, 4)
        self.assertEqual(self.w.wait(), 3)
        other = Worker(TEST_WORKER)
        try:
            other.send("kill_self")
            self.assertRaises(EOFError, other.read_exact, 4)
            self.assertEqual(other.wait(), -signal.SIGKILL)
        finally:
            other.stop()

    def test_stdin_eof_exits(self) -> None:
        self.w.ok("ping")
        self.w.close_stdin()
        self.assertEqual(self.w.wait(), 0)

    def test_start_knobs(self) -> None:
        failing = Worker(TEST_WORKER, env={"TEST_WORKER_FAIL_ON_START": "1"})
        try:
            self.assertRaises(EOFError, failing.read_exact, 4)
            self.assertEqual(failing.wait(), 1)
            failing.wait_for_stderr("RuntimeError: TEST_WORKER_FAIL_ON_START")
        finally:
            failing.stop()
        started = time.monotonic()
        slow = Worker(TEST_WORKER, env={"TEST_WORKER_START_DELAY_MS": "300"})
        try:
            self.assertEqual(slow.ok("ping")["status"], "ok")
            self.assertGreaterEqual(time.monotonic() - started, 0.3)
        finally:
            slow.stop()

    def test_stdlib_json_fallback(self) -> None:
        plain = Worker(TEST_WORKER, env={"LAUNCH_BLOCK_ORJSON": "1"}, launcher=LAUNCH)
        try:
            self.assertEqual(plain.ok("echo", {"text": "ü ✓"}), {"text": "ü ✓"})
        finally:
            plain.stop()


if __name__ == "__main__":
    unittest.main()
