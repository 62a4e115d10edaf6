"""The SFT dataset: read conversations, check the training/inference contract on the first ones
(contract.py), encode each with its template and labels (masking.py), count what is dropped and why, and
print the seed's token/label "Sanity Check" table."""

from __future__ import annotations

import functools
import json
import logging

from datasets import Dataset

from pipeline.data.contract import check_chat_contract
from pipeline.data.conversations import read_conversations
from pipeline.data.files import ReadReport
from pipeline.data.masking import IGNORE_INDEX, encode_samples
from pipeline.data.templates import Template
from pipeline.errors import UserError

logger = logging.getLogger(__name__)

def _encode_batch(batch, template, tokenizer, mode, train_on_inputs, max_length):
    out = {"input_ids": [], "labels": []}
    for text in batch["conversation"]:
        for sample in encode_samples(template, tokenizer, json.loads(text), mode, train_on_inputs, max_length):
            out["input_ids"].append(sample.input_ids if sample else [])
            out["labels"].append(sample.labels if sample else [])
    return out


def build_chat_dataset(directory: str, flag: str, template: Template, tokenizer, sft_args,
                       data_args) -> tuple[Dataset, ReadReport]:
    conversations, report = read_conversations(directory, flag, sft_args.data_format, sft_args.skip_invalid_samples)
    checked = check_chat_contract(template, tokenizer, conversations)
    logger.info("%s: the training ids of the first %d conversations equal the saved chat template's "
                "apply_chat_template (prompt and answer)", flag, checked)
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
    extra = len(encoded) - len(conversations)
    if extra and sft_args.multi_turn_mode != "split":  # the template rewrites history (masking.encode_samples)
        logger.info("%s: conversations split one answer per sample added %d samples (%d conversations -> %d samples)",
                    flag, extra, len(conversations), len(encoded))
    report.read += extra  # counts samples, not conversations, from here on
    if len(kept) == 0:
        dropped = "; ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items()))
        raise UserError(f"{flag} {directory}: {report.read} samples read, none kept ({dropped}); raise "
                        "--model_max_length or shorten the data.")
    return kept, report


def sanity_table(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The seed's 'Sanity Check' table: token text, id, and label (-100 = not trained)."""
    rows = [f"{'token':>20}  {'id':>7}  label"]
    for tok, label in zip(input_ids, labels):
        text = repr(tokenizer.decode([tok]))
        rows.append(f"{text:>20}  {tok:>7}  {label if label != IGNORE_INDEX else -100}")
    return "\n".join(rows)
