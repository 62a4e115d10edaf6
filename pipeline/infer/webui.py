"""A chat page in the browser for a trained folder, built on gradio (an optional extra:
pip install -e ".[webui]").

    python -m pipeline.webui \
        --model outputs/sft-merged                  # open the printed http://127.0.0.1:PORT/
    python -m pipeline.webui --model outputs/sft --port 7860 --system "You are a helpful assistant."

Answers stream in as they are generated, through the same ChatModel as `python -m pipeline.chat`.
The page has a system prompt box, the sampling settings (temperature, top_p, max new tokens; their
flags set the starting values) and a button that clears the history. Each browser tab keeps its own
conversation; the one model answers one message at a time, in arrival order (gradio's queue). The
handlers below take and return plain messages, so they run without gradio; only `build_page` and
`main` need it.
"""

from __future__ import annotations

import argparse
import queue
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.command_line import command_parser
from pipeline.errors import UserError, first_line, run_cli
from pipeline.infer.chat_model import (
    ChatModel,
    Sampling,
    add_model_arguments,
    load_chat_model_from_args,
)

INSTALL = 'pip install -e ".[webui]"'
MAX_NEW_TOKENS_SLIDER = 4096  # the slider's top, unless --max_new_tokens starts above it


def conversation(history: list[dict], system: str | None, message: str) -> list[dict]:
    """The model's messages for one turn: the system prompt (when not blank), the turns so far, the
    new message."""
    start = [{"role": "system", "content": system}] if system and system.strip() else []
    return [
        *start,
        *({"role": m["role"], "content": m["content"]} for m in history),
        {"role": "user", "content": message},
    ]


class _Stopped(Exception):
    """Raised from the streaming callback when the page's reader has gone; ChatModel.stream then
    ends the generation."""


def stream_answer(chat: ChatModel, messages: list[dict], sampling: Sampling) -> Iterator[str]:
    """The answer to `messages` as it grows: each item is the text so far, the last one the finished
    answer.

    ChatModel.stream reports pieces through a callback, so it runs on a worker thread and the pieces
    come back through a queue. Closing this iterator early (the page was reset or left) stops the
    generation at its next piece.
    """
    pieces: queue.Queue = queue.Queue()
    leave = threading.Event()
    outcome: dict[str, Any] = {}

    def on_text(text: str) -> None:
        if leave.is_set():
            raise _Stopped
        pieces.put(text)

    def work() -> None:
        try:
            outcome["completion"] = chat.stream(messages, sampling, on_text)
        except BaseException as e:  # handed to the reader below
            outcome["error"] = e
        finally:
            pieces.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""
    try:
        while (piece := pieces.get()) is not None:
            text += piece
            yield text
    finally:
        leave.set()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["completion"].text  # decoded from the whole answer, as pipeline.chat keeps it


def respond(
    chat: ChatModel,
    message: str,
    history: list[dict],
    system: str | None,
    temperature: float,
    top_p: float,
    max_new_tokens: float,
) -> Iterator[tuple[list[dict], list[dict], str]]:
    """The send handler: yields (what the chat shows, the history to keep, the message box) while
    the answer grows.

    The history holds plain {"role", "content"} messages, user and assistant turns only (the system
    prompt is read from its box each turn). A blank message changes nothing.
    """
    if not message.strip():
        yield history, history, message
        return
    sampling = Sampling(int(max_new_tokens), float(temperature), float(top_p))
    messages = conversation(history, system, message)
    turns = [*history, {"role": "user", "content": message}]
    yield turns, turns, ""
    for text in stream_answer(chat, messages, sampling):
        turns = [
            *history,
            {"role": "user", "content": message},
            {"role": "assistant", "content": text},
        ]
        yield turns, turns, ""


def reset() -> tuple[list[dict], list[dict], str]:
    """The clear handler: an empty chat, an empty history, an empty message box."""
    return [], [], ""


# ---------------------------------------------------------------- the page


def import_gradio():
    try:
        import gradio
    except ImportError as e:
        raise UserError(
            f"the web chat needs gradio ({first_line(e)}); install it with {INSTALL}."
        ) from e
    return gradio


def build_page(chat: ChatModel, title: str, defaults: Sampling, system: str | None):
    """The gradio Blocks page over `chat`: chat, message box and Send, Clear history, then system
    prompt and sampling."""
    gr = import_gradio()

    def send(message, history, system_text, temperature, top_p, max_new_tokens):
        try:
            yield from respond(
                chat, message, history, system_text, temperature, top_p, max_new_tokens
            )
        except UserError as e:
            # a bad setting or messages the template rejects: shown on the page, the server goes on
            raise gr.Error(str(e)) from e

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"## {title}")
        shown = gr.Chatbot(
            label="Chat",
            elem_id="chat",
            height=480,
            feedback_options=None,
            buttons=["copy", "copy_all"],
        )
        history = gr.State([])
        with gr.Row():
            message = gr.Textbox(
                show_label=False,
                placeholder="Type a message and press Enter",
                elem_id="message",
                scale=8,
                autofocus=True,
            )
            send_button = gr.Button("Send", variant="primary", elem_id="send", scale=1)
        clear_button = gr.Button("Clear history", elem_id="clear")
        with gr.Accordion("Settings", open=True):
            system_box = gr.Textbox(
                label="System prompt", value=system or "", lines=2, elem_id="system"
            )
            with gr.Row():
                temperature = gr.Slider(
                    0,
                    2,
                    value=defaults.temperature,
                    step=0.05,
                    label="Temperature (0 = greedy)",
                    elem_id="temperature",
                )
                top_p = gr.Slider(
                    0.01, 1, value=defaults.top_p, step=0.01, label="top_p", elem_id="top_p"
                )
                max_new_tokens = gr.Slider(
                    1,
                    max(MAX_NEW_TOKENS_SLIDER, defaults.max_new_tokens),
                    value=defaults.max_new_tokens,
                    step=1,
                    label="Max new tokens",
                    elem_id="max_new_tokens",
                )
        inputs = [message, history, system_box, temperature, top_p, max_new_tokens]
        outputs = [shown, history, message]
        events = [
            trigger(send, inputs, outputs, show_progress="minimal")
            for trigger in (send_button.click, message.submit)
        ]
        for trigger in (
            clear_button.click,
            shown.clear,
        ):  # the chat's own trash icon must forget the history too
            trigger(reset, None, outputs, cancels=events)
    return page


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        description="Chat with a trained folder in the browser (a gradio page)."
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--system", default=None, help="the system prompt the page starts with (editable there)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    parser.add_argument(
        "--port", type=int, default=None, help="default: the first free port from 7860"
    )
    return parser


def check_port(host: str, port: int | None) -> None:
    """A taken --port is refused before the model loads (gradio would find out only after)."""
    if port is None:
        return
    try:
        with socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        ):
            pass
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port."
        ) from e


def main(argv: list[str] | None = None) -> None:
    given = sys.argv[1:] if argv is None else argv
    if not {"-h", "--help"} & set(given):  # --help answers without gradio installed
        # before the flags, so that even a bare `python -m pipeline.webui` says how to install it
        import_gradio()
    args = build_parser().parse_args(argv)
    defaults = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    check_port(args.host, args.port)
    chat = load_chat_model_from_args(
        args
    )  # the same loading flags as pipeline.chat and pipeline.serve
    page = build_page(
        chat, f"Chat with {Path(args.model).name or args.model}", defaults, args.system
    )
    try:
        _, url, _ = page.queue().launch(
            server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True
        )
    except OSError as e:
        raise UserError(
            f"cannot listen on {args.host}:{args.port} ({first_line(e)}); pick another --port."
        ) from e
    print(f"serving {args.model} on {url} (Ctrl-C stops)", flush=True)
    page.block_thread()  # until Ctrl-C, which closes the server


if __name__ == "__main__":
    run_cli(main)
