"""OpenAI-compatible HTTP server for a trained folder (full model or adapter), on the standard
library only.

    python -m pipeline.serve --model outputs/sft-merged \
        [--host 127.0.0.1 --port 8000 --served_model_name NAME]

GET /v1/models lists the one model; POST /v1/chat/completions takes messages, max_tokens (or
max_completion_tokens), temperature, top_p, stream and stream_options.include_usage, and tools with
tool_choice "auto" or "none" (tool calls and results in the history too), and answers like OpenAI's
API (server-sent events when streaming; an answer that is calls as the template writes them comes
back as tool_calls, streamed as delta.tool_calls once the answer ends); GET /health reports the
load. Rendering tools and reading calls back is pipeline/infer/tool_calls.py's. This module is the
HTTP handler and the entry point; parsing a request body and OpenAI's error and usage objects are
pipeline/infer/protocol.py's, the limits, the queue, timeouts and disconnect detection
pipeline/infer/admission.py's, loading, prompt rendering and generation
pipeline/infer/chat_model.py's. Any OpenAI client works:

    OpenAI(base_url="http://127.0.0.1:8000/v1",
           api_key="unused").chat.completions.create(model=NAME, messages=...)

The server protects itself and its other clients (each limit is a flag, see --help):
- a body over --max_request_bytes gets a 413 from its Content-Length alone, before any of it is
  read;
- max_tokens over --max_tokens_cap, or a prompt that does not fit the context (--max_context) beside
  max_tokens, gets a 400 naming the counts; a prompt far too long is refused by its length in
  characters, before it is tokenized, so it costs milliseconds;
- requests are queued, not batched: --parallel generations run at once, up to --max_queue more wait
  in arrival order, and any beyond that get a 503 with Retry-After;
- a request gets --request_timeout seconds from its arrival (waiting included): past them the
  generation stops and the answer is a 504 or, once a stream has begun, an error event;
- a client that goes away (closes its connection) stops its generation, streamed or not, and its
  place.
All the work before a request takes its place (reading, parsing, tokenizing) runs on its own thread,
so a huge or bad request never holds up the generation in progress.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from transformers import BatchEncoding

from pipeline.command_line import command_parser
from pipeline.errors import UserError, first_line, run_cli
from pipeline.infer.admission import Limits, Slots, Watch, fit_prompt, longest_token, model_context
from pipeline.infer.chat_model import (
    ChatModel,
    Sampling,
    add_model_arguments,
    load_chat_model_from_args,
)
from pipeline.infer.protocol import ApiError, ChatRequest, error_body, parse_request, usage
from pipeline.infer.tool_calls import CallStream, ChatTools, TokenTap, openai_calls

logger = logging.getLogger("pipeline.serve")

GONE = (
    BrokenPipeError,
    ConnectionResetError,
    TimeoutError,
)  # a client that closed, or stalled past Handler.timeout


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = (
        128  # the listen backlog: a burst of connections is answered (503 at worst), not dropped
    )

    def __init__(
        self,
        address: tuple[str, int],
        chat: ChatModel,
        served_name: str,
        defaults: Sampling,
        limits: Limits | None = None,
    ):
        self.chat, self.served_name, self.defaults = chat, served_name, defaults
        self.limits = limits or Limits()
        self.context = self.limits.max_context or model_context(chat)
        self.token_chars = longest_token(chat.tokenizer)
        self.tools = ChatTools(chat)
        super().__init__(address, Handler)
        self.slots = Slots(self.limits.parallel, self.limits.max_queue)
        self.created = int(time.time())
        self.generated_tokens = 0
        self.seconds_per_request = 1.0  # a running mean of the time a slot is held, for Retry-After
        self.stats_lock = threading.Lock()

    def count_tokens(self, n: int) -> None:
        with self.stats_lock:
            self.generated_tokens += n

    def held_slot(self, seconds: float) -> None:
        with self.stats_lock:
            self.seconds_per_request = 0.8 * self.seconds_per_request + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead, at the recent time per request."""
        ahead = (self.limits.parallel + self.limits.max_queue) / self.limits.parallel
        return max(1, math.ceil(self.seconds_per_request * ahead))


class Handler(BaseHTTPRequestHandler):
    server: ChatServer
    responded = False  # a status line has been sent for the request in hand
    streaming = False  # and it began a stream of server-sent events
    # seconds a socket read or write may stall:
    # idle or stalled clients do not hold a thread for ever
    timeout = 60

    def log_message(self, format: str, *args) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode(
            "utf-8", "backslashreplace"
        )  # a lone surrogate: \\udXXX
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: ApiError, headers: dict | None = None) -> None:
        self._send_json(e.status, error_body(e), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (a malformed request line, an unknown method) as
        OpenAI's error."""
        self.close_connection = True
        if code == 501:
            message = (
                f"this server does not answer {self.command} requests; "
                "it has GET /v1/models and POST /v1/chat/completions"
            )
        self._send_error(ApiError(code, f"{message or self.responses.get(code, ('error',))[0]}."))

    def _event(self, payload: dict | str) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        self.wfile.write(f"data: {text}\n\n".encode("utf-8", "backslashreplace"))
        self.wfile.flush()

    def _body(self) -> bytes:
        """The body, refused from its headers alone when it is too large or of unknown length."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(
                411, "send the body with a Content-Length header; chunked bodies are not accepted."
            )
        length = (self.headers.get("Content-Length") or "0").strip()
        if not (
            length.isascii() and length.isdigit()
        ):  # isdigit alone takes "²" and other digits int() refuses
            raise ApiError(400, f"Content-Length {length[:40]!r} is not a byte count.")
        limit = self.server.limits.max_request_bytes
        if (
            len(length) > 18 or int(length) > limit
        ):  # 18 digits: beyond any body, and int() never sees 5,000
            length = length if len(length) <= 40 else f"a {len(length)}-digit number of"
            self.close_connection = True
            raise ApiError(
                413, f"the request body is {length} bytes, more than this server accepts ({limit})."
            )
        try:
            return self.rfile.read(int(length))
        except TimeoutError as e:
            self.close_connection = True
            raise ApiError(408, f"the request body stopped arriving for {self.timeout} s.") from e

    def _discard_body(self, seconds: float = 2.0) -> None:
        """After a 413, read and drop what the client still sends, for a moment: a client that
        writes its whole body before it reads then gets the 413 instead of a reset connection."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            end = time.monotonic() + seconds
            buffer = bytearray(1 << 16)
            while (left := end - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv_into(buffer):
                    break
        except OSError:
            pass

    def send_response(self, code: int, message: str | None = None) -> None:
        self.responded = True  # from here on an error can no longer be a status of its own
        super().send_response(code, message)

    def _answer(self, handle: Callable[[], None]) -> None:
        """Handle one request; whatever goes wrong is answered (a 500 with OpenAI's error object, or
        an error event once a stream has begun) and logged, never a connection dropped without a
        word."""
        self.responded = self.streaming = False
        try:
            handle()
        except GONE:
            self.close_connection = True
            logger.info("%s went away", self.address_string())
        except Exception as e:
            logger.exception("%s %s failed", self.command, self.path)
            self.close_connection = True
            error = ApiError(
                500, f"the server failed on this request ({type(e).__name__}: {first_line(e)})."
            )
            with contextlib.suppress(OSError):  # the client may be gone as well
                if not self.responded:
                    self._send_error(error)
                elif self.streaming:
                    self._event(error_body(error))

    def do_GET(self) -> None:
        self._answer(self._get)

    def _get(self) -> None:
        path = self.path.rstrip("/")
        if path == "/health":
            running, waiting = self.server.slots.load()
            return self._send_json(
                200,
                {
                    "status": "ok",
                    "running": running,
                    "waiting": waiting,
                    "generated_tokens": self.server.generated_tokens,
                },
            )
        if path != "/v1/models":
            return self._send_error(
                ApiError(
                    404, f"no route GET {self.path}; this server has GET /v1/models and /health."
                )
            )
        card = {
            "id": self.server.served_name,
            "object": "model",
            "created": self.server.created,
            "owned_by": "llm-pipeline",
        }
        self._send_json(200, {"object": "list", "data": [card]})

    def do_POST(self) -> None:
        self._answer(lambda: self._post(time.monotonic() + self.server.limits.request_timeout))

    def _post(self, deadline: float) -> None:
        """Refusals first, on this request's own thread and before it queues; then its turn, and the
        answer."""
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send_error(
                ApiError(
                    404, f"no route POST {self.path}; this server has POST /v1/chat/completions."
                )
            )
        server = self.server
        try:
            request = parse_request(
                self._body(), server.served_name, server.defaults, server.limits.max_tokens_cap
            )
            batch, sampling = fit_prompt(
                server.chat, request, server.context, server.token_chars, self._prompt(request)
            )
        except ApiError as e:
            self._send_error(e)
            return self._discard_body() if e.status == 413 else None
        except UserError as e:  # the template rejects the messages
            return self._send_error(ApiError(400, str(e), "messages"))
        ticket = server.slots.enter()
        if ticket is None:
            running, waiting = server.slots.load()
            logger.warning("queue full (%d running, %d waiting): 503", running, waiting)
            seconds = server.retry_after()
            return self._send_error(
                ApiError(
                    503,
                    f"the server is busy ({running} generating, {waiting} waiting, its queue's "
                    f"limit); retry in {seconds} seconds.",
                    code="server_busy",
                ),
                {"Retry-After": str(seconds)},
            )
        watch = Watch(server, self.connection, deadline)
        try:
            if self._wait_for_slot(ticket, watch):
                started = time.monotonic()
                head = {
                    "id": f"chatcmpl-{uuid.uuid4().hex}",
                    "created": int(time.time()),
                    "model": server.served_name,
                }
                (self._stream if request.stream else self._complete)(
                    request, batch, sampling, watch, head
                )
                server.held_slot(time.monotonic() - started)
        except GONE:
            watch.reason = "gone"
        except Exception as e:
            # logged in full; the client gets a 500, or an error event once its stream has begun
            logger.exception("generation failed")
            error = ApiError(500, f"generation failed ({type(e).__name__}: {first_line(e)}).")
            if self.streaming:
                self._event(error_body(error))
            elif not self.responded:
                self._send_error(error)
        finally:
            server.slots.leave(ticket)
        if watch.reason == "gone":
            logger.info("%s went away; its generation stopped", self.address_string())

    def _prompt(self, request: ChatRequest) -> str | None:
        """The prompt of a request with tools or tool history, rendered as training renders them
        (None: the plain messages, rendered by the chat model)."""
        if not (request.tools or request.tool_history):
            return None
        tools = self.server.tools
        offered = request.tools if request.tool_choice == "auto" else None
        if offered and not tools.writes_tools(request.messages, offered):
            raise ApiError(
                400,
                "this model's chat template does not write tool definitions, so the model cannot "
                'be offered tools; send the request without tools (or tool_choice "none").',
                "tools",
            )
        return tools.render(request.messages, offered)

    def _wait_for_slot(self, ticket: threading.Event, watch: Watch) -> bool:
        """Wait in the queue while the client is there and its time lasts; False when it is not to
        be answered."""
        while not ticket.wait(0.05):
            if watch.check() == "gone":
                return False
            if watch.reason == "timeout":
                self._send_error(self._timeout_error("waiting for a free generation slot"))
                return False
        return True

    def _timeout_error(self, doing: str) -> ApiError:
        return ApiError(
            504,
            f"the request ran out of this server's {self.server.limits.request_timeout:g} s "
            f"time limit while {doing}; ask for fewer max_tokens or retry later.",
            code="timeout",
        )

    def _complete(
        self,
        request: ChatRequest,
        batch: BatchEncoding,
        sampling: Sampling,
        watch: Watch,
        head: dict,
    ) -> None:
        tools = self.server.tools
        tap = TokenTap(self.server.chat.tokenizer, tools.stop_ids) if request.tool_names else None
        c = self.server.chat.answer(
            batch, sampling, stopping_criteria=[watch], **({"streamer": tap} if tap else {})
        )[0]
        if watch.reason == "timeout":
            return self._send_error(self._timeout_error("generating"))
        if watch.reason is None:
            message, finish = (
                tools.message(tap.text(), request.tool_names, c.finish_reason, _call_id)
                if tap
                else ({"role": "assistant", "content": c.text}, c.finish_reason)
            )
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            self._send_json(
                200, {**head, "object": "chat.completion", "choices": [choice], "usage": usage(c)}
            )

    def _stream(
        self,
        request: ChatRequest,
        batch: BatchEncoding,
        sampling: Sampling,
        watch: Watch,
        head: dict,
    ) -> None:
        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        self.streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # the stream ends when the connection closes
        self._event(chunk({"role": "assistant", "content": ""}))
        if request.tool_names:
            c, finish = self._stream_calls(request, batch, sampling, watch, chunk)
        else:
            c = self.server.chat.stream(
                batch, sampling, lambda text: self._event(chunk({"content": text})), [watch]
            )
            finish = c.finish_reason
        if (
            watch.reason == "timeout"
        ):  # the status line is long gone: the stream ends on an error event instead
            self._event(error_body(self._timeout_error("generating")))
        elif watch.reason is None:
            self._event(chunk({}, finish))
            if request.include_usage:
                self._event(
                    {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(c)}
                )
        if watch.reason != "gone":
            self._event("[DONE]")

    def _stream_calls(
        self,
        request: ChatRequest,
        batch: BatchEncoding,
        sampling: Sampling,
        watch: Watch,
        chunk: Callable[..., dict],
    ):
        """Stream an answer that may be tool calls: text that may be the start of a call is held
        until the answer ends, then sent as delta.tool_calls (or, when it is no call, as content).
        Returns the completion and its finish_reason."""
        tools = self.server.tools
        held = CallStream(tools.format, request.tool_names)

        def on_text(text: str) -> None:
            piece = tools.visible(held.ready(text))
            if piece:
                self._event(chunk({"content": piece}))

        tap = TokenTap(self.server.chat.tokenizer, tools.stop_ids, on_text)
        c = self.server.chat.answer(batch, sampling, stopping_criteria=[watch], streamer=tap)[0]
        if watch.reason is not None:
            return c, c.finish_reason
        text = tap.text()
        found = tools.calls(text, request.tool_names, c.finish_reason)
        rest = tools.visible(text[held.sent : len(found[0]) if found else len(text)])
        if rest.strip() if found else rest:
            self._event(chunk({"content": rest}))
        for i, call in enumerate(openai_calls(found[1], _call_id) if found else []):
            self._event(chunk({"tool_calls": [{"index": i, **call}]}))
        return c, "tool_calls" if found else c.finish_reason


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(
        description="Serve a trained folder over an OpenAI-compatible HTTP API.",
        epilog="Requests are queued, not batched: --parallel generations run at once, up to "
        "--max_queue more wait in arrival order, and the next gets a 503 with a Retry-After "
        "header. A request past --request_timeout (counted from its arrival, waiting included) "
        "stops generating and gets a 504, or an error event if its stream has begun. A client that "
        "disconnects stops its generation. A request without max_tokens gets --max_new_tokens, or "
        "what the context leaves if less. Every error is OpenAI's JSON error object.",
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=8000, help="0 picks a free port (printed at start)"
    )
    parser.add_argument(
        "--served_model_name", default=None, help="the model id clients send; default: --model"
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max_request_bytes",
        type=int,
        default=Limits.max_request_bytes,
        help="larger request bodies get a 413, refused from their Content-Length before they are "
        "read (default: %(default)s, 8 MiB)",
    )
    limits.add_argument(
        "--max_context",
        type=int,
        default=None,
        help="tokens of prompt plus max_tokens a request may have, over which it gets a 400 "
        "(default: the model config's max_position_embeddings)",
    )
    limits.add_argument(
        "--max_tokens_cap",
        type=int,
        default=Limits.max_tokens_cap,
        help="the largest max_tokens a request may ask for; above it, a 400 (default: %(default)s)",
    )
    limits.add_argument(
        "--parallel",
        type=int,
        default=Limits.parallel,
        help="generations at once, each on its own thread over the one model "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--max_queue",
        type=int,
        default=Limits.max_queue,
        help="requests that may wait for a generation slot; one more gets a 503 "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--request_timeout",
        type=float,
        default=Limits.request_timeout,
        help="seconds a request may take, waiting included; then a 504 or a stream's error event "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    defaults = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    limits = Limits(
        args.max_context,
        args.max_request_bytes,
        args.max_tokens_cap,
        args.parallel,
        args.max_queue,
        args.request_timeout,
    )
    if defaults.max_new_tokens > limits.max_tokens_cap:
        raise UserError(
            f"--max_new_tokens {defaults.max_new_tokens} is above "
            f"--max_tokens_cap {limits.max_tokens_cap}; lower it or raise the cap."
        )
    name = args.served_model_name or args.model
    chat = load_chat_model_from_args(args)
    try:
        server = ChatServer((args.host, args.port), chat, name, defaults, limits)
    except OSError as e:
        raise UserError(
            f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port."
        ) from e
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
