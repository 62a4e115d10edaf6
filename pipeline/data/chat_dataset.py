"""The SFT dataset: read conversations, encode each with its template and labels (masking.py),
count what is dropped or cut and why (summary.py), and print the seed's token/label "Sanity Check"
table."""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter

from datasets import Dataset

from pipeline.data.conversations import read_conversations
from pipeline.data.files import shown
from pipeline.data.json_text import parse_json
from pipeline.data.masking import IGNORE_INDEX, Dropped, Encoded, cut_to_whole_turns, encode_samples
from pipeline.data.rendering import TokenizerTemplate
from pipeline.data.summary import DataSummary
from pipeline.errors import UserError

logger = logging.getLogger(__name__)


def _samples(conv, number, template, tokenizer, mode, train_on_inputs, max_length, skip_invalid):
    """A conversation's samples; a record the template rejects stops the run, or is dropped and
    counted with --skip_invalid_samples."""
    try:
        return encode_samples(template, tokenizer, conv, mode, train_on_inputs, max_length)
    except UserError as e:
        if not skip_invalid:
            raise UserError(f"conversation {number}: {e}") from e
        return [
            Dropped(
                f"the template cannot train it as inference renders it ({str(e).split(':')[0]})"
            )
        ]


def _encode_batch(
    batch, indices, template, tokenizer, mode, train_on_inputs, max_length, skip_invalid
):
    out = {"input_ids": [], "labels": [], "dropped": [], "truncated": []}
    for number, text in zip(indices, batch["conversation"]):
        conv = parse_json(text, "a conversation")
        for sample in _samples(
            conv, number + 1, template, tokenizer, mode, train_on_inputs, max_length, skip_invalid
        ):
            kept = isinstance(sample, Encoded)
            out["input_ids"].append(sample.input_ids if kept else [])
            out["labels"].append(sample.labels if kept else [])
            out["dropped"].append("" if kept else sample.reason)
            out["truncated"].append(kept and sample.truncated)
    return out


def build_chat_dataset(
    directory: str, flag: str, template: TokenizerTemplate, tokenizer, sft_args, data_args
) -> tuple[Dataset, DataSummary]:
    conversations, read = read_conversations(
        directory, flag, sft_args.data_format, sft_args.skip_invalid_samples
    )
    report = DataSummary.after_reading(read, "conversations", "samples")
    raw = Dataset.from_dict(
        {"conversation": [json.dumps(c, ensure_ascii=False) for c in conversations]}
    )
    encoded = raw.map(
        functools.partial(
            _encode_batch,
            template=template,
            tokenizer=tokenizer,
            mode=sft_args.multi_turn_mode,
            train_on_inputs=sft_args.train_on_inputs,
            max_length=sft_args.model_max_length,
            skip_invalid=sft_args.skip_invalid_samples,
        ),
        batched=True,
        with_indices=True,
        remove_columns=["conversation"],
        num_proc=data_args.preprocessing_num_workers,
        load_from_cache_file=False,
        desc=f"encoding {flag}",
    )
    refused = sum(1 for r in encoded["dropped"] if r.startswith("the template cannot train it"))
    logger.info(
        "%s: all %d conversations checked against the saved chat template: each trained answer "
        "follows the ids of its prompt as apply_chat_template(..., add_generation_prompt=True) "
        "gives them and ends with its end-of-turn token%s",
        flag,
        len(conversations),
        f" ({refused} refused and dropped, --skip_invalid_samples)" if refused else "",
    )
    report.samples = len(encoded)
    for reason, n in Counter(r for r in encoded["dropped"] if r).items():
        report.drop_sample(reason, n)
    report.change(cut_to_whole_turns(sft_args.model_max_length), sum(encoded["truncated"]))
    kept = encoded.filter(lambda x: len(x["input_ids"]) > 0).remove_columns(
        ["dropped", "truncated"]
    )
    extra = len(encoded) - len(conversations)
    if (
        extra and sft_args.multi_turn_mode != "split"
    ):  # the template rewrites history (masking.encode_samples)
        logger.info(
            "%s: conversations split one answer per sample "
            "added %d samples (%d conversations -> %d samples)",
            flag,
            extra,
            len(conversations),
            len(encoded),
        )
    if len(kept) == 0:
        raise UserError(
            f"{flag} {shown(directory)}: {report.read} conversations read, no sample kept "
            f"({report.reasons()}); raise --model_max_length or shorten the data."
        )
    return kept, report


def sanity_table(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The seed's 'Sanity Check' table: token text, id, and label (-100 = not trained)."""
    rows = [f"{'token':>20}  {'id':>7}  label"]
    for tok, label in zip(input_ids, labels):
        text = repr(tokenizer.decode([tok]))
        rows.append(f"{text:>20}  {tok:>7}  {label if label != IGNORE_INDEX else -100}")
    return "\n".join(rows)
