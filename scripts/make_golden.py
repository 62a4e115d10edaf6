"""Regenerate tests/golden/<template>.tsv: the token/label table of one fixed conversation per template,
encoded with the tiny tokenizer. Any change to rendering or masking shows up in review as a diff.

    python scripts/make_golden.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.masking import encode  # noqa: E402
from pipeline.data.templates import (  # noqa: E402
    apply_template_to_tokenizer,  # noqa: E402
    get_template,
    template_names,
)
from pipeline.model.tiny_model import REPO_DATA, corpus, train_tokenizer  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is ka-bo?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "lo-ri 是什么颜色?"},
    {"role": "assistant", "content": "蓝色"},
]


def table(name: str, base_tokenizer_dir: str) -> str:
    tokenizer = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    template = get_template(name)
    apply_template_to_tokenizer(tokenizer, template)
    enc = encode(template, tokenizer, CONVERSATION)
    rows = ["position\ttoken_id\ttoken\tlabel"]
    for i, (tok, label) in enumerate(zip(enc.input_ids, enc.labels)):
        rows.append(f"{i}\t{tok}\t{tokenizer.convert_ids_to_tokens(tok)!r}\t{label}")
    return "\n".join(rows) + "\n"


def tiny_tokenizer_dir(tmp: str) -> str:
    train_tokenizer(corpus(REPO_DATA), 3000).save_pretrained(tmp)
    return tmp


def main() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = tiny_tokenizer_dir(tmp)
        for name in template_names():
            (GOLDEN / f"{name}.tsv").write_text(table(name, tok_dir), encoding="utf-8")
            print(f"wrote tests/golden/{name}.tsv")


if __name__ == "__main__":
    main()
