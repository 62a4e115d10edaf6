"""pipeline.serve: the official openai client against the server on localhost gets the trained
model's greedy answers (plain and streamed), the model list, and clear 400/404 errors; requests at
once are served in turn. The server's limits, on the untrained tiny model (whose greedy answers run
to max_tokens): a 413 from the headers alone, 400s naming the prompt's tokens and the context, the
max_tokens cap, a 503 with Retry-After when the queue is full, a 504 (or a stream's error event)
past the time limit, and a client that goes away stops its generation, as GET /health's token
counter shows."""

import contextlib
import functools
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import openai
import pytest
from transformers import AutoTokenizer

from pipeline.data.templates import render
from pipeline.eval.evaluate import greedy_answers
from pipeline.tools import synthetic
from tests.helpers import REPO

NAME = "tiny-sft"
HELDOUT = synthetic.split_items()[1]


@contextlib.contextmanager
def serve(model, log_dir, *flags: str):
    """`python -m pipeline.serve` on a free loopback port; yields its base URL
    (http://127.0.0.1:PORT/v1)."""
    log = (log_dir / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.serve",
            "--model",
            str(model),
            "--port",
            "0",
            "--served_model_name",
            NAME,
            *flags,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        line = (
            proc.stdout.readline()
        )  # "serving ... on http://127.0.0.1:PORT/v1 ..." once it listens
        assert "http://" in line, f"server did not start: {open(log.name).read()[-3000:]}"
        yield line.split(" on ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def base_url(sft_model, tmp_path_factory):
    with serve(sft_model, tmp_path_factory.mktemp("serve"), "--max_new_tokens", "16") as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def ask(item: str, lang: str = "en") -> list[dict]:
    return [{"role": "user", "content": synthetic.question(item, lang)}]


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_is_the_greedy_answer(client, sft_model):
    messages = ask(HELDOUT[1])
    response = client.chat.completions.create(model=NAME, messages=messages)
    choice = response.choices[0]
    assert (
        choice.message.content
        == greedy_answers(str(sft_model), [messages])[0]
        == synthetic.answer(HELDOUT[1])
    )
    assert (
        choice.message.role == "assistant"
        and choice.finish_reason == "stop"
        and response.object == "chat.completion"
    )
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    answer = tokenizer(choice.message.content, add_special_tokens=False).input_ids
    assert response.usage.prompt_tokens == len(prompt)
    assert (
        response.usage.completion_tokens == len(answer) + 1
    )  # the answer and the <|im_end|> that ends it
    assert response.usage.total_tokens == len(prompt) + len(answer) + 1
    short = client.chat.completions.create(model=NAME, messages=messages, max_tokens=1)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1


def test_streaming_sends_the_same_answer_in_chunks(client, sft_model):
    messages = [{"role": "system", "content": "Answer with one word."}] + ask(HELDOUT[2], "zh")
    plain = client.chat.completions.create(model=NAME, messages=messages).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len(
        {c.id for c in chunks}
    ) == 1
    with_choice = [c for c in chunks if c.choices]
    assert with_choice[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choice)
    assert (
        text
        == plain
        == greedy_answers(str(sft_model), [messages])[0]
        == synthetic.answer(HELDOUT[2], "zh")
    )
    assert [c.choices[0].finish_reason for c in with_choice][-1] == "stop"
    assert chunks[-1].usage.completion_tokens >= 2 and not chunks[-1].choices


def test_sampling_and_requests_at_once(client):
    items = HELDOUT[3:7]
    with ThreadPoolExecutor(len(items)) as pool:
        answers = list(
            pool.map(
                lambda i: (
                    client.chat.completions.create(model=NAME, messages=ask(i))
                    .choices[0]
                    .message.content
                ),
                items,
            )
        )
    assert answers == [synthetic.answer(i) for i in items]
    # sampling honours the token budget: the trained model's answer starts with a colour word, never
    # with its end of turn, so one token is always cut off by the length limit
    sampled = client.chat.completions.create(
        model=NAME, messages=ask(items[0]), temperature=1.0, top_p=0.9, max_tokens=1
    )
    assert sampled.choices[0].finish_reason == "length" and sampled.usage.completion_tokens == 1


def test_bad_requests_get_clear_errors(client, base_url):
    with pytest.raises(openai.BadRequestError, match="must be a non-empty list"):
        client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.BadRequestError, match="last message must be from the user"):
        client.chat.completions.create(
            model=NAME, messages=ask(HELDOUT[0]) + [{"role": "assistant", "content": "red"}]
        )
    with pytest.raises(openai.BadRequestError, match="temperature must be between 0 and 2"):
        client.chat.completions.create(model=NAME, messages=ask(HELDOUT[0]), temperature=2.5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=ask(HELDOUT[0]))
    request = urllib.request.Request(
        f"{base_url}/chat/completions", data=b'{"messages": [', method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert (
        e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    )


# -------------------------------------------------------------- limits, on the untrained tiny model

CONTEXT, CAP = (
    4096,
    4000,
)  # the tiny model's rotary positions run past its config's 1024 (--max_context overrides it)
LONG = {
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": CAP,
}  # greedy: CAP tokens, seconds of work


@pytest.fixture(scope="module")
def tiny_url(tiny_model, tmp_path_factory):
    with serve(
        tiny_model,
        tmp_path_factory.mktemp("serve-limits"),
        "--template_name",
        "qwen",
        "--max_new_tokens",
        "16",
        "--max_context",
        str(CONTEXT),
        "--max_tokens_cap",
        str(CAP),
        "--max_request_bytes",
        "1000000",
        "--max_queue",
        "1",
        "--request_timeout",
        "120",
    ) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_client(tiny_url):
    return openai.OpenAI(base_url=tiny_url, api_key="unused", max_retries=0, timeout=120)


def health(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as response:
        return json.loads(response.read())


def until(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def send(url: str, body: dict) -> socket.socket:
    """POST /v1/chat/completions on a raw connection left open, for the test to read or to drop."""
    data = json.dumps(body).encode()
    sock = connect(url)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    raw = b""
    while chunk := sock.recv(1 << 16):  # the server closes the connection after each answer
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@functools.cache
def tokenizer_of(model):
    return AutoTokenizer.from_pretrained(model)


def prompt_tokens(tiny_model, text: str) -> int:
    tokenizer = tokenizer_of(tiny_model)
    prompt = render("qwen", [{"role": "user", "content": text}], add_generation_prompt=True)
    return len(tokenizer(prompt, add_special_tokens=False).input_ids)


def test_oversize_body_gets_413_before_it_is_read(tiny_url, tiny_client):
    with connect(
        tiny_url
    ) as sock:  # only the headers are sent: a server waiting for the gigabyte would never answer
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            b"Content-Length: 1000000000\r\n\r\n{"
        )
        status, body = read_response(sock)
    assert (
        status == 413
        and body["error"]["message"]
        == "the request body is 1000000000 bytes, more than this server accepts (1000000)."
    )
    # a client that writes all its body before it reads gets the 413 too, not a reset connection
    with pytest.raises(openai.APIStatusError, match="more than this server accepts") as e:
        tiny_client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "x" * 2_000_000}]
        )
    assert e.value.status_code == 413


def test_prompt_that_does_not_fit_gets_400_naming_its_tokens(tiny_url, tiny_client, tiny_model):
    text = "word " * 2100
    n = prompt_tokens(tiny_model, text)
    assert n > CONTEXT
    with pytest.raises(openai.BadRequestError) as e:
        tiny_client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": text}], max_tokens=16
        )
    assert e.value.code == "context_length_exceeded" and e.value.body["message"] == (
        f"the prompt is {n} tokens and max_tokens is 16, {n + 16} in all, more than this model's "
        f"context of {CONTEXT} tokens; shorten the messages or lower max_tokens."
    )
    with pytest.raises(
        openai.BadRequestError,
        match=f"the prompt is {n} tokens, which leaves no room for an answer in "
        f"this model's context of {CONTEXT} tokens",
    ):
        tiny_client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": text}]
        )
    # far too long: refused by its length in characters, before it is tokenized
    with pytest.raises(
        openai.BadRequestError,
        match=f"characters, too long for the {CONTEXT - 1} tokens it may have",
    ):
        tiny_client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "x" * 300_000}]
        )
    # a prompt that fits, with max_tokens left to the server: the answer gets what the context has
    # left
    fits = next(
        t
        for t in ("word " * k for k in range(2010, 2040))
        if CONTEXT - 16 < prompt_tokens(tiny_model, t) < CONTEXT
    )
    n = prompt_tokens(tiny_model, fits)
    answer = tiny_client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": fits}]
    )
    assert answer.usage.prompt_tokens == n and answer.usage.completion_tokens == CONTEXT - n < 16
    assert answer.choices[0].finish_reason == "length"


def test_max_tokens_over_the_cap_gets_400(tiny_client):
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(
            openai.BadRequestError,
            match=f"max_tokens is {CAP + 1}, more than this server's limit of {CAP} "
            "tokens per answer",
        ):
            tiny_client.chat.completions.create(
                model=NAME, messages=LONG["messages"], **{field: CAP + 1}
            )


def test_refusals_are_openai_error_objects(tiny_url):
    with connect(tiny_url) as sock:
        sock.sendall(b"PUT /v1/chat/completions HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock) == (
            501,
            {
                "error": {
                    "message": "this server does not answer PUT requests; it has GET /v1/models "
                    "and POST /v1/chat/completions.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
        )
    with connect(tiny_url) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        status, body = read_response(sock)
        assert status == 411 and body["error"]["message"].startswith(
            "send the body with a Content-Length header"
        )


def test_full_queue_gets_503_and_clients_that_go_away_free_their_places(tiny_url, tiny_client):
    start = health(tiny_url)["generated_tokens"]
    running = send(tiny_url, LONG)  # takes the one generation slot, for seconds
    assert until(lambda: health(tiny_url)["generated_tokens"] > start)
    waiting = send(tiny_url, LONG)  # takes the one place in the queue
    assert until(lambda: health(tiny_url)["waiting"] == 1)
    with pytest.raises(openai.InternalServerError, match="the server is busy") as e:
        tiny_client.chat.completions.create(model=NAME, **LONG)
    assert e.value.status_code == 503 and int(e.value.response.headers["Retry-After"]) >= 1
    waiting.close()
    assert until(lambda: health(tiny_url)["waiting"] == 0, 5)
    running.close()  # a non-streamed request: nothing is written to it until its answer is done
    assert until(lambda: health(tiny_url)["running"] == 0, 5)
    stopped = health(tiny_url)["generated_tokens"]
    time.sleep(0.5)
    assert (
        health(tiny_url)["generated_tokens"] == stopped < start + CAP
    )  # cut short, and nothing after
    assert (
        tiny_client.chat.completions.create(
            model=NAME, messages=LONG["messages"], max_tokens=2
        ).usage.completion_tokens
        == 2
    )


def test_a_stream_whose_client_goes_away_stops(tiny_url, tiny_client):
    start = health(tiny_url)["generated_tokens"]
    stream = tiny_client.chat.completions.create(model=NAME, stream=True, **LONG)
    chunks = iter(stream)
    assert (
        next(chunks).choices[0].delta.role == "assistant" and next(chunks).choices[0].delta.content
    )
    stream.close()
    assert until(lambda: health(tiny_url)["running"] == 0, 5)
    stopped = health(tiny_url)["generated_tokens"]
    time.sleep(0.5)
    assert health(tiny_url)["generated_tokens"] == stopped < start + CAP


def test_past_the_time_limit_a_request_gets_504_and_a_stream_an_error_event(tiny_model, tmp_path):
    with serve(
        tiny_model,
        tmp_path,
        "--template_name",
        "qwen",
        "--max_context",
        str(CONTEXT),
        "--max_tokens_cap",
        str(CAP),
        "--request_timeout",
        "1",
    ) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        began = time.monotonic()
        with pytest.raises(
            openai.InternalServerError,
            match="ran out of this server's 1 s time limit while generating",
        ) as e:
            client.chat.completions.create(model=NAME, **LONG)
        assert (
            e.value.status_code == 504
            and e.value.code == "timeout"
            and 1 <= time.monotonic() - began < 10
        )
        start = health(url)
        assert start["running"] == 0
        stream = client.chat.completions.create(model=NAME, stream=True, **LONG)
        with pytest.raises(openai.APIError, match="time limit while generating"):
            for _ in stream:
                pass
        stopped = health(url)["generated_tokens"]
        time.sleep(0.3)
        assert (
            health(url)["running"] == 0
            and health(url)["generated_tokens"] == stopped < start["generated_tokens"] + CAP
        )
