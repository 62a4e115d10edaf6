"""pipeline.webui: the page's handlers stream the ChatModel's answers with the system prompt and the
history (run on the tiny model, no gradio needed), and the real page in headless Chromium streams an
answer, keeps the history and forgets it on Clear history. The browser test needs the webui extra
(gradio, playwright) and a system Chromium (`apt-get install chromium`); without them it is skipped,
saying which is missing."""

import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.errors import UserError, run_cli
from pipeline.infer import webui
from pipeline.infer.chat_model import Sampling, load_chat_model
from tests.helpers import REPO

SYSTEM = "Be brief."


@pytest.fixture(scope="module")
def chat(tiny_model):
    return load_chat_model(str(tiny_model), template_name="qwen")


def greedy(chat, messages: list[dict], max_new_tokens: int) -> str:
    return chat.generate([messages], Sampling(max_new_tokens))[0].text


def test_conversation_orders_system_history_and_message():
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "metadata": None},
    ]
    assert webui.conversation(history, SYSTEM, "and now?") == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"},
    ]
    assert (
        webui.conversation([], "  ", "hi")
        == webui.conversation([], None, "hi")
        == [{"role": "user", "content": "hi"}]
    )


def test_respond_streams_the_answer_and_keeps_the_history(chat):
    steps = list(webui.respond(chat, "Hello there", [], SYSTEM, 0, 1, 24))
    shown, history, box = steps[0]
    assert shown == history == [{"role": "user", "content": "Hello there"}] and box == ""
    answers = [h[-1]["content"] for _, h, _ in steps[1:]]
    assert len(set(answers)) > 3, "the answer came in one piece, not streamed"
    assert all(
        a.startswith(b) for a, b in zip(answers[1:], answers)
    )  # each step extends the one before
    first = greedy(
        chat,
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}],
        24,
    )
    assert answers[-1] == first != ""
    assert (
        steps[-1][0]
        == steps[-1][1]
        == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first}]
    )

    # the second turn is answered with the first in its prompt
    *_, (shown, history, box) = webui.respond(chat, "Tell me more", steps[-1][1], SYSTEM, 0, 1, 16)
    expected = greedy(
        chat,
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Tell me more"},
        ],
        16,
    )
    assert history[:2] == steps[-1][1] and history[2:] == [
        {"role": "user", "content": "Tell me more"},
        {"role": "assistant", "content": expected},
    ]
    assert expected != greedy(
        chat,
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me more"}],
        16,
    )
    assert webui.reset() == ([], [], "")


def test_sampling_settings_reach_generation(chat):
    *_, (_, history, _) = webui.respond(chat, "Hello there", [], "", 0, 1, 5)
    assert history[-1]["content"] == greedy(chat, [{"role": "user", "content": "Hello there"}], 5)
    assert history[-1]["content"] != greedy(
        chat, [{"role": "user", "content": "Hello there"}], 24
    )  # 5 tokens, not 24
    sampled = {
        list(webui.respond(chat, "Hello there", [], "", 2.0, 1.0, 8))[-1][1][-1]["content"]
        for _ in range(4)
    }
    assert len(sampled) > 1, (
        "temperature 2 gave the same answer four times: sampling was not applied"
    )


def test_blank_message_and_bad_settings(chat):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert list(webui.respond(chat, "  ", history, SYSTEM, 0, 1, 8)) == [(history, history, "  ")]
    with pytest.raises(UserError, match=r"top_p must be in \(0, 1\], got 0.0"):
        list(webui.respond(chat, "hi", [], SYSTEM, 0, 0, 8))


def test_closing_the_stream_stops_the_generation(chat):
    """A reset or a closed tab closes the handler: the generation must end at once, not run its 1000
    tokens (tens of seconds for the tiny model on a CPU)."""
    before = threading.active_count()
    stream = webui.stream_answer(
        chat, webui.conversation([], SYSTEM, "Hello there"), Sampling(1000)
    )
    assert next(stream)
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 2 and threading.active_count() == before


def test_without_gradio_it_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(
        sys.modules, "gradio", None
    )  # what `import gradio` meets where it is not installed
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: webui.main([]))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"error: the web chat needs gradio \(.*\); "
        r'install it with pip install -e "\.\[webui\]"\.\n',
        err,
    )


def test_a_taken_port_is_refused_before_the_model_loads(tmp_path):
    pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[webui]")')
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(
            UserError, match=rf"cannot listen on 127.0.0.1:{port} \(.+\); pick another --port\."
        ):
            webui.main(["--model", str(tmp_path / "not-loaded"), "--port", str(port)])


# ---------------------------------------------------------------- the page in a real browser


def chromium() -> str:
    """The system Chromium, or a skip saying what is missing."""
    pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[webui]")')
    pytest.importorskip(
        "playwright.sync_api", reason='playwright is not installed (pip install -e ".[webui]")'
    )
    path = next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    if path is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    return path


def bot_texts(page) -> list[str]:
    """The assistant messages shown, as their raw text (the aria-label; the bubble itself is
    rendered markdown)."""
    labels = page.locator('#chat [data-testid="bot"]').evaluate_all(
        "els => els.map(e => e.getAttribute('aria-label'))"
    )
    return [" ".join(label.removeprefix("bot's message: ").split()) for label in labels]


def send(page, text: str, expected: str) -> None:
    """Type `text`, click Send, and wait until the last answer shown is `expected` (whitespace
    aside)."""
    want, answers = " ".join(expected.split()), len(bot_texts(page))
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()
    try:
        page.wait_for_function(
            "n => document.querySelectorAll('#chat [data-testid=\"bot\"]').length > n",
            arg=answers,
            timeout=60_000,
        )
        page.wait_for_function(
            """want => { const bots = document.querySelectorAll('#chat [data-testid="bot"]');
            const label = bots[bots.length - 1].getAttribute('aria-label')"""
            """.replace("bot's message: ", "");
            return label.split(/\\s+/).filter(Boolean).join(" ") === want; }""",
            arg=want,
            timeout=60_000,
        )
    except Exception as e:
        raise AssertionError(f"the page showed {bot_texts(page)}, not the answer {want!r}") from e


def test_chat_page_in_headless_chromium(tiny_model, chat, tmp_path):
    browser_path = chromium()
    from playwright.sync_api import sync_playwright

    log = (tmp_path / "webui.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.webui",
            "--model",
            str(tiny_model),
            "--template_name",
            "qwen",
            "--max_new_tokens",
            "48",
            "--system",
            SYSTEM,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        line = (
            proc.stdout.readline()
        )  # "serving ... on http://127.0.0.1:PORT/ (Ctrl-C stops)" once it listens
        assert " on http://" in line, (
            f"the page did not start: {(tmp_path / 'webui.log').read_text()[-3000:]}"
        )
        url = line.split(" on ")[1].split()[0]
        first = greedy(chat, webui.conversation([], SYSTEM, "Hello there"), 48)
        second = greedy(
            chat,
            [
                *webui.conversation([], SYSTEM, "Hello there"),
                {"role": "assistant", "content": first},
                {"role": "user", "content": "Tell me more"},
            ],
            48,
        )
        short = greedy(chat, webui.conversation([], None, "Hello there"), 5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.goto(url)
            assert page.locator("#system textarea").input_value() == SYSTEM
            # record every text the answer shows while it streams in
            page.evaluate(
                """() => { window.seen = []; new MutationObserver(() => {
                const bots = document.querySelectorAll('#chat [data-testid="bot"]');
                if (bots.length) window.seen.push("""
                """bots[bots.length - 1].getAttribute('aria-label')); })
                .observe(document.querySelector('#chat'), {subtree: true, childList: true, """
                """attributes: true,
                                                           characterData: true}); }"""
            )
            send(page, "Hello there", first)
            seen = list(dict.fromkeys(page.evaluate("window.seen")))
            assert len(seen) > 1, f"the answer appeared in one piece, not streamed: {seen}"
            print(f"the answer showed {len(seen)} texts while streaming")
            send(page, "Tell me more", second)  # answered with the first turn in its prompt
            assert bot_texts(page) == [" ".join(first.split()), " ".join(second.split())]
            shot = tmp_path / "webui.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")

            page.locator("#clear").click()
            page.wait_for_function(
                "() => !document.querySelector('#chat [data-testid=\"user\"]')", timeout=30_000
            )
            send(page, "Hello there", first)  # the history is gone: the first answer again
            assert bot_texts(page) == [" ".join(first.split())]
            page.locator(
                '#chat button[aria-label="Clear"]'
            ).click()  # the chat's own trash icon forgets it too
            page.wait_for_function(
                "() => !document.querySelector('#chat [data-testid=\"user\"]')", timeout=30_000
            )
            # the settings reach the model: no system prompt, 5 new tokens
            page.locator("#system textarea").fill("")
            page.locator("#max_new_tokens input[type=number]").fill("5")
            page.locator("#max_new_tokens input[type=number]").press("Enter")
            send(page, "Hello there", short)
            assert bot_texts(page) == [" ".join(short.split())]
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
