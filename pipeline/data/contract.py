"""The contract between training and inference, kept for every conversation of an SFT run.

Each trained answer's ids are its prompt's ids as inference gives them (the text of
`apply_chat_template(messages[:k], tools, add_generation_prompt=True)`, tokenized alone), then the
answer's own tokens, ending with the token that ends its turn: masking.exact_ids builds samples that
way and refuses an answer whose end-of-turn token would not be its own token. What is left to
compare is the text:

- the tokenizer's own template (`auto`, and project templates written as Jinja) renders every prompt
  and answer itself (own_template.py), so its text is the chat template's by construction;
- a project template written as fields is rendered in Python (templates.py); `check_conversation`
  compares that text with the saved chat template's, for the whole conversation and for each
  answer's prompt.

A difference is a UserError (or, with --skip_invalid_samples, a dropped and counted record).
"""

from __future__ import annotations

from pipeline.data.masking import assistant_indices
from pipeline.data.own_template import render as render_with_tokenizer
from pipeline.data.templates import Template, render_segments
from pipeline.errors import UserError

DIFFERS = "renders differently from the saved chat template"


def _python_text(template: Template, messages, tools, add_generation_prompt: bool) -> str:
    return "".join(
        s.text for s in render_segments(template, messages, tools, add_generation_prompt)
    )


def _first_difference(ours: str, theirs: str) -> str:
    k = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))
    )
    return (
        f"at character {k} (training {ours[max(0, k - 12) : k + 12]!r}, "
        f"chat template {theirs[max(0, k - 12) : k + 12]!r})"
    )


def check_conversation(template, tokenizer, messages: list[dict], tools: list[dict] | None) -> None:
    """For a project template written as fields: the text training renders equals the saved chat
    template's, for the conversation and for each answer's prompt with the generation prompt. Other
    templates render through the tokenizer already (nothing to compare)."""
    if not isinstance(template, Template):
        return
    checks = [(messages, False)] + [(messages[:i], True) for i in assistant_indices(messages)]
    for part, generation in checks:
        ours = _python_text(template, part, tools, generation)
        theirs = render_with_tokenizer(tokenizer, part, tools, add_generation_prompt=generation)
        if ours != theirs:
            what = (
                f"the prompt of answer {len(assistant_indices(part)) + 1}"
                if generation
                else "the conversation"
            )
            raise UserError(
                f"template '{template.name}' {DIFFERS} in {what} {_first_difference(ours, theirs)}"
            )
