"""What the training/inference contract costs: encoding N chats into SFT samples with every
conversation checked (each answer after exactly its prompt's ids), against the code before that
check (the first 4 conversations checked, one tokenization of the whole text), one process, CPU.

    python -m bench.contract_cost --chats 100000 --out bench/results
    python -m bench.contract_cost --chats 100000 \
        --code /path/to/an/older/checkout   # the same on other code

The chats are multi-turn (1 to 4 answers, a fifth of them with a tool call and its result), with
words from the repository's text, lengths log-normal around 80 words a message. The tokenizer is
Llama-3's (bench/cache/llama3_tokenizer.json.gz, see bench/nan_guard.py) with its official template
for `auto`; the project template `qwen` (its Jinja given to the tokenizer and rendered as `auto` is,
since the one renderer; before, rendered in Python and checked against its Jinja form) runs on the
same tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a word up",
            "parameters": {
                "type": "object",
                "properties": {"word": {"type": "string"}},
                "required": ["word"],
            },
        },
    }
]


def make_chats(n: int, seed: int = 0) -> list[dict]:
    from pipeline.model.tiny_model import corpus

    words = " ".join(
        corpus(REPO / "data")
    ).split()  # this checkout's words, whichever pipeline runs
    rng = random.Random(seed)

    def text() -> str:
        k = min(600, max(3, int(rng.lognormvariate(math.log(80), 0.7))))
        return " ".join(rng.choice(words) for _ in range(k))

    chats = []
    for _ in range(n):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
        for _turn in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": text()})
            if rng.random() < 0.2:
                messages += [
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {
                                "type": "function",
                                "function": {
                                    "name": "lookup",
                                    "arguments": {"word": rng.choice(words)},
                                },
                            }
                        ],
                    },
                    {"role": "tool", "content": text()},
                ]
            messages.append({"role": "assistant", "content": text()})
        chats.append(
            {
                "messages": messages,
                "tools": TOOLS if any(m.get("tool_calls") for m in messages) else None,
            }
        )
    return chats


def measure(chats: list[dict], template_name: str) -> dict:
    """Encode every chat as the SFT dataset does; seconds and samples."""
    from bench.nan_guard import llama3_tokenizer
    from pipeline.data.masking import encode_samples
    from pipeline.data.templates import apply_template_to_tokenizer, resolve_template

    tokenizer = llama3_tokenizer()
    template = resolve_template(template_name, tokenizer)
    apply_template_to_tokenizer(tokenizer, template)
    try:  # this project now: every conversation checked while it is encoded
        from pipeline.data.chat_dataset import _samples

        def encode(conv, n):
            return _samples(conv, n, template, tokenizer, "all", False, 4096, False)

        checked = "every conversation"
    except ImportError:  # the code before: the first 4 checked up front, then encoding
        from pipeline.data.contract import check_chat_contract

        check_chat_contract(template, tokenizer, chats)

        def encode(conv, n):
            return encode_samples(template, tokenizer, conv, "all", False, 4096)

        checked = "the first 4"
    start = time.perf_counter()
    samples = tokens = 0
    for n, conv in enumerate(chats):
        for sample in encode(conv, n + 1):
            samples += 1
            tokens += len(getattr(sample, "input_ids", []))
    seconds = time.perf_counter() - start
    return {
        "template": template_name,
        "chats": len(chats),
        "samples": samples,
        "tokens": tokens,
        "checked": checked,
        "seconds": round(seconds, 1),
        "chats_per_s": round(len(chats) / seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=100_000)
    parser.add_argument("--templates", default="auto,qwen")
    parser.add_argument(
        "--code", default=None, help="Run on another checkout's pipeline (its path)."
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.code:  # the same measurement in a child whose pipeline is the other checkout's
        env = {**os.environ, "PYTHONPATH": f"{Path(args.code).resolve()}:{REPO}"}
        code = (
            "import importlib.util, json, sys; sys.path[:0] = "
            f"[{str(Path(args.code).resolve())!r}, {str(REPO)!r}]\n"
            f"spec = importlib.util.spec_from_file_location('cost', {__file__!r})\n"
            "cost = importlib.util.module_from_spec(spec); spec.loader.exec_module(cost)\n"
            f"chats = cost.make_chats({args.chats})\n"
            f"print(json.dumps([cost.measure(chats, t) for t in {args.templates.split(',')!r}]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
        )
        rows = json.loads(out.stdout.strip().splitlines()[-1])
    else:
        chats = make_chats(args.chats)
        rows = [measure(chats, t) for t in args.templates.split(",")]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = "contract-cost" + ("-before" if args.code else "") + ".json"
        (Path(args.out) / name).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
