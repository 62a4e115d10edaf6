"""What pipeline/infer/server.py admits and for how long: Limits (the flags bounding a request and
the load), fit_prompt (a prompt and its max_tokens checked against the context, refusing one far too
long by its length in characters before it is tokenized), Slots (the bounded queue in front of the
generation slots, which refuses beyond --max_queue so the server can answer 503) and Watch (the
stopping criterion that ends a generation whose client has disconnected or whose --request_timeout
has passed).
"""

from __future__ import annotations

import dataclasses
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import BatchEncoding, StoppingCriteria

from pipeline.errors import UserError
from pipeline.infer.chat_model import ChatModel, Sampling
from pipeline.infer.protocol import ApiError, ChatRequest

if TYPE_CHECKING:
    from pipeline.infer.server import ChatServer


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server and how many it holds at once (the flags of the same
    names)."""

    max_context: int | None = (
        None  # prompt tokens + max_tokens may not exceed it; None: the model config's
    )
    max_request_bytes: int = 8 << 20
    max_tokens_cap: int = 4096
    parallel: int = 1
    max_queue: int = 8
    request_timeout: float = 300.0

    def __post_init__(self):
        for name, low in (
            ("max_context", 2),
            ("max_request_bytes", 1),
            ("max_tokens_cap", 1),
            ("parallel", 1),
            ("max_queue", 0),
        ):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise UserError(f"--{name} must be at least {low}, got {getattr(self, name)}.")
        if not self.request_timeout > 0:
            raise UserError(
                "--request_timeout must be a positive number of seconds, "
                f"got {self.request_timeout}."
            )


def longest_token(tokenizer) -> int:
    """Characters of the vocabulary's longest token string. A token covers at most that many
    characters of text (byte-level tokens spell one character per byte, SentencePiece ones one per
    character), so a text longer than n times this is sure to be over n tokens without tokenizing
    it. (A tokenizer whose normalizer drops text, e.g. collapses whitespace, would break this; chat
    models' tokenizers do not.)"""
    return max(len(token) for token in tokenizer.get_vocab())


def fit_prompt(
    chat: ChatModel, request: ChatRequest, context: int, token_chars: int, text: str | None = None
) -> tuple[BatchEncoding, Sampling]:
    """The encoded prompt (`text`, already rendered, or the messages rendered here) and the sampling
    to answer it with, or a 400 when prompt and answer cannot share the context. A request that left
    max_tokens to the server gets at most what the context has left."""
    answer = request.sampling.max_new_tokens if request.max_tokens_asked else 1
    room = context - answer
    if room < 1:
        raise ApiError(
            400,
            f"max_tokens is {answer}, which leaves no room for a prompt in this model's context of "
            f"{context} tokens; lower max_tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    text = chat.render(request.messages) if text is None else text
    if len(text) > room * token_chars:  # obviously too long: refused without tokenizing
        less = f", less max_tokens {answer}" if request.max_tokens_asked else ""
        raise ApiError(
            400,
            f"the prompt is {len(text)} characters, too long for the {room} tokens it may have "
            f"(this model's context is {context} tokens{less}); shorten the messages.",
            "messages",
            "context_length_exceeded",
        )
    batch = chat.tokenize([text])
    n = batch["input_ids"].shape[1]
    if n > room:
        if request.max_tokens_asked:
            raise ApiError(
                400,
                f"the prompt is {n} tokens and max_tokens is {answer}, {n + answer} in all, more "
                f"than this model's context of {context} tokens; shorten the messages or lower "
                "max_tokens.",
                "messages",
                "context_length_exceeded",
            )
        raise ApiError(
            400,
            f"the prompt is {n} tokens, which leaves no room for an answer in this model's context "
            f"of {context} tokens; shorten the messages.",
            "messages",
            "context_length_exceeded",
        )
    sampling = request.sampling
    if not request.max_tokens_asked and n + sampling.max_new_tokens > context:
        sampling = dataclasses.replace(sampling, max_new_tokens=context - n)
    return batch, sampling


def model_context(chat: ChatModel) -> int:
    context = getattr(chat.model.config, "max_position_embeddings", None)
    if not isinstance(context, int):
        raise UserError(
            "the model's config has no max_position_embeddings; "
            "pass --max_context (its context in tokens)."
        )
    return context


def client_gone(connection: socket.socket) -> bool:
    """Whether the client has closed its connection. Its request is read whole by then, so the
    socket turning readable means end of file (or a reset): nothing else is expected from an
    HTTP/1.0 client that waits."""
    poller = select.poll()  # poll, not select: no limit on the descriptor's number
    poller.register(connection, select.POLLIN)
    try:
        if not poller.poll(0):
            return False
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Slots:
    """Queueing, not batching: `parallel` generations run at once and up to `max_queue` requests
    wait for a slot in arrival order; `enter` refuses beyond that, so the wait (and the memory)
    stays bounded."""

    def __init__(self, parallel: int, max_queue: int):
        self.parallel, self.max_queue = parallel, max_queue
        self.free = parallel
        self.waiting: deque[threading.Event] = deque()
        self.lock = threading.Lock()

    def enter(self) -> threading.Event | None:
        """A ticket, set once it holds a slot; None when the queue is full."""
        ticket = threading.Event()
        with self.lock:
            if self.free and not self.waiting:
                self.free -= 1
                ticket.set()
            elif len(self.waiting) < self.max_queue:
                self.waiting.append(ticket)
            else:
                return None
        return ticket

    def leave(self, ticket: threading.Event) -> None:
        """Give up a place in the queue, or hand the slot held to the first one waiting."""
        with self.lock:
            if (
                ticket in self.waiting
            ):  # still waiting (a ticket is taken off the queue when it is handed a slot)
                self.waiting.remove(ticket)
            elif self.waiting:
                self.waiting.popleft().set()
            else:
                self.free += 1

    def load(self) -> tuple[int, int]:
        with self.lock:
            return self.parallel - self.free, len(self.waiting)


class Watch(StoppingCriteria):
    """Ends a generation whose client has gone or whose time is up (checked after every token);
    `reason` says which. It also counts the tokens generated, which GET /health reports."""

    def __init__(self, server: ChatServer, connection: socket.socket, deadline: float):
        self.server, self.connection, self.deadline = server, connection, deadline
        self.reason: str | None = None  # "gone" or "timeout"

    def check(self) -> str | None:
        if self.reason is None:
            if time.monotonic() > self.deadline:
                self.reason = "timeout"
            elif client_gone(self.connection):
                self.reason = "gone"
        return self.reason

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        self.server.count_tokens(input_ids.shape[0])
        return torch.full(
            (input_ids.shape[0],),
            self.check() is not None,
            dtype=torch.bool,
            device=input_ids.device,
        )
