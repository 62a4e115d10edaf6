"""pipeline.serve answers bad bytes: a lone UTF-16 surrogate (escaped, or as bytes), a body nested
100,000 deep, a 5,000-digit integer (anywhere), a number past float's range, a Content-Length that
is not a plain byte count: each gets an HTTP status with OpenAI's error object, sent as raw bytes
over http.client to the real server on loopback (the tiny model), never a connection closed without
an answer; the server keeps serving and logs no traceback. Any other failure while handling a
request is a 500 with the same error object."""

import http.client
import json
import threading
from urllib.parse import urlsplit

import pytest

from pipeline.infer.admission import Limits
from pipeline.infer.chat_model import Sampling, load_chat_model
from pipeline.infer.server import ChatServer
from tests.test_serve import NAME, serve

HI = '[{"role": "user", "content": "hi"}]'


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """(host, port, log file) of `python -m pipeline.serve` on the tiny model."""
    log_dir = tmp_path_factory.mktemp("serve-bad-bytes")
    with serve(tiny_model, log_dir, "--template_name", "qwen", "--max_new_tokens", "2") as url:
        parts = urlsplit(url)
        yield parts.hostname, parts.port, log_dir / "server.log"


def post(server, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """POST raw bytes; the status and the JSON body (http.client raises RemoteDisconnected when
    there is none)."""
    host, port, _ = server
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.putrequest("POST", "/v1/chat/completions")
        for name, value in {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            **(headers or {}),
        }.items():
            connection.putheader(name, value.encode("latin-1"))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def refusal(status: int, payload: dict) -> str:
    """The message of an OpenAI error object (the shape of every refusal), checked whole."""
    assert set(payload) == {"error"} and set(payload["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }, payload
    assert payload["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return payload["error"]["message"]


@pytest.mark.parametrize(
    "body, says",
    [
        (
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "the request body holds a lone UTF-16 surrogate escape (half of a character) "
            "in a string (line 1 column 44)",
        ),
        (
            b'{"model": "tiny-sft\\udfff", "messages": ' + HI.encode() + b"}",
            "a lone UTF-16 surrogate escape",
        ),
        (
            b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "the request body holds objects and lists nested more than 100 deep "
            "(line 1 column 113); flatten",
        ),
        (
            b'{"messages": ' + HI.encode() + b', "max_tokens": ' + b"9" * 5000 + b"}",
            "the request body holds an integer of 5000 digits, more than the 4300 Python reads",
        ),
        (
            b'{"messages": ' + HI.encode() + b', "metadata": {"n": [-' + b"1" * 5000 + b"]}}",
            "an integer of 5000 digits",
        ),
        (
            b'{"messages": ' + HI.encode() + b', "temperature": 1' + b"0" * 400 + b"}",
            "temperature must be a number in its range, got an integer of 401 digits.",
        ),
        (
            b'{"messages": ' + HI.encode() + b', "top_p": -1' + b"0" * 400 + b"}",
            "top_p must be a number in its range",
        ),
        (
            # a surrogate encoded as if UTF-8 could
            b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
            "the request body is not valid JSON "
            "('utf-8' codec can't decode byte 0xed in position 43",
        ),
    ],
    ids=[
        "surrogate in content",
        "surrogate in model",
        "nested 100,000 deep",
        "5,000-digit max_tokens",
        "5,000-digit integer elsewhere",
        "temperature past float",
        "top_p past float",
        "surrogate as bytes",
    ],
)
def test_bad_bytes_in_the_body_get_a_400_error_object(server, body, says):
    status, payload = post(server, body)
    assert status == 400 and says in refusal(status, payload)


def test_a_content_length_that_is_not_a_plain_byte_count_gets_an_answer(server):
    status, payload = post(
        server, b"{}", {"Content-Length": "\u00b2"}
    )  # a digit to str.isdigit, not to int()
    assert (
        status == 400 and refusal(status, payload) == "Content-Length '\u00b2' is not a byte count."
    )
    status, payload = post(
        server, b"{}", {"Content-Length": "9" * 5000}
    )  # more digits than int() converts
    assert status == 413 and refusal(status, payload).startswith(
        "the request body is a 5000-digit number of bytes"
    )


def test_after_the_bad_bytes_the_server_still_answers_and_logged_no_traceback(server):
    post(server, b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    status, payload = post(server, b'{"messages": ' + HI.encode() + b', "max_tokens": 2}')
    assert status == 200 and payload["usage"]["completion_tokens"] == 2
    assert "Traceback" not in server[2].read_text()


def test_an_unexpected_failure_while_handling_a_request_is_a_500_error_object(
    tiny_model, monkeypatch
):
    chat = load_chat_model(str(tiny_model), "qwen")

    def broken(messages):
        raise RuntimeError("the template engine broke")

    monkeypatch.setattr(chat, "render", broken)  # fails before the request takes a generation slot
    httpd = ChatServer(("127.0.0.1", 0), chat, NAME, Sampling(2, 0.0, 1.0), Limits())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        status, payload = post(
            (*httpd.server_address[:2], None), b'{"messages": ' + HI.encode() + b"}"
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (
        status == 500
        and refusal(status, payload)
        == "the server failed on this request (RuntimeError: the template engine broke)."
    )
