"""Use a trained folder from the terminal: multi-turn chat, or answers for a whole file of prompts.

    python -m pipeline.chat \
        --model outputs/sft-merged                  # interactive: clear / exit (quit, stop)
    python -m pipeline.chat outputs/sft \
        --prompt "Hello"                            # one answer, printed (the GLM demos' form)
    python -m pipeline.chat --model outputs/sft --input_file prompts.jsonl \
        --output_file answers.jsonl
    python -m pipeline.chat --model outputs/sft --base_model /data/base --load_in_4bit \
        --rope_scaling dynamic

An input line is {"prompt": "...", "system"?: "..."} or {"messages": [OpenAI-style messages]}; each
output line is the input record plus "answer". Greedy by default (--temperature 0). server.py serves
the same model over an OpenAI-compatible HTTP API.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.command_line import command_parser
from pipeline.data.files import iter_json_records
from pipeline.errors import UserError, run_cli
from pipeline.infer.chat_model import (
    ChatModel,
    Sampling,
    add_model_arguments,
    check_messages,
    load_chat_model_from_args,
)


def record_messages(record: Any, system: str | None) -> list[dict]:
    """The conversation of one input record; --system applies where the record has no system
    message."""
    if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
        raise ValueError('a record needs exactly one of "prompt" (a string) or "messages" (a list)')
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record.get("system", ""), str):
            raise ValueError('"prompt" and "system" must be strings')
        messages = [{"role": "user", "content": record["prompt"]}]
        system = record.get("system", system)
    else:
        messages = check_messages(record["messages"])
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages


def read_prompts(input_file: str, system: str | None) -> list[tuple[dict, list[dict]]]:
    """(record, messages) for every record of a JSON-lines file; a broken one stops with
    file:line."""
    path = Path(input_file)
    if not path.is_file():
        raise UserError(f"--input_file {input_file} does not exist.")
    out = []
    for line, record in iter_json_records(path):
        try:
            out.append((record, record_messages(record, system)))
        except ValueError as e:
            raise UserError(f"{path}:{line}: {e}.") from e
    if not out:
        raise UserError(f"--input_file {input_file} holds no records.")
    return out


# ---------------------------------------------------------------- the two modes

QUIT_WORDS = ("exit", "quit", "stop")  # typed alone on a line, they end the interactive chat


def answer_file(
    chat: ChatModel,
    prompts: list[tuple[dict, list[dict]]],
    output_file: str,
    sampling: Sampling,
    batch_size: int,
) -> None:
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for start in range(0, len(prompts), batch_size):
            part = prompts[start : start + batch_size]
            for (record, _), completion in zip(part, chat.generate([m for _, m in part], sampling)):
                f.write(
                    json.dumps({**record, "answer": completion.text}, ensure_ascii=False) + "\n"
                )
            f.flush()
            print(f"answered {start + len(part)}/{len(prompts)}", file=sys.stderr, flush=True)


def _print_piece(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def interact(chat: ChatModel, sampling: Sampling, system: str | None) -> None:
    """Read user lines from stdin and stream the answers to stdout; `clear` resets,
    `exit`/`quit`/`stop` (or EOF) leaves."""
    start = [{"role": "system", "content": system}] if system is not None else []
    history = list(start)
    prompt = "user> " if sys.stdin.isatty() else ""
    print(
        "type a message; `clear` starts over, `exit`, `quit` or `stop` leaves",
        file=sys.stderr,
        flush=True,
    )
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            break
        if line in QUIT_WORDS:
            break
        if line == "clear":
            history = list(start)
            print("(history cleared)", file=sys.stderr, flush=True)
        elif line:
            history.append({"role": "user", "content": line})
            completion = chat.stream(history, sampling, _print_piece)
            print(flush=True)
            history.append({"role": "assistant", "content": completion.text})


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(description="Chat with a trained folder, or answer a file of prompts.")
    add_model_arguments(parser, model_required=False)
    parser.add_argument(
        "--system", default=None, help="system prompt (batch: for records that have none)"
    )
    parser.add_argument(
        "--input_file", default=None, help="JSON lines of {prompt, system?} or {messages}"
    )
    parser.add_argument(
        "--output_file", default=None, help="JSON lines: each input record plus answer"
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--prompt", nargs="+", default=None, help="answer this one message, print it and exit"
    )
    parser.add_argument("folder", nargs="?", default=None, help="the trained folder, as --model")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (args.model is None) == (args.folder is None):
        raise UserError("give the trained folder once: as --model FOLDER or as the first argument.")
    args.model = args.model or args.folder
    if args.prompt and args.input_file:
        raise UserError(
            "--prompt answers one message and --input_file a file of them; give one of the two."
        )
    if (args.input_file is None) != (args.output_file is None):
        raise UserError(
            "--input_file and --output_file go together; "
            "give both for batch mode, or neither to chat."
        )
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}.")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    prompts = read_prompts(args.input_file, args.system) if args.input_file else None
    chat = load_chat_model_from_args(args)
    if args.prompt:
        start = [{"role": "system", "content": args.system}] if args.system is not None else []
        chat.stream(
            [*start, {"role": "user", "content": " ".join(args.prompt)}], sampling, _print_piece
        )
        print(flush=True)
    elif prompts is None:
        interact(chat, sampling, args.system)
    else:
        answer_file(chat, prompts, args.output_file, sampling, args.batch_size)


if __name__ == "__main__":
    run_cli(main)
