"""A local, scriptable server speaking the OpenAI chat-completions protocol, for tests.

    with OpenAIStub(responder=lambda req: "positive") as stub:
        stub.push(("status", 500), ("ok", "negative"))   # the next two answers
        client = ChatClient(Endpoint(stub.url, "stub-model"))
        ...
        assert stub.requests[0].body["model"] == "stub-model"

`stub.url` is the base URL to configure (`http://127.0.0.1:<port>/v1`); the server
answers `POST /v1/chat/completions` and `GET /v1/models`, and 404s any other path
(so a base URL missing `/v1` fails like a real server).

Each chat request takes the next scripted action from the queue (`push`), or, when
the queue is empty, asks the `responder` (request JSON -> content string, or an
action tuple). Actions:

    ("ok", content)                   200 with a chat completion whose message is `content`
    ("logprobs", {token: logprob})    200 with a one-token completion (the most likely
                                      token) and those as its top_logprobs
    ("status", code[, headers[, body]])  that status; body default: an OpenAI error JSON
    ("sleep", seconds[, content])     wait, then answer `content` (default: the responder);
                                      makes client timeouts happen
    ("garbage", raw_bytes)            200 with `raw_bytes` as the body (e.g. not JSON)
    ("json", obj)                     200 with `obj` as JSON (e.g. a body lacking choices)
    ("drop",)                         close the connection without answering

Every request (chat, models, unknown paths) is recorded in `stub.requests` before it
is answered. `stop()` (or leaving the `with` block) wakes any sleeping handler and
joins every thread, so nothing lingers after a test.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

Action = tuple[Any, ...]
Responder = Callable[[Any], "str | Action"]


@dataclass
class RecordedRequest:
    """One request as the stub received it."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names lowercased."""
    body: Any
    """The parsed JSON body; None when empty or not JSON (see `raw`)."""
    raw: bytes


def completion(content: str, model: str = "stub-model") -> dict[str, Any]:
    """A chat-completion response body in the OpenAI schema."""
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def logprob_completion(top: dict[str, float], model: str = "stub-model") -> dict[str, Any]:
    """A one-token chat completion carrying `top` as the token's top_logprobs, in the
    OpenAI schema (vLLM and llama.cpp's server answer the same way)."""
    best = max(top, key=top.__getitem__)
    body = completion(best, model)
    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top.items()]
    first = {"token": best, "logprob": top[best], "bytes": list(best.encode()),
             "top_logprobs": entries}  # fmt: skip
    body["choices"][0]["logprobs"] = {"content": [first]}
    body["choices"][0]["finish_reason"] = "length"
    return body


def error_body(code: int, message: str = "") -> dict[str, Any]:
    """An error response body in the OpenAI schema."""
    return {
        "error": {
            "message": message or f"stub error {code}",
            "type": "stub_error",
            "code": code,
        }
    }


class _Server(ThreadingHTTPServer):
    # Non-daemon handler threads, joined by server_close(): no thread outlives stop().
    daemon_threads = False
    block_on_close = True
    stub: OpenAIStub

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up makes the late answer fail with a
        # broken pipe; that is the scenario under test, not a stub bug.
        pass


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no handler thread waits on an idle
    # keep-alive connection and shutdown never blocks on a client.
    protocol_version = "HTTP/1.0"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        stub = self.server.stub
        stub._record(self, b"")
        if self.path.rstrip("/") == stub.prefix + "/models":
            self._send_json(
                200, {"object": "list", "data": [{"id": stub.model, "object": "model"}]}
            )
        else:
            self._send_json(404, error_body(404, f"no route {self.path}"))

    def do_POST(self) -> None:
        stub = self.server.stub
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = stub._record(self, raw)
        if self.path != stub.prefix + "/chat/completions":
            self._send_json(404, error_body(404, f"no route {self.path}"))
            return
        self._act(stub._next_action(body), body)

    def _act(self, action: Action, body: Any) -> None:
        stub = self.server.stub
        kind = action[0]
        if kind == "ok":
            self._send_json(200, completion(str(action[1]), stub.model))
        elif kind == "logprobs":
            self._send_json(200, logprob_completion(dict(action[1]), stub.model))
        elif kind == "status":
            code = int(action[1])
            headers = action[2] if len(action) > 2 else {}
            payload = action[3] if len(action) > 3 else error_body(code)
            self._send_json(code, payload, headers)
        elif kind == "sleep":
            # An Event rather than time.sleep, so stop() cuts the sleep short.
            if stub._stopping.wait(float(action[1])):
                return
            follow = ("ok", action[2]) if len(action) > 2 else stub._respond(body)
            self._act(follow, body)
        elif kind == "garbage":
            self._send_raw(200, bytes(action[1]), "application/json")
        elif kind == "json":
            self._send_json(200, action[1])
        elif kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            raise ValueError(f"unknown stub action {action!r}")

    def _send_json(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self._send_raw(code, data, "application/json", headers)

    def _send_raw(
        self, code: int, data: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class OpenAIStub:
    """A chat-completions server on 127.0.0.1 (a free port) in a background thread."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        model: str = "stub-model",
        prefix: str = "/v1",
    ) -> None:
        self.responder: Responder = responder or (lambda body: "stub answer")
        self.model = model
        self.prefix = prefix.rstrip("/")
        self.requests: list[RecordedRequest] = []
        self._queue: collections.deque[Action] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> OpenAIStub:
        self._stopping.clear()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.stub = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and join every thread."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()  # joins handler threads (block_on_close)
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------

    @property
    def origin(self) -> str:
        """`http://127.0.0.1:<port>`, without the API prefix."""
        if self._server is None:
            raise RuntimeError("the stub is not running; use `with OpenAIStub() as stub:`")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def url(self) -> str:
        """The base URL a client should be configured with (`<origin>/v1`)."""
        return self.origin + self.prefix

    # -- scripting and inspection ----------------------------------------------------

    def push(self, *actions: Action) -> None:
        """Queue actions for the next chat requests, in order."""
        with self._lock:
            self._queue.extend(actions)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The recorded POSTs to the chat-completions path."""
        path = self.prefix + "/chat/completions"
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path == path]

    def _record(self, handler: BaseHTTPRequestHandler, raw: bytes) -> Any:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rec = RecordedRequest(
            method=handler.command,
            path=handler.path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            raw=raw,
        )
        with self._lock:
            self.requests.append(rec)
        return body

    def _next_action(self, body: Any) -> Action:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        return self._respond(body)

    def _respond(self, body: Any) -> Action:
        result = self.responder(body)
        return ("ok", result) if isinstance(result, str) else result


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
