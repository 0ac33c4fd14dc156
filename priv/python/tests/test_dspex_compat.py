"""DSPex's own bridge commands and result keys (issue 9 item 7), on the real bridge."""

from __future__ import annotations

import unittest

from support import QA, bridge, execute, pool_bridge, program

# The keys DSPex's dspy_bridge.py puts in each result (ours may add more).
DSPEX_KEYS = {
    "ping": {"status", "timestamp", "dspy_available", "gemini_available", "uptime", "mode", "worker_id",
             "current_session"},
    "configure_lm": {"status", "model", "provider", "temperature"},
    "create_program": {"program_id", "status", "signature", "program_type"},
    "execute_program": {"program_id", "outputs", "execution_time"},
    "list_programs": {"programs", "total_count"},
    "list_entry": {"id", "created_at", "execution_count", "last_executed", "signature", "session_id"},
    "delete_program": {"program_id", "status"},
    "get_program_info": {"program_id", "signature", "created_at", "execution_count", "last_executed"},
    "get_stats": {"programs_count", "command_count", "error_count", "uptime", "memory_usage",
                  "dspy_available", "gemini_available"},
    "cleanup": {"status", "programs_removed"},
    "reset_state": {"status", "programs_cleared", "commands_reset", "errors_reset"},
    "cleanup_session": {"status", "session_id", "programs_removed"},
    "shutdown": {"status", "worker_id", "mode", "sessions_cleaned"},
    "create_gemini_program": {"program_id", "status", "type", "model_name", "signature"},
    "execute_gemini_program": {"program_id", "outputs", "execution_time", "raw_response"},
}


class DSPexCommandsTest(unittest.TestCase):
    def assertKeys(self, command: str, result: dict) -> None:
        missing = DSPEX_KEYS[command] - set(result)
        self.assertFalse(missing, f"{command} lacks {missing}: {result}")

    def test_every_dspex_command_with_its_result_keys_and_the_mock_lm(self) -> None:
        w = pool_bridge("compat")
        try:
            self.assertKeys("ping", w.ok("ping"))
            # DSPex's offline test config: {provider: :mock}, no model, no key.
            configured = w.ok("configure_lm", {"provider": "mock"})
            self.assertKeys("configure_lm", configured)
            self.assertEqual((configured["provider"], configured["scope"]), ("mock", "global"))
            sig = {"inputs": [{"name": "question", "description": "q"}],
                   "outputs": [{"name": "answer", "description": "a"}]}
            created = w.ok("create_program", program("s1", "p1", signature=sig))
            self.assertKeys("create_program", created)
            result = w.ok("execute_program", execute("s1", "p1", question="what?"))
            self.assertKeys("execute_program", result)
            self.assertEqual(result["outputs"], {"answer": "answer: dummy answer for what?"})
            w.ok("create_program", program("s2", "p2"))

            listed = w.ok("list_programs", {"session_id": "s1"})
            self.assertKeys("list_programs", listed)
            self.assertEqual(listed["total_count"], 1)
            entry = listed["programs"][0]
            self.assertKeys("list_entry", entry)
            self.assertEqual((entry["id"], entry["execution_count"], entry["session_id"], entry["signature"]),
                             ("p1", 1, "s1", sig))
            self.assertIsInstance(entry["last_executed"], float)
            # Without a session_id, DSPex's bridge lists every session's programs.
            everything = w.ok("list_programs", {})
            self.assertEqual(sorted((e["session_id"], e["id"]) for e in everything["programs"]),
                             [("s1", "p1"), ("s2", "p2")])

            info = w.ok("get_program_info", {"session_id": "s1", "program_id": "p1"})
            self.assertKeys("get_program_info", info)
            self.assertEqual(info["execution_count"], 1)
            stats = w.ok("get_stats")
            self.assertKeys("get_stats", stats)
            self.assertEqual(stats["programs_count"], 2)
            self.assertGreater(stats["memory_usage"]["rss"], 0)

            gemini = w.ok("create_gemini_program", {"session_id": "s1", "id": "g", "signature": sig})
            self.assertKeys("create_gemini_program", gemini)
            self.assertEqual((gemini["type"], gemini["model_name"]), ("gemini", "gemini-1.5-flash"))
            ran = w.ok("execute_gemini_program", execute("s1", "g", question="q"))  # under the mock LM
            self.assertKeys("execute_gemini_program", ran)
            self.assertEqual(ran["raw_response"], "answer: answer: dummy answer for q")
            self.assertEqual(w.error("execute_gemini_program", execute("s1", "p1", question="q")),
                             "Program p1 is not a Gemini program")
            # A Gemini program is restorable like any other.
            spec = [p for p in w.ok("list_programs", {"session_id": "s1"})["programs"] if p["id"] == "g"]
            self.assertEqual(spec[0]["program_type"], "gemini")

            self.assertKeys("delete_program", w.ok("delete_program", {"session_id": "s2", "program_id": "p2"}))
            self.assertKeys("cleanup_session", w.ok("cleanup_session", {"session_id": "s2"}))
            self.assertKeys("cleanup", w.ok("cleanup"))
            reset = w.ok("reset_state")
            self.assertKeys("reset_state", reset)
            self.assertGreater(reset["commands_reset"], 10)
            self.assertKeys("shutdown", w.ok("shutdown"))
            self.assertEqual(w.wait(), 0)
        finally:
            w.stop()

    def test_mock_lm_per_session_and_in_standalone(self) -> None:
        w = bridge()
        try:
            self.assertEqual(w.ok("configure_lm", {"provider": "mock", "model": "mock-model"})["model"],
                             "mock-model")
            w.ok("create_program", {"id": "p", "signature": QA})
            self.assertKeys("list_entry", {**w.ok("list_programs")["programs"][0], "session_id": None})
            self.assertEqual(w.ok("execute_program", {"program_id": "p", "inputs": {"question": "x"}})["outputs"],
                             {"answer": "answer: dummy answer for x"})
            self.assertEqual(w.ok("cleanup_session", {"session_id": "s"})["mode"], "standalone")
        finally:
            w.stop()


if __name__ == "__main__":
    unittest.main()
