"""Chat datasets for SFT: read conversations, pick the template, encode with labels, report drops,
and give the tokenizer the template (special tokens, chat_template, stop tokens)."""

from __future__ import annotations

import functools
import json
import logging

from datasets import Dataset

from pipeline.collators import IGNORE_INDEX
from pipeline.conversations import read_conversations
from pipeline.data import ReadReport
from pipeline.errors import UserError
from pipeline.masking import encode_samples
from pipeline.templates import Template, chat_template_jinja, get_template, render, template_names

logger = logging.getLogger(__name__)

_PROBES = [
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}],
    [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}],
]


def resolve_template(name: str, tokenizer) -> Template:
    """--template_name auto: the project template whose output equals the tokenizer's own chat template."""
    if name != "auto":
        return get_template(name)
    if not tokenizer.chat_template:
        raise UserError("--template_name auto needs a tokenizer with a chat template; this one has none, so pass "
                        f"--template_name (one of {', '.join(template_names())}).")
    for candidate in template_names():
        try:
            same = all(tokenizer.apply_chat_template(p, tokenize=False) == render(candidate, p) for p in _PROBES)
        except Exception:  # a template that rejects a probe (e.g. no system role) is not a match
            same = False
        if same:
            logger.info("--template_name auto: the tokenizer's chat template renders like '%s'", candidate)
            return get_template(candidate)
    raise UserError("--template_name auto: the tokenizer's chat template matches none of the project templates; "
                    f"pass --template_name (one of {', '.join(template_names())}).")


def apply_template_to_tokenizer(tokenizer, template: Template) -> list[int]:
    """Add the template's missing special tokens, set chat_template; return the stop token ids."""
    missing = [t for t in template.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        logger.warning("template '%s' needs tokens the tokenizer lacks; added %s (embeddings will be resized)",
                       template.name, missing)
    tokenizer.chat_template = chat_template_jinja(template.name)
    stops = [tokenizer.convert_tokens_to_ids(s) for s in template.stop if s in tokenizer.get_vocab()]
    return stops or [tokenizer.eos_token_id]


def _encode_batch(batch, template, tokenizer, mode, train_on_inputs, max_length):
    out = {"input_ids": [], "labels": []}
    for text in batch["conversation"]:
        for sample in encode_samples(template, tokenizer, json.loads(text), mode, train_on_inputs, max_length):
            out["input_ids"].append(sample.input_ids if sample else [])
            out["labels"].append(sample.labels if sample else [])
    return out


def build_chat_dataset(directory: str, flag: str, template: Template, tokenizer, sft_args, data_args) -> tuple[Dataset, ReadReport]:
    conversations, report = read_conversations(directory, flag, sft_args.data_format, sft_args.skip_invalid_samples)
    raw = Dataset.from_dict({"conversation": [json.dumps(c, ensure_ascii=False) for c in conversations]})
    encoded = raw.map(
        functools.partial(_encode_batch, template=template, tokenizer=tokenizer, mode=sft_args.multi_turn_mode,
                          train_on_inputs=sft_args.train_on_inputs, max_length=sft_args.model_max_length),
        batched=True, remove_columns=["conversation"], num_proc=data_args.preprocessing_num_workers,
        load_from_cache_file=False, desc=f"encoding {flag}",
    )
    kept = encoded.filter(lambda x: len(x["input_ids"]) > 0)
    if len(kept) < len(encoded):
        report.drop(f"no supervised token within --model_max_length {sft_args.model_max_length}", len(encoded) - len(kept))
    if sft_args.multi_turn_mode == "split":
        report.read += len(encoded) - len(conversations)  # counts samples, not conversations, from here on
    if len(kept) == 0:
        raise UserError(f"{flag} {directory}: no sample has a supervised token; check --model_max_length and the data.")
    return kept, report


def sanity_table(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The seed's 'Sanity Check' table: token text, id, and label (-100 = not trained)."""
    rows = [f"{'token':>20}  {'id':>7}  label"]
    for tok, label in zip(input_ids, labels):
        text = repr(tokenizer.decode([tok]))
        rows.append(f"{text:>20}  {tok:>7}  {label if label != IGNORE_INDEX else -100}")
    return "\n".join(rows)
