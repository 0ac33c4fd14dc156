#!/usr/bin/env python3
"""DSPy 3.4.1 worker for dspex_native_pool.

    python dspy_bridge.py --mode pool-worker --worker-id ID
    python dspy_bridge.py                      # standalone: one global namespace

Wire protocol (CONTRACT.md §5): every frame is a 4-byte big-endian length
followed by that many bytes of UTF-8 JSON. Requests
``{"id", "command", "args"}`` arrive on stdin; responses
``{"id", "success": true, "result"}`` / ``{"id", "success": false, "error"}``
leave on the original stdout.

The protocol owns the original stdin and stdout. Both are moved to private
descriptors before anything heavy is imported; fd 1 then points at stderr and
fd 0 at /dev/null, so neither a library's ``print`` nor a C extension's
``write(1, ...)`` can corrupt a frame, and nothing can steal request bytes.

A daemon thread reads frames; every command runs on one asyncio event loop
on the main thread (``dspy.configure`` may only ever be called from one
thread). Under protocol 1 (no handshake, as DSPex's pools speak) requests run
one at a time, in order. Under protocol 2 (docs/protocol.md: the pool's first
ping carries ``handshake: true, protocol: 2``) each ``execute_program`` is its
own task awaiting ``program.acall`` under the session's ``dspy.context(lm=..)``,
up to ``--concurrency`` (default 64) at once, cancellable with a
``{"id": N, "control": "cancel"}`` frame; pings are answered by the reader
thread even while the loop is busy. When stdin reaches EOF the VM is gone and
the reader ends the process at once, even while a long call still runs.

    --concurrency N     (env DSPY_BRIDGE_CONCURRENCY)  announced in the handshake
    --protocol 1|2      (env DSPY_BRIDGE_PROTOCOL)     2: accept a protocol-2 handshake
    --max-frame-size B  (env DSPY_BRIDGE_MAX_FRAME_SIZE) until the handshake sets it

In pool-worker mode every program command needs ``args.session_id`` and
programs live in per-session namespaces, so two sessions may use the same
program id. ``restore_session`` rebuilds a session from its specs, which lets
the pool move a session to another worker after a crash.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import itertools
import json
import logging
import operator
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

try:
    import orjson
except ImportError:  # stdlib json keeps the worker usable without orjson
    orjson = None

dspy: Any = None  # imported by main() once the protocol owns stdin/stdout

log = logging.getLogger("dspy_bridge")

STANDALONE_NAMESPACE = "__standalone__"
PROGRAM_TYPES = ("predict", "chain_of_thought", "react")

# configure_lm "provider" -> LiteLLM model prefix.
PROVIDER_PREFIXES = {
    "openai": "openai", "gemini": "gemini", "google": "gemini", "anthropic": "anthropic",
    "groq": "groq", "mistral": "mistral", "cohere": "cohere", "deepseek": "deepseek",
    "together": "together_ai", "together_ai": "together_ai", "openrouter": "openrouter",
    "ollama": "ollama_chat", "ollama_chat": "ollama_chat", "azure": "azure",
    "bedrock": "bedrock", "vertex_ai": "vertex_ai", "fireworks_ai": "fireworks_ai",
    "perplexity": "perplexity", "xai": "xai", "huggingface": "huggingface",
}
# A bare model name without a provider (DSPex's bridge assumed Google).
MODEL_NAME_PROVIDERS = (("gemini", "gemini"), ("gpt-", "openai"), ("o1", "openai"),
                        ("o3", "openai"), ("o4", "openai"), ("claude", "anthropic"))

FIELD_TYPES: dict[str, Any] = {
    "str": str, "string": str, "text": str, "int": int, "integer": int,
    "float": float, "number": float, "bool": bool, "boolean": bool,
    "list": list[str], "list[str]": list[str], "dict": dict[str, Any],
}
# Keyword arguments dspy.Predict takes for itself, so they cannot be inputs.
PREDICT_KWARGS = {"demos", "config", "lm", "signature", "new_signature"}
# Names the DSPy modules add to a signature themselves.
RESERVED_FIELDS = {
    "predict": set(),
    "chain_of_thought": {"reasoning"},
    "react": {"reasoning", "trajectory", "next_thought", "next_tool_name", "next_tool_args"},
}


class CommandError(Exception):
    """An expected failure; its message goes to the caller verbatim."""


# --------------------------------------------------------------------------- framing

def claim_stdio() -> tuple[int, int]:
    """Move the protocol to private fds; return (request_fd, response_fd)."""
    request_fd, response_fd = os.dup(0), os.dup(1)  # dups are not inherited by children
    os.dup2(2, 1)  # C-level writes to fd 1 now land on stderr
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # input() or a child process reading stdin gets EOF, not our frames
    os.close(devnull)
    sys.stdout = sys.stderr
    sys.stdin = open(os.devnull)
    return request_fd, response_fd


def read_exact(fd: int, n: int) -> bytes | None:
    """Read exactly n bytes, or return None on EOF."""
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def skip_exact(fd: int, n: int) -> bool:
    """Read and drop n bytes without holding them; False on EOF."""
    while n > 0:
        chunk = os.read(fd, min(n, 1 << 16))
        if not chunk:
            return False
        n -= len(chunk)
    return True


def write_frame(fd: int, body: bytes) -> None:
    """Header and body in one buffer, so a frame is never interleaved or split."""
    view = memoryview(len(body).to_bytes(4, "big") + body)
    while view:
        view = view[os.write(fd, view):]


# The pool writes '{"id":N,' first in every request, so a frame that cannot be
# parsed can still be answered for its request.
_ID_PREFIX = re.compile(rb'\A\s*\{\s*"id"\s*:\s*(-?\d{1,19})\s*[,}]')


def request_id_from_prefix(body: bytes) -> int | None:
    match = _ID_PREFIX.match(body[:64])
    return int(match.group(1)) if match else None


# orjson reads an integer beyond 64 bits as a float (or refuses it); a frame
# with a run of 20+ digits anywhere is parsed by the stdlib instead, which
# keeps every integer exact.
_LONG_DIGITS = re.compile(rb"\d{20}")


def decode(body: bytes) -> Any:
    """JSON -> Python, integers of any size kept exact."""
    if orjson and not _LONG_DIGITS.search(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            try:
                return json.loads(body)
            except (ValueError, RecursionError):
                raise exc from None
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _json_dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                          default=str).encode()


def encode(obj: Any) -> bytes:
    """Serialise a frame; values JSON cannot hold become strings. Integers
    beyond 64 bits (which orjson refuses) are written exactly by the stdlib
    encoder. Raises TypeError/ValueError for what JSON cannot express at all
    (NaN next to such an integer, cycles)."""
    if orjson:
        opts = orjson.OPT_NON_STR_KEYS
        try:
            return orjson.dumps(obj, option=opts)
        except TypeError:
            try:
                return orjson.dumps(obj, option=opts, default=str)
            except TypeError:  # an int orjson cannot write, deep nesting, ...
                return _json_dumps(obj)
    return _json_dumps(obj)


def to_jsonable(value: Any) -> Any:
    """DSPy outputs may hold pydantic models, tuples, or arbitrary objects."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "model_dump"):
        try:
            return to_jsonable(value.model_dump())
        except Exception:  # a broken model_dump still has a str()
            pass
    return str(value)


# --------------------------------------------------------------------------- offline LM

_OUTPUT_SECTION = re.compile(r"Your output fields are:\n(.*?)(?:\nAll interactions will be structured|\Z)", re.S)
_OUTPUT_FIELD = re.compile(r"^\d+\. `(\w+)` \((.*?)\):", re.M)
_INPUT_VALUE = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond with |\Z)", re.S)


class OfflineEngine:
    """A ``dspy.LM`` engine (DSPy 3.4's ``complete(Request) -> Response``) that
    answers any ChatAdapter prompt without a network.

    ``dspy.utils.DummyLM`` answers only from a finite script (then just
    ``{"answer": "No more responses"}``) and only the fields it names. This
    engine reads the requested output fields and their types from the system
    prompt, so it answers every signature, including ChainOfThought's
    ``reasoning`` and ReAct's ``next_tool_name``/``next_tool_args``, forever.

    Scripted ``answers`` are cycled; a call consumes one only when it asks for
    at least one field the script knows, so ReAct's tool-selection turns do not
    shift the answers meant for the final extraction. Fields the script lacks
    get the deterministic default answer.
    """

    def __init__(self, answers: list[dict[str, Any]] | None = None) -> None:
        self._answers = itertools.cycle(answers) if answers else None
        self._scripted_fields = set().union(*answers) if answers else set()
        self._lock = threading.Lock()  # dspy.Parallel may call from several threads

    def complete(self, request: Any) -> Any:
        from dspy.lm15 import Message, Response, TextPart, Usage

        system = request.system if isinstance(request.system, str) else \
            "".join(getattr(p, "text", "") for p in request.system or ())
        section = _OUTPUT_SECTION.search(system)
        fields = _OUTPUT_FIELD.findall(section.group(1)) if section else []
        if not fields:
            raise ValueError("dummy LM: no output fields in the prompt (only ChatAdapter prompts are supported)")
        user = next((m.text or "" for m in reversed(request.messages) if m.role == "user"), "")
        inputs = _INPUT_VALUE.findall(user)
        seed = inputs[0][1].strip()[:100] if inputs else ""

        scripted: dict[str, Any] = {}
        if self._answers and self._scripted_fields.intersection(name for name, _ in fields):
            with self._lock:
                scripted = next(self._answers)
        parts = []
        for name, type_name in fields:
            value = scripted[name] if name in scripted else _default_answer(name, type_name, seed)
            parts.append(f"[[ ## {name} ## ]]\n{value if isinstance(value, str) else json.dumps(value)}")
        parts.append("[[ ## completed ## ]]")
        return Response(id=None, model="dummy", message=Message.assistant([TextPart("\n\n".join(parts))]),
                        finish_reason="stop", usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))

    def stream(self, request: Any) -> Any:
        from dspy.lm15 import response_to_events
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


class AsyncOfflineEngine:
    """The async counterpart DSPy awaits under ``acall``: the same answers,
    after ``latency`` seconds of (cancellable) waiting, as an LM call would."""

    def __init__(self, sync: OfflineEngine, latency: float = 0.0) -> None:
        self.sync, self.latency = sync, latency

    async def complete(self, request: Any) -> Any:
        if self.latency:
            await asyncio.sleep(self.latency)
        return self.sync.complete(request)

    async def stream(self, request: Any) -> Any:
        if self.latency:
            await asyncio.sleep(self.latency)
        for event in self.sync.stream(request):
            yield event

    async def aclose(self) -> None:
        pass


def _default_answer(name: str, type_name: str, seed: str) -> str:
    text = f"{name}: dummy answer for {seed}" if seed else f"{name}: dummy answer"
    if type_name.startswith("Literal["):
        options = ast.literal_eval("(" + type_name[len("Literal["):-1] + ",)")
        return "finish" if "finish" in options else str(options[0])  # ReAct: end the loop at once
    if type_name.startswith("dict"):
        return "{}"
    if type_name.startswith("list"):
        return json.dumps([text])
    return {"int": "0", "float": "0.0", "bool": "true"}.get(type_name, text)


def build_lm(cfg: Any) -> tuple[Any, dict[str, str]]:
    """configure_lm args -> (dspy LM, {"provider", "model"}); CommandError if invalid."""
    if not isinstance(cfg, dict):
        raise CommandError("LM config must be an object")
    provider, model = cfg.get("provider"), cfg.get("model")
    if provider is not None and not isinstance(provider, str):
        raise CommandError("provider must be a string")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise CommandError("model must be a non-empty string")
    provider = (provider or "").strip().lower()

    if provider in ("dummy", "mock"):  # "mock": DSPex's offline test config
        answers = cfg.get("answers")
        if answers is not None and not (
                isinstance(answers, list) and answers and all(isinstance(a, dict) for a in answers)):
            raise CommandError("answers must be a non-empty list of objects (field -> value)")
        latency_ms = cfg.get("latency_ms", 0)
        if isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float)) or not 0 <= latency_ms <= 3.6e6:
            raise CommandError("latency_ms must be a number of milliseconds between 0 and 3600000")
        model = model or provider
        engine = OfflineEngine(answers)
        lm = dspy.LM(f"dummy/{model}", engine=engine, async_engine=AsyncOfflineEngine(engine, latency_ms / 1000),
                     cache=False, num_retries=0)
        return lm, {"provider": provider, "model": model}

    if not model:
        raise CommandError("model is required")
    if not provider and "/" not in model:
        provider = next((p for prefix, p in MODEL_NAME_PROVIDERS if model.startswith(prefix)), "")
        if not provider:
            raise CommandError(f"provider is required for model {model!r}")
    if provider and provider not in PROVIDER_PREFIXES:
        raise CommandError(f"Unknown provider: {provider} (supported: dummy, mock, {', '.join(sorted(PROVIDER_PREFIXES))})")
    qualified = model if "/" in model else f"{PROVIDER_PREFIXES[provider]}/{model}"

    kwargs: dict[str, Any] = {k: cfg[k] for k in ("api_key", "api_base") if cfg.get(k)}
    temperature, max_tokens = cfg.get("temperature"), cfg.get("max_tokens")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise CommandError("temperature must be a number")
        kwargs["temperature"] = float(temperature)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise CommandError("max_tokens must be a positive integer")
        kwargs["max_tokens"] = max_tokens
    if "cache" in cfg:
        kwargs["cache"] = bool(cfg["cache"])
    if (retries := cfg.get("num_retries")) is not None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise CommandError("num_retries must be a non-negative integer")
        kwargs["num_retries"] = retries
    return dspy.LM(qualified, **kwargs), {"provider": provider or qualified.split("/", 1)[0], "model": model}


# --------------------------------------------------------------------------- programs

_BIN_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}


CALC_MAX_CHARS = 1000  # longer expressions are refused before parsing
CALC_MAX_BITS = 4096  # integers beyond ~1233 digits are refused, before they are computed
CALC_MAX_DEPTH = 200  # operator nesting (a chain of 200 additions is 200 deep)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '(2 + 3) * 4 / 5'."""
    if not isinstance(expression, str):
        raise ValueError("expression must be a string")
    if len(expression) > CALC_MAX_CHARS:
        raise ValueError(f"expression longer than {CALC_MAX_CHARS} characters")

    def bounded(value: Any) -> Any:
        if isinstance(value, int) and value.bit_length() > CALC_MAX_BITS:
            raise ValueError("result too large")
        return value

    def ev(node: ast.AST, depth: int) -> Any:
        if depth > CALC_MAX_DEPTH:
            raise ValueError("expression nested too deeply")
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return bounded(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = ev(node.operand, depth + 1)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
            left, right = ev(node.left, depth + 1), ev(node.right, depth + 1)
            if isinstance(node.op, ast.Pow):
                if abs(right) > 1000:
                    raise ValueError("exponent too large")
                if isinstance(left, int) and isinstance(right, int) and right > 0 \
                        and (abs(left).bit_length() - 1) * right > CALC_MAX_BITS:
                    raise ValueError("result too large")  # known before computing it
            return bounded(_BIN_OPS[type(node.op)](left, right))
        raise ValueError("only numbers and + - * / // % ** are allowed")

    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as exc:
        raise ValueError(f"not an arithmetic expression: {type(exc).__name__}") from None
    return str(ev(tree.body, 0))


# ReAct tools a program spec may name; code cannot travel over the wire.
BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator}


@dataclass
class Program:
    id: str
    program_type: str
    module: Any
    spec: dict[str, Any]  # what create_program received, with "id": kept for info/restore
    input_names: list[str]
    created_at: float = field(default_factory=time.time)
    executions: int = 0
    last_executed: float | None = None
    stream_fields: list[str] = field(default_factory=list)  # output fields a stream sends chunks of
    gemini_model: str | None = None  # set for create_gemini_program's programs
    gemini_lm: Any = None  # built on first use when no LM is configured

    def listing(self, session_id: str | None) -> dict[str, Any]:
        """The entry DSPex's list_programs returns (plus this bridge's own keys)."""
        entry = {"id": self.id, "program_id": self.id, "program_type": self.program_type,
                 "created_at": self.created_at, "execution_count": self.executions,
                 "executions": self.executions, "last_executed": self.last_executed,
                 "signature": self.spec.get("signature")}
        if session_id is not None:
            entry["session_id"] = session_id
        return entry


# The request whose task is running: a pool tool reaches the pool through it.
CURRENT_REQUEST: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "dspex_current_request", default=None)
JSON_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}


def pool_tool(spec: dict[str, Any]) -> Any:
    """A ReAct tool declared as {name, description, args} whose implementation
    lives in the pool (Elixir): calling it sends a tool_call event for the
    running request and awaits the pool's tool_result. A tool error (ok:
    false) raises, which ReAct turns into an observation the agent reads."""
    name, desc, args = spec.get("name"), spec.get("description") or spec.get("desc") or "", spec.get("args") or {}
    if not isinstance(name, str) or not name.isidentifier() or name == "finish":
        raise CommandError(f"tools: invalid tool name {name!r} (an identifier other than finish)")
    if not isinstance(desc, str):
        raise CommandError(f"tools: description of {name} must be a string")
    if not isinstance(args, dict):
        raise CommandError(f"tools: args of {name} must be an object (arg name -> type or JSON schema)")
    schema: dict[str, Any] = {}
    for arg, decl in args.items():
        if not isinstance(arg, str) or not arg.isidentifier():
            raise CommandError(f"tools: invalid arg name {arg!r} for {name}")
        if isinstance(decl, str):
            decl = {"type": decl}
        if not isinstance(decl, dict) or decl.get("type", "string") not in JSON_TYPES:
            raise CommandError(f"tools: arg {arg} of {name} needs a JSON type ({', '.join(sorted(JSON_TYPES))}) "
                               f"or a JSON schema object")
        schema[arg] = dict(decl)

    async def call(**kwargs: Any) -> Any:
        ctx = CURRENT_REQUEST.get()
        if ctx is None or ctx.server.protocol < 2:
            raise RuntimeError(f"tool {name} runs in the pool, which needs protocol 2")
        return await ctx.call_tool(name, kwargs)

    return dspy.Tool(call, name=name, desc=desc, args=schema, arg_types={arg: Any for arg in schema})


def _parse_fields(raw: Any, kind: str, reserved: set[str]) -> list[tuple[str, str, Any]]:
    if not isinstance(raw, list):
        raise CommandError(f"signature.{kind} must be a list of fields")
    fields = []
    for item in raw:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise CommandError(f"signature.{kind}: each field must be an object with a name")
        name, desc, type_name = item.get("name"), item.get("description") or item.get("desc") or "", item.get("type")
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise CommandError(f"signature.{kind}: invalid field name {name!r} (need an identifier without a leading _)")
        if name in reserved:
            raise CommandError(f"signature.{kind}: field name {name!r} is reserved by this program type")
        if name in PREDICT_KWARGS or hasattr(dspy.Signature, name):  # e.g. "instructions", "fields"
            raise CommandError(f"signature.{kind}: field name {name!r} clashes with a DSPy name")
        if not isinstance(desc, str):
            raise CommandError(f"signature.{kind}: description of {name!r} must be a string")
        py_type: Any = str
        if type_name is not None:
            py_type = FIELD_TYPES.get(str(type_name).strip().lower().replace(" ", ""))
            if py_type is None:
                raise CommandError(f"signature.{kind}: unsupported type {type_name!r} for {name!r} "
                                   f"(supported: {', '.join(FIELD_TYPES)})")
        fields.append((name, desc, py_type))
    return fields


def build_program(spec: dict[str, Any], program_id: str) -> Program:
    """Validate a create_program spec and build its DSPy module."""
    gemini = spec.get("type") == "gemini"  # create_gemini_program: a Predict under a Gemini LM
    program_type = "predict" if gemini else spec.get("program_type") or "predict"
    if program_type not in PROGRAM_TYPES:
        raise CommandError(f"Unknown program_type: {program_type!r} (supported: {', '.join(PROGRAM_TYPES)})")
    sig = spec.get("signature")
    if not isinstance(sig, dict):
        raise CommandError("signature must be an object with inputs and outputs")
    reserved = RESERVED_FIELDS[program_type]
    inputs = _parse_fields(sig.get("inputs", []), "inputs", reserved)
    outputs = _parse_fields(sig.get("outputs"), "outputs", reserved)
    if not outputs:
        raise CommandError("signature.outputs must name at least one field")
    names = [name for name, _, _ in inputs + outputs]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise CommandError(f"signature: duplicate field names {dupes}")
    instructions = sig.get("instructions") or sig.get("description")
    if instructions is not None and not isinstance(instructions, str):
        raise CommandError("signature.instructions must be a string")

    tool_specs = spec.get("tools") or []
    if not isinstance(tool_specs, list) or not all(isinstance(t, (str, dict)) for t in tool_specs):
        raise CommandError("tools must be a list of tool names or tool declarations")
    if tool_specs and program_type != "react":
        raise CommandError("tools are only supported by react programs")
    tool_names = [t for t in tool_specs if isinstance(t, str)]
    if unknown := [t for t in tool_names if t not in BUILTIN_TOOLS]:
        raise CommandError(f"Unknown tools: {unknown} (available: {', '.join(BUILTIN_TOOLS)})")
    tools: list[Any] = [BUILTIN_TOOLS[t] if isinstance(t, str) else pool_tool(t) for t in tool_specs]
    names = [t if isinstance(t, str) else t["name"] for t in tool_specs]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise CommandError(f"tools: duplicate names {dupes}")

    signature = dspy.make_signature(
        {**{n: (t, dspy.InputField(desc=d)) for n, d, t in inputs},
         **{n: (t, dspy.OutputField(desc=d)) for n, d, t in outputs}},
        instructions or None)
    if program_type == "predict":
        module = dspy.Predict(signature)
    elif program_type == "chain_of_thought":
        module = dspy.ChainOfThought(signature)
    else:  # ReAct always adds its own "finish" tool, so an empty list is valid
        module = dspy.ReAct(signature, tools=tools)
    if gemini:
        model = spec.get("model") or "gemini-1.5-flash"
        if not isinstance(model, str):
            raise CommandError("model must be a string")
        return Program(id=program_id, program_type="gemini", module=module,
                       spec={**spec, "id": program_id, "model": model},
                       input_names=[n for n, _, _ in inputs], gemini_model=model,
                       stream_fields=[n for n, _, _ in outputs])
    stream_fields = (["reasoning"] if program_type != "predict" else []) + [n for n, _, _ in outputs]
    return Program(id=program_id, program_type=program_type, module=module,
                   spec={**spec, "id": program_id}, input_names=[n for n, _, _ in inputs],
                   stream_fields=stream_fields)


@dataclass
class Session:
    programs: dict[str, Program] = field(default_factory=dict)
    lm: Any = None
    lm_info: dict[str, str] | None = None


# --------------------------------------------------------------------------- bridge

class Bridge:
    def __init__(self, mode: str, worker_id: str | None, started: float | None = None) -> None:
        self.mode, self.worker_id = mode, worker_id
        self.started = time.monotonic() if started is None else started
        self.sessions: dict[str, Session] = {}
        self.global_lm_info: dict[str, str] | None = None
        self.shutdown_requested = False
        self.server: Server | None = None  # set by Server
        self._program_counter = 0
        self._reset_counters()
        self.handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": self.ping, "configure_lm": self.configure_lm,
            "create_program": self.create_program, "create_gemini_program": self.create_gemini_program,
            "list_programs": self.list_programs, "delete_program": self.delete_program,
            "get_program_info": self.get_program_info, "get_stats": self.get_stats,
            "cleanup": self.cleanup, "reset_state": self.reset_state,
            "cleanup_session": self.cleanup_session, "restore_session": self.restore_session,
            "shutdown": self.shutdown,
        }
        # Commands that wait on an LM: each runs as its own task, so they overlap.
        self.async_handlers: dict[str, Callable[[dict[str, Any], RequestContext], Any]] = {
            "execute_program": self.execute_program, "execute_gemini_program": self.execute_gemini_program,
        }

    def _reset_counters(self) -> None:
        self.command_counts: dict[str, int] = {}
        self.executions = 0
        self.errors = 0

    # -- request handling (on the event loop's thread)

    def run_sync(self, request_id: int, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """A CPU-only command, run to completion at once."""
        self.command_counts[command] = self.command_counts.get(command, 0) + 1
        try:
            return {"id": request_id, "success": True, "result": self.handlers[command](args)}
        except Exception as exc:
            return self.failure(request_id, command, exc)

    async def run_async(self, request_id: int, command: str, args: dict[str, Any],
                        ctx: "RequestContext") -> dict[str, Any]:
        """An LM-bound command, awaited on the loop (its own asyncio task)."""
        self.command_counts[command] = self.command_counts.get(command, 0) + 1
        try:
            return {"id": request_id, "success": True, "result": await self.async_handlers[command](args, ctx)}
        except asyncio.CancelledError:
            self.errors += 1
            return {"id": request_id, "success": False, "error": "cancelled"}
        except Exception as exc:
            return self.failure(request_id, command, exc)

    def failure(self, request_id: int | None, command: str, exc: BaseException) -> dict[str, Any]:
        self.errors += 1
        if isinstance(exc, CommandError):
            log.debug("%s failed: %s", command, exc)
            return {"id": request_id, "success": False, "error": str(exc)}
        error = f"{type(exc).__name__}: {exc}"  # DSPy/LiteLLM errors: report, keep serving
        log.warning("%s failed: %s", command, error.splitlines()[0] if error else type(exc).__name__,
                    exc_info=log.isEnabledFor(logging.DEBUG))  # tracebacks only at DEBUG
        return {"id": request_id, "success": False, "error": error}

    def _namespace(self, args: dict[str, Any]) -> str:
        if self.mode != "pool-worker":
            return STANDALONE_NAMESPACE
        session_id = args.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            raise CommandError("session_id is required in pool-worker mode")
        return session_id

    def _program(self, args: dict[str, Any]) -> tuple[Session, Program]:
        namespace, program_id = self._namespace(args), args.get("program_id")
        if not isinstance(program_id, str) or not program_id:
            raise CommandError("program_id is required")
        session = self.sessions.get(namespace)
        if session is None or program_id not in session.programs:
            raise CommandError(f"Program not found: {program_id}")
        return session, session.programs[program_id]

    # -- commands

    def ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"status": "ok", "worker_id": self.worker_id, "pid": os.getpid(), "mode": self.mode,
                "dspy_version": dspy.__version__, "timestamp": time.time(), "dspy_available": True,
                "gemini_available": True, "uptime": time.monotonic() - self.started,
                "current_session": args.get("session_id")}

    def configure_lm(self, args: dict[str, Any]) -> dict[str, Any]:
        lm, info = build_lm(args)
        session_id = args.get("session_id")
        if self.mode == "pool-worker" and isinstance(session_id, str) and session_id:
            session = self.sessions.setdefault(session_id, Session())
            session.lm, session.lm_info = lm, info
            scope = "session"
        else:
            dspy.configure(lm=lm)  # main thread only: DSPy ties configure() to one thread
            self.global_lm_info, scope = info, "global"
        # "status" is what DSPex's PythonPoolV2.configure_lm matches on.
        return {"configured": True, "status": "configured", **info, "scope": scope,
                "temperature": args.get("temperature")}

    def create_gemini_program(self, args: dict[str, Any]) -> dict[str, Any]:
        """DSPex's Gemini program: a Predict of the signature; it runs under the
        session's (or the global) LM when one is configured, else under
        ``gemini/<model>`` with GEMINI_API_KEY from the environment."""
        created = self.create_program({**args, "type": "gemini"})
        program = self.sessions[self._namespace(args)].programs[created["program_id"]]
        return {**created, "type": "gemini", "model_name": program.gemini_model}

    def create_program(self, args: dict[str, Any]) -> dict[str, Any]:
        namespace = self._namespace(args)
        session = self.sessions.get(namespace) or Session()
        program_id = args.get("id")
        if program_id is None or program_id == "":
            # Skip ids already taken: a restored session may hold another worker's ids.
            while (program_id := f"program_{self._program_counter + 1}") in session.programs:
                self._program_counter += 1
            self._program_counter += 1
        elif not isinstance(program_id, str):
            raise CommandError("id must be a string")
        elif program_id in session.programs:
            raise CommandError(f"Program already exists: {program_id}")
        spec = {k: v for k, v in args.items() if k != "session_id"}
        program = build_program(spec, program_id)
        session.programs[program_id] = program
        self.sessions[namespace] = session  # only now: a failed create leaves no empty session
        return {"program_id": program_id, "status": "created", "signature": spec.get("signature"),
                "program_type": program.program_type, "created_at": program.created_at}

    async def execute_gemini_program(self, args: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        _, program = self._program(args)
        if program.gemini_model is None:
            raise CommandError(f"Program {program.id} is not a Gemini program")
        result = await self.execute_program(args, ctx)
        outputs = result["outputs"]
        result["raw_response"] = "\n".join(f"{k}: {v}" for k, v in outputs.items())
        return result

    def _execution(self, args: dict[str, Any]) -> tuple[Program, Any, dict[str, Any]]:
        """Validate an execute request (before any await): (program, LM or None for the global one, kwargs)."""
        session, program = self._program(args)
        inputs = args.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise CommandError("inputs must be an object")
        if missing := [n for n in program.input_names if n not in inputs]:
            raise CommandError(f"Missing required inputs for {program.id}: {', '.join(missing)}")
        lm = session.lm
        if lm is None and dspy.settings.lm is None and program.gemini_model is not None:
            if program.gemini_lm is None:
                program.gemini_lm, _ = build_lm({"provider": "gemini", "model": program.gemini_model,
                                                 "api_key": os.environ.get("GEMINI_API_KEY")})
            lm = program.gemini_lm
        if lm is None and dspy.settings.lm is None:
            raise CommandError("No LM is configured: call configure_lm first (globally or for this session)")
        return program, lm, {n: inputs[n] for n in program.input_names}  # extra keys are ignored

    async def execute_program(self, args: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        # The program and LM are taken now: a concurrent delete, cleanup or
        # configure_lm of the same session affects later requests, not this one.
        program, lm, kwargs = self._execution(args)
        stream = args.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise CommandError("stream must be a boolean")
        started = time.perf_counter()
        CURRENT_REQUEST.set(ctx)  # this task's context only
        # dspy.context sets a ContextVar: it holds for this task only, so
        # concurrent requests of different sessions each see their own LM.
        with dspy.context(lm=lm) if lm is not None else contextlib.nullcontext():
            if stream and ctx.server.protocol >= 2 and program.stream_fields:
                prediction = await self._stream(program, kwargs, ctx)
            else:
                prediction = await program.module.acall(**kwargs)
        elapsed_ms = (time.perf_counter() - started) * 1000
        program.executions += 1
        program.last_executed = time.time()
        self.executions += 1
        return {"program_id": program.id, "outputs": to_jsonable(dict(prediction.items())),
                "execution_time_ms": round(elapsed_ms, 3), "execution_time": time.time()}

    @staticmethod
    async def _stream(program: Program, kwargs: dict[str, Any], ctx: RequestContext) -> Any:
        """Run through dspy.streamify over the LM's own streaming: each piece of
        an output field goes out as a chunk event, in order, before the reply."""
        from dspy.streaming import StreamListener, StreamResponse

        listeners = [StreamListener(signature_field_name=name, allow_reuse=True) for name in program.stream_fields]
        streaming = dspy.streamify(program.module, stream_listeners=listeners, async_streaming=True,
                                   include_final_prediction_in_output_stream=True)
        prediction = None
        output = streaming(**kwargs)
        try:
            async for item in output:
                if isinstance(item, StreamResponse):
                    if item.chunk:
                        ctx.event("chunk", field=item.signature_field_name, text=item.chunk)
                elif isinstance(item, dspy.Prediction):
                    prediction = item
        finally:
            await output.aclose()
        if prediction is None:
            raise RuntimeError("the stream ended without a prediction")
        return prediction

    def list_programs(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.mode != "pool-worker":
            session = self.sessions.get(STANDALONE_NAMESPACE) or Session()
            programs = [p.listing(None) for p in session.programs.values()]
        elif isinstance(args.get("session_id"), str) and args["session_id"]:
            session = self.sessions.get(args["session_id"]) or Session()
            programs = [p.listing(args["session_id"]) for p in session.programs.values()]
        else:  # as DSPex's bridge: without a session, every session's programs
            programs = [p.listing(sid) for sid, s in self.sessions.items() for p in s.programs.values()]
        return {"programs": programs, "total_count": len(programs)}

    def delete_program(self, args: dict[str, Any]) -> dict[str, Any]:
        session, program = self._program(args)
        del session.programs[program.id]
        return {"program_id": program.id, "status": "deleted"}

    def get_program_info(self, args: dict[str, Any]) -> dict[str, Any]:
        _, p = self._program(args)
        info = {"program_id": p.id, "program_type": p.program_type, "signature": p.spec.get("signature"),
                "tools": p.spec.get("tools") or [], "spec": p.spec, "created_at": p.created_at,
                "executions": p.executions, "execution_count": p.executions, "last_executed": p.last_executed}
        if self.mode == "pool-worker":
            info["session_id"] = args["session_id"]
        return info

    def get_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        rss = rss_bytes()
        stats: dict[str, Any] = {
            # DSPex's keys first, then this bridge's own
            "programs_count": sum(len(s.programs) for s in self.sessions.values()),
            "command_count": sum(self.command_counts.values()), "error_count": self.errors,
            "uptime": time.monotonic() - self.started,
            "memory_usage": {"rss": rss or 0, "vms": vms_bytes() or 0, "percent": memory_percent(rss)},
            "dspy_available": True, "gemini_available": True,
            "worker_id": self.worker_id, "pid": os.getpid(), "mode": self.mode,
            "dspy_version": dspy.__version__, "uptime_s": round(time.monotonic() - self.started, 3),
            "rss_bytes": rss, "sessions": len(self.sessions),
            "programs": sum(len(s.programs) for s in self.sessions.values()),
            "commands": dict(self.command_counts), "total_commands": sum(self.command_counts.values()),
            "executions": self.executions, "errors": self.errors,
            "lm_configured": dspy.settings.lm is not None, "lm": self.global_lm_info,
            "session_lms": sum(1 for s in self.sessions.values() if s.lm is not None),
        }
        if self.server is not None:
            stats.update(protocol=self.server.protocol, concurrency=self.server.concurrency,
                         in_flight=len(self.server.tasks), max_frame_size=self.server.wire.max_frame)
        session_id = args.get("session_id")
        if self.mode == "pool-worker" and isinstance(session_id, str) and session_id:
            session = self.sessions.get(session_id) or Session()
            stats["session"] = {"session_id": session_id, "programs": len(session.programs),
                                "executions": sum(p.executions for p in session.programs.values()),
                                "lm": session.lm_info}
        return stats

    def cleanup(self, args: dict[str, Any]) -> dict[str, Any]:
        removed = sum(len(s.programs) for s in self.sessions.values())
        for session in self.sessions.values():
            session.programs.clear()
        return {"status": "cleaned", "programs_removed": removed}

    def reset_state(self, args: dict[str, Any]) -> dict[str, Any]:
        programs = sum(len(s.programs) for s in self.sessions.values())
        sessions = len(self.sessions)
        commands, errors = sum(self.command_counts.values()), self.errors
        self.sessions.clear()
        dspy.configure(lm=None)
        self.global_lm_info = None
        self._reset_counters()
        return {"status": "reset", "programs_cleared": programs, "sessions_cleared": sessions,
                "commands_reset": commands, "errors_reset": errors}

    def cleanup_session(self, args: dict[str, Any]) -> dict[str, Any]:
        namespace = self._namespace(args)
        if self.mode != "pool-worker":  # never wipe the one global namespace by accident
            return {"status": "not_applicable", "mode": self.mode, "session_id": args.get("session_id"),
                    "programs_removed": 0}
        session = self.sessions.pop(namespace, None)
        # Idempotent: the pool sends this to every worker when a session ends.
        return {"status": "cleaned" if session else "not_found", "session_id": args.get("session_id"),
                "programs_removed": len(session.programs) if session else 0}

    def restore_session(self, args: dict[str, Any]) -> dict[str, Any]:
        namespace = self._namespace(args)
        specs, lm_cfg = args.get("programs") or [], args.get("lm")
        if not isinstance(specs, list):
            raise CommandError("programs must be a list of program specs")
        # Build everything before touching the session: a bad spec leaves it as it was.
        restored = Session()
        for spec in specs:
            if not isinstance(spec, dict) or not isinstance(spec.get("id"), str) or not spec["id"]:
                raise CommandError("restore_session: every program spec needs a string id")
            if spec["id"] in restored.programs:
                raise CommandError(f"restore_session: duplicate program id {spec['id']}")
            spec = {k: v for k, v in spec.items() if k != "session_id"}
            restored.programs[spec["id"]] = build_program(spec, spec["id"])
        if lm_cfg is not None:
            restored.lm, restored.lm_info = build_lm(lm_cfg)
        if self.mode == "pool-worker":
            self.sessions[namespace] = restored
        else:  # standalone has no session LMs: the LM, if any, becomes the global one
            self.sessions[namespace] = Session(programs=restored.programs)
            if restored.lm is not None:
                dspy.configure(lm=restored.lm)
                self.global_lm_info = restored.lm_info
        return {"session_id": args.get("session_id"), "programs": len(restored.programs),
                "lm_configured": restored.lm is not None}

    def shutdown(self, args: dict[str, Any]) -> dict[str, Any]:
        self.shutdown_requested = True  # the process exits once the reply is written
        return {"status": "shutting_down", "worker_id": self.worker_id, "mode": self.mode,
                "sessions_cleaned": len(self.sessions) if self.mode == "pool-worker" else 0}


def _statm(index: int) -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[index]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def rss_bytes() -> int | None:
    return _statm(1)


def vms_bytes() -> int | None:
    return _statm(0)


def memory_percent(rss: int | None) -> float:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0.0
    return round(100.0 * (rss or 0) / total, 3) if total > 0 else 0.0


# --------------------------------------------------------------------------- protocol

PROTOCOL_VERSION = 2
DEFAULT_CONCURRENCY = 64
DEFAULT_MAX_FRAME = 64 * 1024 * 1024  # the pool's default max_frame_size
FRAME_LIMIT = (1 << 32) - 1  # what a 4-byte length can say
FEATURES = ["cancel", "chunks", "tool_calls"]
SMALL_FRAME = 64 * 1024  # frames up to this size are parsed on the reader thread (to spot pings)
WARM_UP_ROUNDS = 8  # request-path runs before the handshake (CPython specialises after 8 calls)


class Wire:
    """The protocol's two descriptors. Frames are read by one thread; they are
    written by the loop thread and (pings) the reader thread, under one lock."""

    def __init__(self, request_fd: int, response_fd: int, max_frame: int) -> None:
        self.request_fd, self.response_fd = request_fd, response_fd
        self.max_frame = max_frame
        self._write_lock = threading.Lock()

    def send(self, frame: dict[str, Any], final: bool = True) -> bool:
        """Write one frame; False if it had to be replaced or dropped. A final
        frame (the reply) that cannot be encoded or is over max_frame_size
        becomes an error reply for its request; an intermediate one (an
        event) is dropped with a log line."""
        request_id = frame.get("id")
        try:
            body = encode(frame)
            error = None if len(body) <= self.max_frame else \
                f"reply of {len(body)} bytes exceeds max_frame_size {self.max_frame}"
        except (TypeError, ValueError, RecursionError, OverflowError, MemoryError) as exc:
            body, error = b"", f"result could not be encoded as JSON: {type(exc).__name__}: {exc}"
        if error is not None:
            if not final:
                log.warning("request %s: event dropped: %s", request_id, error)
                return False
            log.warning("request %s: %s", request_id, error)
            body = encode({"id": request_id, "success": False, "error": error})
        with self._write_lock:
            try:
                write_frame(self.response_fd, body)
            except (BrokenPipeError, ConnectionResetError):
                os._exit(0)  # the reader of our replies is gone
        return error is None


class RequestContext:
    """What a running request may do besides returning its result."""

    def __init__(self, server: "Server", request_id: int) -> None:
        self.server, self.id = server, request_id
        self._calls = itertools.count(1)
        self._tool_results: dict[int, asyncio.Future[Any]] = {}

    def event(self, kind: str, **payload: Any) -> bool:
        return self.server.wire.send({"id": self.id, "event": kind, **payload}, final=False)

    async def call_tool(self, name: str, args: dict[str, Any]) -> Any:
        """A tool_call event, then the pool's tool_result for it."""
        call_id = next(self._calls)
        future = asyncio.get_running_loop().create_future()
        self._tool_results[call_id] = future
        try:
            if not self.event("tool_call", call_id=call_id, name=name, args=to_jsonable(args)):
                raise RuntimeError(f"the arguments of {name} could not be sent (see the worker's log)")
            frame = await future
        finally:
            self._tool_results.pop(call_id, None)
        if frame.get("ok") is True:
            return frame.get("result")
        raise RuntimeError(str(frame.get("error") or "the tool failed"))

    def tool_result(self, frame: dict[str, Any]) -> None:
        future = self._tool_results.get(frame.get("call_id"))
        if future is not None and not future.done():
            future.set_result(frame)


class Server:
    """Reads requests on a thread, runs them on the asyncio loop of the main thread.

    Protocol 1 (no handshake): one request at a time, in order, as DSPex's
    bridge did. Protocol 2 (the pool's first ping carries ``handshake`` and
    ``protocol: 2``): every LM-bound request is its own task (up to the
    announced concurrency, which the pool enforces), replies leave in any
    order, ``{"id": N, "control": "cancel"}`` cancels request N's task, and a
    ping is answered at once by the reader thread even while the loop is busy.
    CPU-only commands run as plain loop callbacks, never inside a task: DSPy
    allows ``dspy.configure`` only outside tasks (or in the one task that
    called it first), and only on the main thread.
    """

    def __init__(self, bridge: Bridge, wire: Wire, concurrency: int, protocol: int) -> None:
        self.bridge, self.wire = bridge, wire
        bridge.server = self
        self.concurrency, self.max_protocol = concurrency, protocol
        self.protocol = 1  # until a handshake says otherwise
        self.loop: asyncio.AbstractEventLoop | None = None
        self._attach_lock = threading.Lock()
        self._backlog: list[tuple[bytes, Any]] = []  # frames read before the loop runs
        self.tasks: dict[int, asyncio.Task[Any]] = {}
        self.contexts: dict[int, RequestContext] = {}
        self._serial: collections.deque[dict[str, Any]] = collections.deque()  # protocol 1 queue
        self._serial_busy = False
        # Frames handed to the loop, and those of them fully answered: each
        # counter is written by one thread only, so reading both is safe.
        self._submitted = 0
        self._finished = 0

    # -- reader thread

    def start_reader(self) -> None:
        threading.Thread(target=self._read_loop, name="request-reader", daemon=True).start()

    def _read_loop(self) -> None:
        fd = self.wire.request_fd
        try:
            while (header := read_exact(fd, 4)) is not None:
                size = int.from_bytes(header, "big")
                if size > self.wire.max_frame:
                    prefix = read_exact(fd, min(size, 64))
                    if prefix is None or not skip_exact(fd, size - len(prefix)):
                        break
                    self.wire.send({"id": request_id_from_prefix(prefix), "success": False,
                                    "error": f"request of {size} bytes exceeds max_frame_size {self.wire.max_frame}"})
                    continue
                body = read_exact(fd, size)
                if body is None:
                    break
                try:
                    self._received(body)
                except Exception as exc:  # never lose the reader: it is also the stdin-EOF watchdog
                    log.error("request dropped: %s: %s", type(exc).__name__, exc)
                    self.wire.send({"id": request_id_from_prefix(body), "success": False,
                                    "error": f"invalid request: {type(exc).__name__}: {exc}"})
        except OSError as exc:
            log.error("reading requests failed: %s", exc)
        # The VM closed our stdin (or died): nobody can read our answers any
        # more, so end now rather than finish whatever the loop runs.
        os._exit(0)

    def _received(self, body: bytes) -> None:
        request = None
        # A ping is answered here, at once, under protocol 2 (replies may
        # leave in any order) and under protocol 1 when nothing is pending
        # (so the reply order is kept). The handshake goes to the loop.
        if self.loop is not None and (self.protocol >= 2 or self._submitted == self._finished):
            answered, request = self._answer_ping(body, self.wire)
            if answered:
                return
        with self._attach_lock:
            self._submitted += 1  # written by this thread only
            if self.loop is None:
                self._backlog.append((body, request))
                return
        self.loop.call_soon_threadsafe(self._dispatch, body, request)

    def _answer_ping(self, body: bytes, wire: Wire) -> tuple[bool, Any]:
        """Answer `body` on `wire` if it is a plain ping (not a handshake).
        Returns whether it did, and the request if `body` was small enough to parse."""
        if len(body) > SMALL_FRAME:
            return False, None
        try:
            request = decode(body)
        except ValueError:
            return False, None  # the loop answers it as unparseable
        if isinstance(request, dict) and request.get("command") == "ping" and self._valid_id(request):
            args = request.get("args", {})
            args = {} if args is None else args
            if isinstance(args, dict) and not args.get("handshake"):
                wire.send({"id": request["id"], "success": True, "result": self._ping_result(args)})
                return True, request
        return False, request

    def warm_up(self, rounds: int = WARM_UP_ROUNDS) -> None:
        """Run the reader's ping path `rounds` times over a private pipe; `main` does this
        before the handshake is answered.

        Otherwise a fresh worker's first request pays for being the first in this process
        to run that path: in a worker forked from the fork server, each page of the shared
        import that a reference count or an allocation on it writes is copied then (some 80
        page faults on a bare fork; a real worker's handshake already takes most of them),
        and each function on it runs unspecialised (CPython specialises after 8 calls).
        Paid here, it is part of start-up: about 0.5 ms, before the worker is ready.
        """
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:
            log.warning("request path not warmed up: %s", exc)
            return
        wire = Wire(read_fd, write_fd, self.wire.max_frame)
        try:
            for request_id in range(1, rounds + 1):
                write_frame(write_fd, encode({"id": request_id, "command": "ping", "args": {}}))
                body = read_exact(read_fd, int.from_bytes(read_exact(read_fd, 4), "big"))
                if not self._answer_ping(body, wire)[0]:
                    raise RuntimeError(f"warm-up ping {request_id} was not answered")
                decode(read_exact(read_fd, int.from_bytes(read_exact(read_fd, 4), "big")))
        finally:
            os.close(read_fd)
            os.close(write_fd)

    # -- loop thread

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # DSPy's async LM path hops to threads (asyncio.to_thread) for cache
        # and pricing work: size the default pool for the requests in flight.
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            max_workers=max(8, min(self.concurrency, 64)), thread_name_prefix="dspy"))
        with self._attach_lock:
            self.loop = loop
            for body, request in self._backlog:
                loop.call_soon(self._dispatch, body, request)
            self._backlog.clear()
        await loop.create_future()  # forever: the process ends through os._exit

    @staticmethod
    def _valid_id(request: dict[str, Any]) -> bool:
        rid = request.get("id")
        return isinstance(rid, int) and not isinstance(rid, bool)

    def _ping_result(self, args: dict[str, Any]) -> dict[str, Any]:
        result = self.bridge.ping(args)
        result["in_flight"] = len(self.tasks)
        if self.protocol >= 2:
            result.update(protocol=self.protocol, concurrency=self.concurrency, features=FEATURES)
        return result

    def _dispatch(self, body: bytes, request: Any) -> None:
        """One frame from the reader; counted finished once it is answered (or needs no answer)."""
        if not self._handle(body, request):
            self._finished += 1

    def _handle(self, body: bytes, request: Any) -> bool:
        """True if the frame became a task or a queued request, which count themselves finished."""
        if request is None:
            try:
                request = decode(body)
            except (ValueError, RecursionError) as exc:
                self.bridge.errors += 1
                self.wire.send({"id": request_id_from_prefix(body), "success": False,
                                "error": f"invalid request: body is not JSON ({exc})"})
                return False
        if not isinstance(request, dict) or not self._valid_id(request):
            self.bridge.errors += 1
            self.wire.send({"id": request_id_from_prefix(body), "success": False,
                            "error": "invalid request: expected an object with an integer id"})
            return False
        if "control" in request:
            self._control(request)
            return False
        rid, command, args = request["id"], request.get("command"), request.get("args", {})
        if args is None:
            args = {}
        if not isinstance(command, str) or not isinstance(args, dict):
            self.bridge.errors += 1
            self.wire.send({"id": rid, "success": False,
                            "error": "invalid request: command must be a string and args an object"})
            return False
        if command == "ping" and args.get("handshake"):
            self._handshake(args)
        if self.protocol >= 2:
            return self._start(rid, command, args)
        self._serial.append({"id": rid, "command": command, "args": args})
        self._pump()
        return True

    def _handshake(self, args: dict[str, Any]) -> None:
        wanted = args.get("protocol")
        if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted >= 2 and self.max_protocol >= 2:
            self.protocol = PROTOCOL_VERSION
        size = args.get("max_frame_size")
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            self.wire.max_frame = min(size, FRAME_LIMIT)

    def _start(self, rid: int, command: str, args: dict[str, Any]) -> bool:
        """Protocol 2: run now; an LM-bound command becomes a task (True)."""
        if command not in self.bridge.async_handlers:
            self._reply_sync(rid, command, args)
            return False
        if rid in self.tasks:
            self.bridge.errors += 1
            self.wire.send({"id": rid, "success": False, "error": f"request id {rid} is already in flight"})
            return False
        self._spawn(rid, command, args)
        return True

    def _spawn(self, rid: int, command: str, args: dict[str, Any]) -> asyncio.Task[Any]:
        ctx = RequestContext(self, rid)
        task = self.loop.create_task(self._run_task(rid, command, args, ctx))
        self.tasks[rid], self.contexts[rid] = task, ctx
        return task

    async def _run_task(self, rid: int, command: str, args: dict[str, Any], ctx: RequestContext) -> None:
        try:
            reply = await self.bridge.run_async(rid, command, args, ctx)
        finally:
            self.tasks.pop(rid, None)
            self.contexts.pop(rid, None)
        self.wire.send(reply)
        self._finished += 1

    def _reply_sync(self, rid: int, command: str, args: dict[str, Any]) -> None:
        if command == "ping":
            self.bridge.command_counts["ping"] = self.bridge.command_counts.get("ping", 0) + 1
            reply = {"id": rid, "success": True, "result": self._ping_result(args)}
        elif command in self.bridge.handlers:
            reply = self.bridge.run_sync(rid, command, args)
        else:
            reply = self.bridge.failure(rid, command, CommandError(f"Unknown command: {command}"))
        self.wire.send(reply)
        if self.bridge.shutdown_requested:
            logging.shutdown()
            os._exit(0)  # skip interpreter teardown: library threads must not keep us alive

    def _pump(self) -> None:
        """Protocol 1: one request at a time, replies in request order."""
        while self._serial and not self._serial_busy:
            request = self._serial.popleft()
            rid, command, args = request["id"], request["command"], request["args"]
            if command not in self.bridge.async_handlers:
                self._reply_sync(rid, command, args)
                self._finished += 1
                continue
            self._serial_busy = True
            self._spawn(rid, command, args).add_done_callback(self._serial_done)

    def _serial_done(self, _task: asyncio.Task[Any]) -> None:
        self._serial_busy = False
        self._pump()

    def _control(self, frame: dict[str, Any]) -> None:
        kind, rid = frame.get("control"), frame["id"]
        if kind == "cancel":
            task = self.tasks.get(rid)
            if task is not None:  # an unknown or finished id is ignored
                task.cancel()
        elif kind == "tool_result":
            ctx = self.contexts.get(rid)
            if ctx is not None:
                ctx.tool_result(frame)
        else:
            log.warning("unknown control frame %r for request %s ignored", kind, rid)


# --------------------------------------------------------------------------- main

def _positive_int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SystemExit(f"{name} must be a positive integer, got: {value!r}") from None
    if number <= 0:
        raise SystemExit(f"{name} must be a positive integer, got: {value!r}")
    return number


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DSPy worker for dspex_native_pool")
    parser.add_argument("--mode", choices=["standalone", "pool-worker"], default="standalone")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--concurrency", default=os.environ.get("DSPY_BRIDGE_CONCURRENCY", str(DEFAULT_CONCURRENCY)),
                        help="requests in flight at once under protocol 2 (env DSPY_BRIDGE_CONCURRENCY; default 64)")
    parser.add_argument("--protocol", choices=["1", "2"], default=os.environ.get("DSPY_BRIDGE_PROTOCOL", "2"),
                        help="highest protocol to accept in the handshake (env DSPY_BRIDGE_PROTOCOL; default 2)")
    parser.add_argument("--max-frame-size",
                        default=os.environ.get("DSPY_BRIDGE_MAX_FRAME_SIZE", str(DEFAULT_MAX_FRAME)),
                        help="largest frame read or written until the handshake says otherwise "
                             "(env DSPY_BRIDGE_MAX_FRAME_SIZE; default 64 MiB)")
    opts = parser.parse_args(argv)
    concurrency = _positive_int("--concurrency", opts.concurrency)
    max_frame = min(_positive_int("--max-frame-size", opts.max_frame_size), FRAME_LIMIT)

    started = time.monotonic()
    request_fd, response_fd = claim_stdio()
    level = os.environ.get("DSPY_BRIDGE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s",
                        level=level if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "INFO")
    logging.captureWarnings(True)  # warnings become "WARNING py.warnings: ..." lines
    if opts.mode == "pool-worker":
        # Ctrl-C in the VM's terminal reaches our process group too; the pool
        # ends workers through stdin EOF, shutdown or SIGTERM instead.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    wire = Wire(request_fd, response_fd, max_frame)
    bridge = Bridge(opts.mode, opts.worker_id, started)
    server = Server(bridge, wire, concurrency, int(opts.protocol))
    server.start_reader()  # before the import: EOF during it still ends us; frames wait for the loop

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
    os.environ.setdefault("DSPY_CACHEDIR", os.path.join(tempfile.gettempdir(), f"dspex_dspy_cache_{os.getuid()}"))
    global dspy
    import dspy

    # DSPy logs through its own dated handler; route it through ours so every
    # stderr line starts with its level, which the pool maps to Logger levels.
    dspy_logger = logging.getLogger("dspy")
    for handler in list(dspy_logger.handlers):
        dspy_logger.removeHandler(handler)
    dspy_logger.propagate = True
    for noisy in ("LiteLLM", "httpx"):  # one INFO line per LM call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # DSPy keeps every call in histories (global, per LM, per module) and in a
    # global trace, up to 10,000 entries each, with the full prompts and inputs;
    # the trace even keeps deleted programs alive. A worker never reads them
    # (no optimizers here), so they would only grow its memory for hours.
    # This also makes the main thread DSPy's config owner.
    dspy.configure(disable_history=True, max_trace_size=0)

    warm_started = time.monotonic()
    server.warm_up()
    log.info("worker %s ready (mode %s, dspy %s, pid %d, %.2fs, request path warmed in %.2f ms)",
             opts.worker_id or "-", opts.mode, dspy.__version__, os.getpid(), time.monotonic() - started,
             (time.monotonic() - warm_started) * 1000)
    asyncio.run(server.run())


if __name__ == "__main__":
    main()
