"""The one place SFT labels are made: render a conversation with its template, tokenize the whole text
once, and keep labels only on trained characters.

Trained by default: each assistant turn's text after the generation prompt plus the text that ends the
turn (e.g. "<|im_end|>"); for templates whose turns are ended by the next role tag (GLM, Baichuan2) the
first token of the next turn, or the template's final_turn_end after the last turn. A message's own
"loss" flag overrides its role's default; train_on_inputs trains every token.

Because the full text is tokenized in one pass, training ids equal what tokenizing the chat template's
output gives at inference: no double BOS, no different splits at turn boundaries.

Over max_length, a sample is cut after its last whole assistant turn that fits, or dropped when not even its
first trained answer fits; the caller counts both by reason (chat_dataset.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.data.own_template import NotPrefixConsistent
from pipeline.data.templates import Template, render_segments
from pipeline.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value the loss ignores; defined once for the whole project
MULTI_TURN_MODES = ("all", "last", "split")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # cut after the last whole turn within max_length (the data summary counts it)


@dataclass(frozen=True)
class Dropped:
    """A conversation (or one answer's sample of it) that gives no sample; the data summary counts the reason."""

    reason: str


NOTHING_TO_TRAIN = "nothing to train (its answers are marked loss: false)"


def too_long(max_length: int) -> str:
    return f"prompt + first trained answer longer than --model_max_length {max_length}"


def cut_to_whole_turns(max_length: int) -> str:
    return f"cut after the last whole turn within --model_max_length {max_length}"


def _trained(kind: str, role: str, loss: bool | None, is_target: bool, train_on_inputs: bool) -> bool:
    if train_on_inputs:
        return True
    if loss is not None and role != "assistant":
        return loss
    return kind == "answer" and is_target and (loss is None or loss)


def _lay_out(template, segments, messages, targets, train_on_inputs):
    """The text, its trained char ranges, the char offsets where a whole assistant turn ends (after the
    message's last answer, its closing text included) and the offsets whose token is trained (turns ended by
    the next role tag)."""
    text, spans, ends, next_token_at = "", [], [], []
    last_answer = {seg.message: k for k, seg in enumerate(segments) if seg.kind == "answer"}
    for k, seg in enumerate(segments):
        start = len(text)
        text += seg.text
        m = messages[seg.message] if seg.message >= 0 else {"role": "template"}
        is_target = targets is None or seg.message in targets
        if _trained(seg.kind, m["role"], m.get("loss"), is_target, train_on_inputs):
            spans.append((start, len(text)))
            if seg.kind == "answer" and not template.turn_end:
                next_token_at.append(len(text))
        # a cut may follow a whole assistant message only: never inside it (a second tool call, say)
        if m["role"] == "assistant" and seg.kind in ("answer", "tail") and k >= last_answer.get(seg.message, k):
            ends.append(len(text))
    if next_token_at and next_token_at[-1] == len(text):
        text += template.final_turn_end  # training-only close of the last turn (GLM: <|endoftext|>)
    return text, spans, ends, next_token_at


def encode(template: Template, tokenizer, messages: list[dict], tools: list[dict] | None = None,
           targets: set[int] | None = None, train_on_inputs: bool = False,
           max_length: int | None = None) -> Encoded | Dropped:
    """ids + labels for one conversation; `targets` = indices of assistant messages to train (None = all).

    Longer than `max_length`: cut after the last whole assistant turn (its closing token included) that fits
    and trains something; when not even the first trained answer fits, Dropped (an answer is never trained
    cut short, nor without the token that ends it). Dropped too when nothing is trained at all.
    """
    answers = assistant_indices(messages)
    last_only = targets is not None and answers and targets == {answers[-1]}
    segments = render_segments(template, messages, tools, add_generation_prompt=False, last_answer_only=last_only)
    text, spans, ends, next_token_at = _lay_out(template, segments, messages, targets, train_on_inputs)
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    else:
        cuts = sorted({0, len(text), *ends, *next_token_at, *(x for sp in spans for x in sp)})
        ids, offsets = _tokenize_by_piece(tokenizer, text, cuts)
    labels = []
    for tok, (s, e) in zip(ids, offsets):
        trained = any(s < b and e > a for a, b in spans) or any(s <= p < max(e, s + 1) for p in next_token_at)
        labels.append(tok if trained else IGNORE_INDEX)
    if all(label == IGNORE_INDEX for label in labels):
        return Dropped(NOTHING_TO_TRAIN)
    if max_length is None or len(ids) <= max_length:
        return Encoded(ids, labels)
    cut = _whole_turn_cut(labels, offsets, ends, next_token_at, max_length)
    if cut is None:
        return Dropped(too_long(max_length))
    return Encoded(ids[:cut], labels[:cut], truncated=True)


def _tokenize_by_piece(tokenizer, text: str, cuts: list[int]):
    """Slow (Python) tokenizers have no offsets: tokenize between label boundaries and give each
    token its piece's span. Boundaries sit at template tags, where tokenizers split anyway."""
    ids, offsets = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        offsets += [(a, b)] * len(piece)
    return ids, offsets


def _whole_turn_cut(labels, offsets, turn_ends, next_token_at, max_length) -> int | None:
    """How many tokens to keep: through the last whole assistant turn (with its closing token) that fits and
    trains something; None when there is none."""
    for end in reversed(turn_ends):
        n = sum(1 for s, _ in offsets if s < end) + (1 if end in next_token_at else 0)
        if n <= max_length and any(label != IGNORE_INDEX for label in labels[:n]):
            return n
    return None


_SAID: set[str] = set()


def _say_split_once(template) -> None:
    if template.name not in _SAID:
        _SAID.add(template.name)
        logger.warning("the %s chat template renders earlier turns differently once later turns follow (it drops "
                       "earlier thinking, moves the system prompt, or joins history as FastChat's Yuan2 does): such "
                       "conversations are trained one answer per sample, each in the text inference builds for it "
                       "(the data summary counts the samples made)", template.name)


def assistant_indices(messages: list[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def encode_samples(template: Template, tokenizer, conv: dict, mode: str = "all", train_on_inputs: bool = False,
                   max_length: int | None = None) -> list[Encoded | Dropped]:
    """One conversation -> samples for the multi-turn mode: all turns, the last turn, or one per turn."""
    messages, tools = conv["messages"], conv.get("tools")
    turns = assistant_indices(messages)
    if mode == "all" and getattr(template, "history_join", None) is not None and len(turns) > 1:
        _say_split_once(template)  # earlier answers are written as history, not as answers
        mode = "split"
    if mode == "all":
        try:
            return [encode(template, tokenizer, messages, tools, None, train_on_inputs, max_length)]
        except NotPrefixConsistent:  # the template rewrites earlier turns: each answer in its own text
            _say_split_once(template)
            mode = "split"
    try:
        if mode == "last":
            return [encode(template, tokenizer, messages, tools, {turns[-1]}, train_on_inputs, max_length)]
        return [encode(template, tokenizer, messages[: i + 1], tools, {i}, train_on_inputs, max_length) for i in turns]
    except NotPrefixConsistent as e:  # even alone, the answer's text does not follow its generation prompt
        raise UserError(
            f"the {template.name} chat template writes answer {e.args[0]} after a prompt other than the one it builds "
            "for generating it (Mistral v0.3 drops the system prompt once an answer follows; DeepSeek-R1 pre-fills "
            "<think> and strips the reasoning), so no sample can be trained in the text inference sees; use the "
            "project template for the family (--template_name mistral_v0_3 or deepseek_r1), whose prompts equal "
            "the official ones.") from e
