"""Tokenized preference datasets for RM and DPO, rendered with the same template as SFT.

DPO/KTO: a prompt is rendered up to the generation prompt; an answer is the assistant text plus the
token that ends the turn (what SFT trains and the policy generates). The full text is tokenized in
one pass and split at the prompt. RM: each side is the whole conversation exactly as the tokenizer's
chat template renders it, so scoring `apply_chat_template(...)` output later reads the trained
position.
"""

from __future__ import annotations

import functools
import json
import logging

from datasets import Dataset

from pipeline.data.files import cap, load_train_eval, shown
from pipeline.data.json_text import parse_json
from pipeline.data.preferences import read_preferences
from pipeline.data.rendering import TokenizerTemplate, render_segments
from pipeline.data.summary import DataSummary
from pipeline.errors import UserError

logger = logging.getLogger(__name__)


def split_texts(
    template: TokenizerTemplate, prompt: list[dict], answer: str, tools=None
) -> tuple[str, str]:
    """(prompt text ending with the generation prompt, answer text ending with the turn end)."""
    segments = render_segments(
        template, prompt + [{"role": "assistant", "content": answer}], tools, last_answer_only=True
    )
    k = max(i for i, s in enumerate(segments) if s.kind == "answer")
    closing = "" if template.turn_end else template.final_turn_end
    return "".join(s.text for s in segments[:k]), segments[k].text + closing


def tokenize_answer(tokenizer, prompt_text: str, answer_text: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt_text + answer_text, add_special_tokens=False)["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full[len(prompt_ids) :]
    return prompt_ids, tokenizer(answer_text, add_special_tokens=False)[
        "input_ids"
    ]  # a token straddled the boundary


def _conversation_ids(tokenizer, template, prompt, answer, tools) -> tuple[list[int], list[int]]:
    messages = prompt + [{"role": "assistant", "content": answer}]
    text = "".join(
        s.text for s in render_segments(template, messages, tools, last_answer_only=True)
    )
    return [], tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode(batch, template, tokenizer, max_length, unpaired, whole):
    out = (
        {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "margin": []}
        if not unpaired
        else {"prompt_ids": [], "completion_ids": [], "label": []}
    )
    for text in batch["pair"]:
        pair = parse_json(text, "an encoded preference pair")
        answers = [pair["completion"]] if unpaired else [pair["chosen"], pair["rejected"]]
        encoded = []
        for answer in answers:
            if whole:
                encoded.append(
                    _conversation_ids(
                        tokenizer, template, pair["prompt"], answer, pair.get("tools")
                    )
                )
                continue
            prompt_text, answer_text = split_texts(
                template, pair["prompt"], answer, pair.get("tools")
            )
            encoded.append(tokenize_answer(tokenizer, prompt_text, answer_text))
        too_long = max(len(p) + len(a) for p, a in encoded) > max_length
        out["prompt_ids"].append(None if too_long else encoded[0][0])
        if unpaired:
            out["completion_ids"].append(encoded[0][1])
            out["label"].append(pair["label"])
        else:
            out["chosen_ids"].append(encoded[0][1])
            out["rejected_ids"].append(encoded[1][1])
            out["margin"].append(pair.get("margin", 0.0))
    return out


def build_preference_dataset(
    directory: str,
    flag: str,
    template: TokenizerTemplate,
    tokenizer,
    max_length: int,
    unpaired: bool = False,
    skip_invalid: bool = False,
    num_proc: int | None = None,
    whole_conversations: bool = False,
) -> tuple[Dataset, DataSummary]:
    """whole_conversations=True (RM): chosen_ids/rejected_ids are full rendered conversations,
    prompt_ids empty. A pair (KTO: an answer) longer than max_length is dropped whole and counted:
    no answer is ever cut."""
    pairs, read = read_preferences(directory, flag, unpaired, skip_invalid)
    if not pairs:
        raise UserError(
            f"{flag} {shown(directory)}: no usable preference record ({read.summary('records')})."
        )
    report = DataSummary.after_reading(read, "records", "answers" if unpaired else "pairs")
    report.samples = len(pairs)  # KTO: a pair record gives two answers
    raw = Dataset.from_dict({"pair": [json.dumps(p, ensure_ascii=False) for p in pairs]})
    encoded = raw.map(
        functools.partial(
            _encode,
            template=template,
            tokenizer=tokenizer,
            max_length=max_length,
            unpaired=unpaired,
            whole=whole_conversations,
        ),
        batched=True,
        remove_columns=["pair"],
        num_proc=num_proc,
        load_from_cache_file=False,
    )
    kept = encoded.filter(lambda x: x["prompt_ids"] is not None)
    report.drop_sample(f"longer than --model_max_length {max_length}", len(encoded) - len(kept))
    if len(kept) == 0:
        raise UserError(
            f"{flag} {shown(directory)}: {report.read} records read, none fits "
            f"({report.reasons()}); raise "
            "--model_max_length or shorten the data."
        )
    return kept, report


def preference_datasets(
    template: TokenizerTemplate,
    tokenizer,
    pref_args,
    data_args,
    training_args,
    unpaired: bool = False,
    whole_conversations: bool = False,
) -> tuple[Dataset, Dataset | None]:
    """Train and eval preference datasets for a stage, with the read/kept/dropped summary and sample
    caps."""
    unit = "answers" if unpaired else "pairs"

    def load(directory: str, flag: str) -> Dataset:
        dataset, report = build_preference_dataset(
            directory,
            flag,
            template,
            tokenizer,
            pref_args.model_max_length,
            unpaired,
            pref_args.skip_invalid_samples,
            data_args.preprocessing_num_workers,
            whole_conversations,
        )
        logger.info(report.summary(flag))
        return dataset

    with training_args.main_process_first(desc=f"encoding {unit}"):
        train, evaluation = load_train_eval(load, data_args, training_args, unit)
    return (
        cap(train, data_args.max_train_samples, "--max_train_samples", unit),
        cap(evaluation, data_args.max_eval_samples, "--max_eval_samples", unit),
    )
