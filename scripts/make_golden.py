"""Regenerate tests/golden/<template>.tsv: the token/label table of one fixed conversation per
template, encoded with the tiny tokenizer. Any change to rendering or masking shows up in review as
a diff.

    python scripts/make_golden.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.masking import encode_samples  # noqa: E402
from pipeline.data.templates import apply_template_to_tokenizer, resolve_template, template_names  # noqa: E402
from pipeline.model.tiny_model import REPO_DATA, corpus, train_tokenizer  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is ka-bo?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "lo-ri 是什么颜色?"},
    {"role": "assistant", "content": "蓝色"},
]


# Templates that write today's date (gpt-oss, SmolLM3) write this one, whatever day it is.
GOLDEN_DAY = datetime(2026, 12, 4)


@contextmanager
def golden_day():
    """transformers' `strftime_now` in chat templates reads the golden day, not the clock."""
    import transformers.utils.chat_template_utils as chat_template_utils

    class Day(datetime):
        @classmethod
        def now(cls, tz=None):
            return GOLDEN_DAY

    clock = chat_template_utils.datetime
    chat_template_utils.datetime = Day
    try:
        yield
    finally:
        chat_template_utils.datetime = clock


def table(name: str, base_tokenizer_dir: str) -> str:
    with golden_day():
        return _table(name, base_tokenizer_dir)


def _table(name: str, base_tokenizer_dir: str) -> str:
    """NAME: a project template; auto-FAMILY: --template_name auto with that official template."""
    if name.startswith("auto-"):
        from tests.official_families import family_tokenizer

        tokenizer = family_tokenizer(base_tokenizer_dir, name.removeprefix("auto-"))
        template = resolve_template("auto", tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(base_tokenizer_dir)
        template = resolve_template(name, tokenizer)
    apply_template_to_tokenizer(tokenizer, template)
    samples = encode_samples(template, tokenizer, {"messages": CONVERSATION})
    rows = ["position\ttoken_id\ttoken\tlabel"]
    for k, enc in enumerate(samples):
        if len(samples) > 1:  # a format that rewrites history trains each answer in its own sample
            rows.append(f"# sample {k + 1} of {len(samples)}")
        for i, (tok, label) in enumerate(zip(enc.input_ids, enc.labels)):
            rows.append(f"{i}\t{tok}\t{tokenizer.convert_ids_to_tokens(tok)!r}\t{label}")
    return "\n".join(rows) + "\n"


def official_names() -> list[str]:
    """auto-FAMILY for each official template (tests/official_families.py) that trains this
    conversation: all but those that refuse a system message or move it once an answer follows
    (their refusal is tested elsewhere)."""
    from tests.official_families import all_families

    refuse = {"gemma-2-it", "mistral-7b-instruct-v0.3", "mistral-nemo-2407"}
    return [f"auto-{f}" for f in all_families() if f not in refuse]


def tiny_tokenizer_dir(tmp: str) -> str:
    train_tokenizer(corpus(REPO_DATA), 3000).save_pretrained(tmp)
    return tmp


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = tiny_tokenizer_dir(tmp)
        for name in template_names() + official_names():
            (GOLDEN / f"{name}.tsv").write_text(table(name, tok_dir), encoding="utf-8")
            print(f"wrote tests/golden/{name}.tsv")


if __name__ == "__main__":
    main()
