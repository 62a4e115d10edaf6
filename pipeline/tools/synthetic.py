"""A learnable synthetic task that every stage's tests use to prove the stage learns.

The task: an item is named by two syllables joined with a hyphen ("ka-bo"), and its colour is
decided by the first syllable alone (every "ka-*" item is red). A model that learns the rule answers
for item names it never saw, so held-out exact match measures learning, not memorisation. The same
facts give pretraining text, SFT chats, preference pairs (right vs wrong colour) and a rule reward.

    python -m pipeline.synthetic --output_dir data      # regenerates the copies shipped in data/
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipeline.command_line import command_parser

COLORS = {
    "ka": ("red", "红色"),
    "lo": ("blue", "蓝色"),
    "mi": ("green", "绿色"),
    "zu": ("yellow", "黄色"),
    "re": ("black", "黑色"),
    "ta": ("white", "白色"),
    "vo": ("purple", "紫色"),
    "ne": ("orange", "橙色"),
}
SUFFIXES = ["bo", "ri", "sa", "tu", "pe", "gi", "lu", "fa", "do", "ki", "mo", "xe"]


def all_items() -> list[str]:
    return [f"{p}-{s}" for p in COLORS for s in SUFFIXES]


def answer(item: str, lang: str = "en") -> str:
    en, zh = COLORS[item.split("-")[0]]
    return en if lang == "en" else zh


def question(item: str, lang: str = "en") -> str:
    return f"What color is {item}?" if lang == "en" else f"{item} 是什么颜色?"


def wrong_answer(item: str, lang: str, rng: random.Random) -> str:
    right = answer(item, lang)
    choices = [c[0] if lang == "en" else c[1] for c in COLORS.values()]
    return rng.choice([c for c in choices if c != right])


def split_items(seed: int = 0, heldout_fraction: float = 0.25) -> tuple[list[str], list[str]]:
    """Held-out items are unseen names whose first syllable the training items do cover."""
    rng = random.Random(seed)
    train, heldout = [], []
    for prefix in COLORS:
        names = [f"{prefix}-{s}" for s in SUFFIXES]
        rng.shuffle(names)
        k = max(1, round(len(names) * heldout_fraction))
        heldout += names[:k]
        train += names[k:]
    return train, heldout


def pt_lines(items: list[str]) -> list[str]:
    return [f"The color of {i} is {answer(i)}. {i} 的颜色是{answer(i, 'zh')}。" for i in items]


def sft_records(items: list[str], rng: random.Random) -> list[dict]:
    """ShareGPT records; some are two-turn so multi-turn handling is exercised too."""
    out = []
    for item in items:
        for lang in ("en", "zh"):
            conv = [
                {"from": "human", "value": question(item, lang)},
                {"from": "gpt", "value": answer(item, lang)},
            ]
            if rng.random() < 0.3:
                other = rng.choice(items)
                conv += [
                    {"from": "human", "value": question(other, lang)},
                    {"from": "gpt", "value": answer(other, lang)},
                ]
            out.append({"conversations": conv})
    return out


def preference_records(items: list[str], rng: random.Random) -> list[dict]:
    """Seed-README preference style: question, response_chosen, response_rejected."""
    out = []
    for item in items:
        for lang in ("en", "zh"):
            out.append(
                {
                    "question": question(item, lang),
                    "response_chosen": answer(item, lang),
                    "response_rejected": wrong_answer(item, lang, rng),
                }
            )
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate(output_dir: str | Path, seed: int = 0, repeats: int = 4) -> dict[str, int]:
    """Write color_* files into pt/, pt_eval/, sft/, sft_eval/, reward/, reward_eval/; return
    counts."""
    root = Path(output_dir)
    rng = random.Random(seed)
    train, heldout = split_items(seed)
    pt = pt_lines(train) * repeats
    rng.shuffle(pt)
    for rel, lines in (("pt/color_facts.txt", pt), ("pt_eval/color_facts.txt", pt_lines(heldout))):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("\n".join(lines) + "\n", encoding="utf-8")
    parts = {
        "sft/color_qa.jsonl": sft_records(train, rng),
        "sft_eval/color_qa.jsonl": sft_records(heldout, rng),
        "reward/color_pairs.jsonl": preference_records(train, rng),
        "reward_eval/color_pairs.jsonl": preference_records(heldout, rng),
    }
    for rel, records in parts.items():
        write_jsonl(root / rel, records)
    counts = {rel: len(r) for rel, r in parts.items()}
    counts["pt/color_facts.txt"] = len(pt)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=4, help="copies of each pretraining fact")
    args = parser.parse_args(argv)
    for rel, n in generate(args.output_dir, args.seed, args.repeats).items():
        print(f"{args.output_dir}/{rel}: {n} records")


if __name__ == "__main__":
    main()
