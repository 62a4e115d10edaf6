"""The official chat templates stored in tests/official_templates/ (SOURCES.md names where each
comes from) and a tokenizer for each: the tiny test tokenizer given the family's special tokens,
BOS/EOS and that template.

FAMILIES holds the first eight (their spec written here); `families-2026.json` and
`more/families.json` hold the rest, each with its model, special tokens and source."""

import json
from pathlib import Path

from transformers import AutoTokenizer

OFFICIAL = Path(__file__).parent / "official_templates"
LLAMA3 = [
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]
DEEPSEEK = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
MISTRAL = [
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
]
# each official template (tests/official_templates/<family>.jinja) with the special tokens its
# tokenizer knows; system: accepts a system message; tools: writes tool definitions; exact: auto
# trains it as it renders
FAMILIES = {
    "llama-3.3-instruct": dict(
        special=LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", end="<|eot_id|>"
    ),
    "qwen3": dict(
        special=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        bos=None,
        eos="<|im_end|>",
        end="<|im_end|>",
    ),
    "gemma-2-it": dict(
        special=["<bos>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<end_of_turn>",
        end="<end_of_turn>",
        system=False,
        tools=False,
    ),
    "gemma-3-it": dict(
        special=["<bos>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<end_of_turn>",
        end="<end_of_turn>",
        tools=False,
    ),
    "phi-4": dict(
        special=["<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"],
        bos=None,
        eos="<|im_end|>",
        end="<|im_end|>",
        tools=False,
    ),
    "deepseek-v3": dict(
        special=DEEPSEEK, bos=DEEPSEEK[0], eos=DEEPSEEK[1], end=DEEPSEEK[1], tools=False
    ),
    "deepseek-r1": dict(
        special=DEEPSEEK,
        bos=DEEPSEEK[0],
        eos=DEEPSEEK[1],
        end=DEEPSEEK[1],
        tools=False,
        exact=False,
    ),
    "mistral-7b-instruct-v0.3": dict(
        special=MISTRAL, bos="<s>", eos="</s>", end="</s>", system=False
    ),
}


def _stored(folder: Path) -> dict:
    path = folder / ("families-2026.json" if folder == OFFICIAL else "families.json")
    if not path.is_file():
        return {}
    out = {}
    for name, spec in json.loads(path.read_text(encoding="utf-8")).items():
        files = spec.get("template") or f"{name}.jinja"
        out[name] = {**spec, "folder": folder, "template": files}
    return out


STORED = {**_stored(OFFICIAL), **_stored(OFFICIAL / "more")}


def all_families() -> list[str]:
    return sorted([*FAMILIES, *STORED])


def family_template(family: str) -> str | dict:
    if family in FAMILIES:
        return (OFFICIAL / f"{family}.jinja").read_text(encoding="utf-8")
    spec = STORED[family]
    files = spec["template"]
    if isinstance(files, dict):
        return {k: (spec["folder"] / f).read_text(encoding="utf-8") for k, f in files.items()}
    return (spec["folder"] / files).read_text(encoding="utf-8")


def family_tokenizer(base_tokenizer_dir, family: str):
    spec = FAMILIES.get(family) or STORED[family]
    tokenizer = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    special = [
        t
        for t in dict.fromkeys(
            [*spec["special"], *(x for x in (spec.get("bos"), spec["eos"]) if x)]
        )
    ]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": special}, replace_extra_special_tokens=False
    )
    tokenizer.eos_token = spec["eos"]
    tokenizer.bos_token = spec.get("bos")
    tokenizer.chat_template = family_template(family)
    return tokenizer
