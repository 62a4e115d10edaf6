"""Prompts for the RL stages (PPO, GRPO, RLOO), taken from SFT-format data (rule rewards:
pipeline/rl/rewards.py).

Each conversation gives one prompt: every message up to its last user turn (history kept), plus the
reference answer that followed it (used by the exact-match rule reward and the held-out report).
Prompts are rendered with the same template as SFT and tokenized the way inference tokenizes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.data.conversations import read_conversations
from pipeline.data.files import ReadReport, shown
from pipeline.data.rendering import TokenizerTemplate, render_segments
from pipeline.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    messages: list[dict]  # OpenAI-style, ending with a user (or tool) message
    reference: (
        str  # the answer the data gives after it ("" when the conversation ends with the user)
    )
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


def to_prompt(conversation: dict) -> tuple[list[dict], str] | None:
    """(messages up to the last user/tool turn, reference answer after it), or None without a user
    turn."""
    messages = conversation["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] in ("user", "tool")), default=None)
    if last is None:
        return None
    after = messages[last + 1] if last + 1 < len(messages) else None
    reference = (
        after["content"] if after and after["role"] == "assistant" and after.get("content") else ""
    )
    return messages[: last + 1], reference


def load_prompts(
    directory: str,
    flag: str,
    template: TokenizerTemplate,
    tokenizer,
    max_prompt_length: int,
    data_format: str = "auto",
    skip_invalid: bool = False,
) -> tuple[list[Prompt], ReadReport]:
    conversations, report = read_conversations(directory, flag, data_format, skip_invalid)
    prompts = []
    for conv in conversations:
        found = to_prompt(conv)
        if found is None:
            report.drop("no user turn to answer")
            continue
        messages, reference = found
        text = render_text(template, messages, conv.get("tools"), add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            report.drop(
                f"prompt longer than {max_prompt_length} tokens "
                "(--model_max_length - --max_new_tokens)"
            )
            continue
        prompts.append(Prompt(messages, reference, conv.get("tools"), ids))
    logger.info(report.summary(f"{flag} prompts"))
    if not prompts:  # before any model is loaded
        raise UserError(
            f"{flag} {shown(directory)}: no usable prompt ({report.summary('records')}); shorten "
            "the prompts or raise --model_max_length (a prompt may take --model_max_length - "
            "--max_new_tokens tokens)."
        )
    return prompts, report


def load_rl_prompts(
    data_args, ppo_args, template: TokenizerTemplate, tokenizer
) -> tuple[list[Prompt], list[Prompt]]:
    """Training and held-out prompts of an RL stage (held-out only from --validation_file_dir or
    --validation_file), capped by --max_train_samples / --max_eval_samples."""

    def load(directory: str, flag: str) -> list[Prompt]:
        prompts, _ = load_prompts(
            directory,
            flag,
            template,
            tokenizer,
            ppo_args.prompt_budget,
            ppo_args.data_format,
            ppo_args.skip_invalid_samples,
        )
        return prompts

    prompts = load(*data_args.train_source)
    eval_prompts = load(*data_args.validation_source) if data_args.has_validation else []
    return prompts[: data_args.max_train_samples], eval_prompts[: data_args.max_eval_samples]
