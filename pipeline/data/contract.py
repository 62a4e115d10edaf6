"""The contract between training and inference, checked before every SFT run: for the first conversations,
the ids the stage trains on equal what the saved tokenizer's `apply_chat_template(messages, tools=...)` gives,
and the prompt of the last answer equals `apply_chat_template(..., add_generation_prompt=True)`. A difference
stops the run with the first differing token shown: nobody trains a silent mismatch."""

from __future__ import annotations

from pipeline.data.masking import Dropped, assistant_indices, encode
from pipeline.data.own_template import NotPrefixConsistent, standard_messages
from pipeline.data.templates import Template
from pipeline.errors import UserError


def _chat_ids(tokenizer, messages, tools, add_generation_prompt=False) -> list[int]:
    return list(tokenizer.apply_chat_template(standard_messages(messages), tools=tools or None, tokenize=True,
                                              return_dict=False, add_generation_prompt=add_generation_prompt))


def _first_difference(tokenizer, trained: list[int], expected: list[int], what: str) -> str:
    k = next((i for i, (a, b) in enumerate(zip(trained, expected)) if a != b), min(len(trained), len(expected)))
    show = lambda ids: repr(tokenizer.decode(ids[max(0, k - 3): k + 3]))  # noqa: E731
    return (f"{what}: training ids differ from the tokenizer's apply_chat_template at token {k} "
            f"(training {show(trained)}, chat template {show(expected)})")


def check_chat_contract(template, tokenizer, conversations: list[dict], count: int = 4) -> int:
    """Check the first `count` conversations (each as the last answer's sample: the prompt inference builds
    for it, then the answer). Returns how many were checked; raises UserError on the first difference."""
    closing = [] if not isinstance(template, Template) or template.turn_end or not template.final_turn_end else \
        tokenizer(template.final_turn_end, add_special_tokens=False)["input_ids"]
    checked = 0
    for n, conv in enumerate(conversations[:count]):
        messages, tools = conv["messages"], conv.get("tools")
        answers = assistant_indices(messages)
        if not answers:
            continue
        messages = messages[: answers[-1] + 1]
        try:
            sample = encode(template, tokenizer, messages, tools)
        except NotPrefixConsistent:
            continue
        if isinstance(sample, Dropped):
            continue
        trained = sample.input_ids[: len(sample.input_ids) - len(closing)] if closing else sample.input_ids
        expected = _chat_ids(tokenizer, messages, tools)
        if trained != expected:
            raise UserError(_first_difference(tokenizer, trained, expected, f"conversation {n + 1}") +
                            f"; template '{template.name}' does not render as the saved chat template")
        prompt = _chat_ids(tokenizer, messages[:-1], tools, add_generation_prompt=True)
        if trained[: len(prompt)] != prompt:
            raise UserError(_first_difference(tokenizer, trained[: len(prompt)], prompt, f"conversation {n + 1}") +
                            " in the prompt with the generation prompt")
        checked += 1
    return checked
