"""Prompts for the RL stages (PPO, GRPO, RLOO), taken from SFT-format data (rule rewards:
pipeline/rl/rewards.py).

Each conversation gives one prompt: every message up to its last user turn (history kept), plus the
reference answer that followed it, if any (used by the exact-match rule reward and the held-out
report). A conversation may end with the user (a prompt alone) unless the exact-match reward needs
its answer.
Prompts are rendered with the same template as SFT and tokenized the way inference tokenizes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.args.parsing import split_list
from pipeline.data.conversations import read_conversations
from pipeline.data.files import ReadReport, check_apart, shown
from pipeline.data.rendering import TokenizerTemplate, render_segments
from pipeline.errors import UserError

logger = logging.getLogger(__name__)
NO_REFERENCE = "no reference answer for --reward_funcs exact_match"


@dataclass
class Prompt:
    messages: list[dict]  # OpenAI-style, ending with a user (or tool) message
    reference: str | None  # the answer the data gives after it (None: the data gives none)
    tools: list[dict] | None
    ids: list[int]  # rendered with the generation prompt, tokenized without extra special tokens


def render_text(
    template: TokenizerTemplate,
    messages: list[dict],
    tools=None,
    add_generation_prompt: bool = False,
) -> str:
    return "".join(
        s.text for s in render_segments(template, messages, tools, add_generation_prompt)
    )


def to_prompt(conversation: dict) -> tuple[list[dict], str | None]:
    """(messages up to the last user/tool turn, the reference answer after it or None)."""
    messages = conversation["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] in ("user", "tool"))
    after = messages[last + 1] if last + 1 < len(messages) else None
    answered = after and after["role"] == "assistant" and after.get("content", "").strip()
    return messages[: last + 1], after["content"] if answered else None


def load_prompts(
    directory: str,
    flag: str,
    template: TokenizerTemplate,
    tokenizer,
    max_prompt_length: int,
    data_format: str = "auto",
    skip_invalid: bool = False,
    need_reference: bool = False,
) -> tuple[list[Prompt], ReadReport]:
    """The prompts of a source; with need_reference (the exact-match reward), one without a
    reference answer is an error, or skipped and counted under --skip_invalid_samples."""
    conversations, report = read_conversations(
        directory, flag, data_format, skip_invalid, require_answer=False
    )
    prompts, unanswered = [], 0
    for conv in conversations:
        messages, reference = to_prompt(conv)
        if need_reference and reference is None:
            unanswered += 1
            report.drop(NO_REFERENCE)
            continue
        text = render_text(template, messages, conv.get("tools"), add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            report.drop(
                f"prompt longer than {max_prompt_length} tokens "
                "(--model_max_length - --max_new_tokens)"
            )
            continue
        prompts.append(Prompt(messages, reference, conv.get("tools"), ids))
    if unanswered and not skip_invalid:
        raise UserError(
            f"{flag} {shown(directory)}: {unanswered} of {report.read} conversations end without "
            "an answer after the last user turn, and --reward_funcs exact_match scores each "
            "answer against it; give each its answer, or pass --skip_invalid_samples True to "
            "skip them."
        )
    logger.info(report.summary(f"{flag} prompts"))
    if not prompts:  # before any model is loaded
        too_long = any(reason.startswith("prompt longer than") for reason in report.dropped)
        fix = (
            "shorten the prompts or raise --model_max_length (a prompt may take "
            "--model_max_length - --max_new_tokens tokens)"
            if too_long
            else "give the conversations their answers"
            if NO_REFERENCE in report.dropped
            else "fix the records (each reason is counted above)"
        )
        raise UserError(
            f"{flag} {shown(directory)}: no usable prompt ({report.summary('records')}); {fix}."
        )
    return prompts, report


def load_rl_prompts(
    data_args, ppo_args, template: TokenizerTemplate, tokenizer
) -> tuple[list[Prompt], list[Prompt]]:
    """Training and held-out prompts of an RL stage (held-out only from --validation_file_dir or
    --validation_file), capped by --max_train_samples / --max_eval_samples."""

    def load(directory: str, flag: str, need_reference: bool) -> list[Prompt]:
        prompts, _ = load_prompts(
            directory,
            flag,
            template,
            tokenizer,
            ppo_args.prompt_budget,
            ppo_args.data_format,
            ppo_args.skip_invalid_samples,
            need_reference,
        )
        return prompts

    scored_by_reference = "exact_match" in split_list(ppo_args.reward_funcs or "model")
    check_apart(data_args)

    prompts = load(*data_args.train_source, scored_by_reference)
    # held out: the exact match is reported over the prompts that have a reference answer
    eval_prompts = (
        load(*data_args.validation_source, scored_by_reference) if data_args.has_validation else []
    )
    return prompts[: data_args.max_train_samples], eval_prompts[: data_args.max_eval_samples]
