#!/usr/bin/env python3
"""An OpenAI-compatible chat-completions server that answers any DSPy signature, offline.

    python lm_server.py --port 0 --latency 0.5 --jitter 0.1 [--chunk-delay 0.02] [--host 127.0.0.1]

Prints the port it listens on as the first line of stdout, then serves until
killed (or until stdin reaches EOF with ``--exit-on-stdin-eof``, for a parent
that starts it as a port). Standard library only.

DSPy's ChatAdapter (3.4.1) names the output fields in its prompts: the system
message lists ``Your output fields are: 1. `answer` (str): ...`` and the last
user message ends with ``Respond with the corresponding output fields, starting
with the field `[[ ## answer ## ]]` ...``. The server answers every requested
field in that format (or as one JSON object when the JSONAdapter asks for
one, or ``response_format`` is set), each value typed as the prompt says, so
``dspy.Predict``, ``dspy.ChainOfThought`` and ``dspy.ReAct`` (which it ends
with ``finish`` at once) all parse its answers. An answer is
``"<field>: answer to <first input>"``; with ``"stream": true`` it is sent as
server-sent events, a few characters per chunk, ``--chunk-delay`` apart.

Each request waits ``latency +- jitter`` seconds (uniform) before its answer,
without blocking the others: hundreds of concurrent connections are served by
one asyncio loop. ``GET /v1/stats`` reports the requests served and the peak
of concurrent requests.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import random
import re
import sys
import threading
import time
from typing import Any

_OUTPUT_SECTION = re.compile(r"Your output fields are:\n(.*?)(?:\n\s*All interactions will be structured|\Z)", re.S)
_OUTPUT_FIELD = re.compile(r"^\s*\d+\. `(\w+)` \((.*?)\)(?::|$)", re.M)
_RESPOND_CHAT = re.compile(r"Respond with the corresponding output fields, starting with the field (.*)", re.S)
_RESPOND_JSON = re.compile(r"Respond with a JSON object in the following order of fields: (.*)", re.S)
_MARKER = re.compile(r"`(?:\[\[ ## )?(\w+)(?: ## \]\])?`")
_INPUT_VALUE = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond with |\Z)", re.S)

MAX_BODY = 64 * 1024 * 1024


def _text(content: Any) -> str:
    """A message's content: a string, or OpenAI's list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def requested_fields(messages: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], bool]:
    """[(field, type)] the prompt asks for, and whether it wants JSON."""
    system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
    last_user = users[-1] if users else ""
    types: dict[str, str] = {}
    if section := _OUTPUT_SECTION.search(system):
        types = dict(_OUTPUT_FIELD.findall(section.group(1)))
    wants_json = False
    names: list[str] = []
    if match := _RESPOND_CHAT.search(last_user):
        names = [n for n in _MARKER.findall(match.group(1)) if n != "completed"]
    elif match := _RESPOND_JSON.search(last_user):
        names, wants_json = _MARKER.findall(match.group(1)), True
    if not names:
        names = list(types)
    return [(n, types.get(n, "str")) for n in dict.fromkeys(names)], wants_json


def first_input(messages: list[dict[str, Any]]) -> str:
    users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
    found = _INPUT_VALUE.findall(users[-1]) if users else []
    if found:
        return found[0][1].strip()[:100]
    if users:  # the JSON adapter, or a plain prompt
        return users[-1].strip().splitlines()[0][:100] if users[-1].strip() else ""
    return ""


def answer_value(name: str, type_name: str, seed: str) -> Any:
    """A value of the field's type (as a JSON value)."""
    text = f"{name}: answer to {seed}" if seed else f"{name}: answer"
    t = type_name.replace(" ", "")
    if t.startswith("Literal["):
        try:
            options = ast.literal_eval("(" + t[len("Literal["):-1] + ",)")
        except (ValueError, SyntaxError):
            return text
        return "finish" if "finish" in options else options[0]  # ReAct: end the loop at once
    if t.startswith("dict"):
        return {}
    if t.startswith("list"):
        return [text]
    if t == "int":
        return 0
    if t == "float":
        return 0.0
    if t == "bool":
        return True
    return text


def completion_text(messages: list[dict[str, Any]], json_mode: bool) -> str:
    fields, wants_json = requested_fields(messages)
    seed = first_input(messages)
    if not fields:
        return f"answer to {seed}" if seed else "ok"
    if wants_json or json_mode:
        return json.dumps({n: answer_value(n, t, seed) for n, t in fields}, ensure_ascii=False)
    parts = []
    for name, type_name in fields:
        value = answer_value(name, type_name, seed)
        parts.append(f"[[ ## {name} ## ]]\n{value if isinstance(value, str) else json.dumps(value)}")
    parts.append("[[ ## completed ## ]]")
    return "\n\n".join(parts)


class LMServer:
    def __init__(self, latency: float, jitter: float, chunk_delay: float, chunk_size: int) -> None:
        self.latency, self.jitter = latency, jitter
        self.chunk_delay, self.chunk_size = chunk_delay, chunk_size
        self.served = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.connections = 0

    def delay(self) -> float:
        return max(0.0, self.latency + random.uniform(-self.jitter, self.jitter))

    # -- HTTP

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    return
                method, path, headers, body = request
                keep_alive = headers.get("connection", "").lower() != "close"
                await self._route(method, path.split("?", 1)[0], body, writer)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            self.connections -= 1
            try:
                writer.close()
            except Exception:
                pass

    async def _read_request(self, reader: asyncio.StreamReader):
        line = await reader.readline()
        if not line:
            return None
        try:
            method, path, _ = line.decode("latin-1").split(" ", 2)
        except ValueError:
            return None
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    break
                if len(body) + size > MAX_BODY:
                    return None
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            return method, path, headers, bytes(body)
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY:
            return None
        return method, path, headers, await reader.readexactly(length) if length else b""

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: str, body: bytes,
                    content_type: str = "application/json") -> None:
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
        writer.write(head.encode() + body)
        await writer.drain()

    async def _route(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if method == "GET" and path.rstrip("/").endswith("/models"):
            await self._send(writer, "200 OK", json.dumps(
                {"object": "list", "data": [{"id": "test", "object": "model", "owned_by": "lm_server"}]}).encode())
        elif method == "GET" and path.rstrip("/").endswith("/stats"):
            await self._send(writer, "200 OK", json.dumps(
                {"served": self.served, "in_flight": self.in_flight, "peak_in_flight": self.peak_in_flight,
                 "connections": self.connections}).encode())
        elif method == "POST" and path.rstrip("/").endswith("/chat/completions"):
            try:
                request = json.loads(body)
                messages = request["messages"]
                assert isinstance(messages, list)
            except (ValueError, KeyError, TypeError, AssertionError):
                await self._send(writer, "400 Bad Request", json.dumps(
                    {"error": {"message": "expected a JSON body with messages", "type": "invalid_request_error"}}
                ).encode())
                return
            await self._chat(request, writer)
        else:
            await self._send(writer, "404 Not Found", json.dumps(
                {"error": {"message": f"no route for {method} {path}", "type": "invalid_request_error"}}).encode())

    async def _chat(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            fmt = request.get("response_format")
            json_mode = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
            text = completion_text(request["messages"], json_mode)
            model = str(request.get("model") or "test")
            created = int(time.time())
            cid = f"chatcmpl-{random.getrandbits(64):016x}"
            prompt_tokens = sum(len(_text(m.get("content")).split()) for m in request["messages"])
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                     "total_tokens": prompt_tokens + len(text.split())}
            await asyncio.sleep(self.delay())
            if request.get("stream"):
                await self._stream(writer, text, cid, model, created, usage, request)
            else:
                n = request.get("n") if isinstance(request.get("n"), int) and request["n"] > 0 else 1
                choices = [{"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop", "logprobs": None} for i in range(n)]
                await self._send(writer, "200 OK", json.dumps(
                    {"id": cid, "object": "chat.completion", "created": created, "model": model,
                     "choices": choices, "usage": usage}, ensure_ascii=False).encode())
            self.served += 1
        finally:
            self.in_flight -= 1

    async def _stream(self, writer, text, cid, model, created, usage, request) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")

        async def event(payload: Any) -> None:
            data = f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
            raw = data.encode()
            writer.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            await writer.drain()

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        await event(chunk({"role": "assistant", "content": ""}, None))
        for start in range(0, len(text), self.chunk_size):
            if start:
                await asyncio.sleep(self.chunk_delay)
            await event(chunk({"content": text[start:start + self.chunk_size]}, None))
        await event(chunk({}, "stop"))
        options = request.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [], "usage": usage})
        await event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def serve(opts: argparse.Namespace) -> None:
    server_state = LMServer(opts.latency, opts.jitter, opts.chunk_delay, opts.chunk_size)
    server = await asyncio.start_server(server_state.handle, opts.host, opts.port, backlog=4096,
                                        limit=MAX_BODY)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    if opts.exit_on_stdin_eof:
        def watch() -> None:
            while os.read(0, 65536):
                pass
            os._exit(0)
        threading.Thread(target=watch, daemon=True).start()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible LM server for DSPy tests, demos and benches")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on stdout)")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds before each answer")
    parser.add_argument("--jitter", type=float, default=0.0, help="latency varies uniformly by +- this")
    parser.add_argument("--chunk-delay", type=float, default=0.02, help="seconds between streamed chunks")
    parser.add_argument("--chunk-size", type=int, default=8, help="characters per streamed chunk")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="exit when stdin closes")
    opts = parser.parse_args(argv)
    if opts.latency < 0 or opts.jitter < 0 or opts.chunk_delay < 0 or opts.chunk_size < 1:
        parser.error("latency, jitter and chunk-delay must be >= 0, chunk-size >= 1")
    try:
        asyncio.run(serve(opts))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
