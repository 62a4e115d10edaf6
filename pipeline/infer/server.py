"""OpenAI-compatible HTTP server for a trained folder (full model or adapter), on the standard library only.

    python -m pipeline.serve --model outputs/sft-merged [--host 127.0.0.1 --port 8000 --served_model_name NAME]

GET /v1/models lists the one model; POST /v1/chat/completions takes messages, max_tokens (or
max_completion_tokens), temperature, top_p, stream and stream_options.include_usage, and answers like
OpenAI's API (server-sent events when streaming). One generation runs at a time. Loading, prompt
rendering and generation are pipeline/chat.py's. Any OpenAI client works:

    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(model=NAME, messages=...)
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.errors import UserError, run_cli
from pipeline.infer.chat_model import ChatModel, Completion, Sampling, add_model_arguments, check_messages, load_chat_model

logger = logging.getLogger("pipeline.serve")

UNSUPPORTED = {"tools": "tool calls are not served", "stop": "the model stops on its own end-of-turn tokens"}


class ApiError(Exception):
    """A request the server refuses, sent back as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class ChatRequest:
    messages: list[dict]
    sampling: Sampling
    stream: bool
    include_usage: bool


def _field(body: dict, name: str, types: tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join({int: "an integer", float: "a number", bool: "true or false", dict: "an object"}[t] for t in types)
        raise ApiError(400, f"{name} must be {wanted}, got {json.dumps(value)}.", name)
    return value


def parse_request(raw: bytes, served_name: str, defaults: Sampling) -> ChatRequest:
    """Validate a /v1/chat/completions body; anything wrong is an ApiError naming the field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}).") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    if body.get("model") not in (None, served_name):
        raise ApiError(404, f"model {body['model']!r} does not exist; this server serves {served_name!r}.", "model",
                       "model_not_found")
    if _field(body, "n", (int,), 1) != 1:
        raise ApiError(400, "n must be 1: one choice per request.", "n")
    for name, why in UNSUPPORTED.items():
        if body.get(name):
            raise ApiError(400, f"{name} is not supported: {why}.", name)
    try:
        messages = check_messages(body.get("messages"))
    except ValueError as e:
        raise ApiError(400, f"{e}.", "messages") from e
    max_tokens = _field(body, "max_completion_tokens", (int,), _field(body, "max_tokens", (int,), defaults.max_new_tokens))
    try:
        sampling = Sampling(max_tokens, float(_field(body, "temperature", (int, float), defaults.temperature)),
                            float(_field(body, "top_p", (int, float), defaults.top_p)))
    except UserError as e:
        raise ApiError(400, str(e)) from e
    options = _field(body, "stream_options", (dict,), {})
    return ChatRequest(messages, sampling, _field(body, "stream", (bool,), False),
                       bool(_field(options, "include_usage", (bool,), False)))


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], chat: ChatModel, served_name: str, defaults: Sampling):
        super().__init__(address, Handler)
        self.chat, self.served_name, self.defaults = chat, served_name, defaults
        self.lock = threading.Lock()  # one generation at a time: the model is not shared between requests
        self.created = int(time.time())


class Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, format: str, *args) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: ApiError) -> None:
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        self._send_json(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}})

    def _event(self, payload: dict | str) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        self.wfile.write(f"data: {text}\n\n".encode())
        self.wfile.flush()

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            raise ApiError(400, f"Content-Length {length!r} is not a byte count.")
        return self.rfile.read(int(length))

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            return self._send_error(ApiError(404, f"no route GET {self.path}; this server has GET /v1/models."))
        card = {"id": self.server.served_name, "object": "model", "created": self.server.created, "owned_by": "llm-pipeline"}
        self._send_json(200, {"object": "list", "data": [card]})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send_error(ApiError(404, f"no route POST {self.path}; this server has POST /v1/chat/completions."))
        try:
            request = parse_request(self._body(), self.server.served_name, self.server.defaults)
            self.server.chat.render(request.messages)  # a template that rejects them fails here, before any event
        except ApiError as e:
            return self._send_error(e)
        except UserError as e:
            return self._send_error(ApiError(400, str(e), "messages"))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.server.served_name}
        try:
            with self.server.lock:
                (self._stream if request.stream else self._complete)(request, head)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("%s went away during the answer; generation stopped", self.address_string())
        except Exception as e:  # logged in full; the client gets a 500 unless a stream has already begun
            logger.exception("generation failed")
            if not request.stream:
                self._send_error(ApiError(500, f"generation failed ({type(e).__name__}: {e})."))

    def _complete(self, request: ChatRequest, head: dict) -> None:
        c = self.server.chat.generate([request.messages], request.sampling)[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                  "finish_reason": c.finish_reason}
        self._send_json(200, {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(c)})

    def _stream(self, request: ChatRequest, head: dict) -> None:
        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # the stream ends when the connection closes
        self._event(chunk({"role": "assistant", "content": ""}))
        c = self.server.chat.stream(request.messages, request.sampling, lambda text: self._event(chunk({"content": text})))
        self._event(chunk({}, c.finish_reason))
        if request.include_usage:
            self._event({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(c)})
        self._event("[DONE]")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a trained folder over an OpenAI-compatible HTTP API.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--served_model_name", default=None, help="the model id clients send; default: --model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    defaults = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    name = args.served_model_name or args.model
    chat = load_chat_model(args.model, args.template_name, args.trust_remote_code)
    try:
        server = ChatServer((args.host, args.port), chat, name, defaults)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port.") from e
    host, port = server.server_address[:2]
    print(f"serving {args.model} as {name!r} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    run_cli(main)
