"""The one place SFT labels are made: render a conversation with its template, tokenize the whole
text once, and keep labels only on trained characters.

Trained by default: each assistant turn's text after the generation prompt plus the text that ends
the turn (e.g. "<|im_end|>"); for templates whose turns are ended by the next role tag (GLM,
Baichuan2) the first token of the next turn, or the template's final_turn_end after the last turn. A
message's own "loss" flag overrides its role's default; train_on_inputs trains every token.

Because the full text is tokenized in one pass, training ids equal what tokenizing the chat
template's output gives at inference: no double BOS, no different splits at turn boundaries.

Over max_length, a sample is cut after its last whole assistant turn that fits, or dropped when not
even its first trained answer fits; the caller counts both by reason (chat_dataset.py).
"""

from __future__ import annotations

import bisect
import logging
import weakref
from dataclasses import dataclass, field

from pipeline.data.rendering import NotPrefixConsistent, TokenizerTemplate, render_segments
from pipeline.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value the loss ignores; defined once for the whole project
MULTI_TURN_MODES = ("all", "last", "split")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = (
        False  # cut after the last whole turn within max_length (the data summary counts it)
    )


@dataclass(frozen=True)
class Dropped:
    """A conversation (or one answer's sample of it) that gives no sample; the data summary counts
    the reason."""

    reason: str


NOTHING_TO_TRAIN = "nothing to train (its answers are marked loss: false)"


def too_long(max_length: int) -> str:
    return f"prompt + first trained answer longer than --model_max_length {max_length}"


def cut_to_whole_turns(max_length: int) -> str:
    return f"cut after the last whole turn within --model_max_length {max_length}"


def _trained(
    kind: str, role: str, loss: bool | None, is_target: bool, train_on_inputs: bool
) -> bool:
    if train_on_inputs:
        return True
    if loss is not None and role != "assistant":
        return loss
    return kind == "answer" and is_target and (loss is None or loss)


@dataclass
class _Layout:
    text: str
    spans: list  # trained (start, end) char ranges
    answers: list  # (start, end) of each trained answer: where inference generates
    # char offsets of answer ends whose next token is trained (turns ended by the next role tag)
    next_token: list
    ends: list  # char offsets where a whole assistant message ends: a sample may be cut there
    closing: set = field(
        default_factory=set
    )  # answer ends whose turn the next token closes (trained or not)
    final: str = ""  # the training-only close appended after the last answer (final_turn_end)


def _lay_out(template, segments, messages, targets, train_on_inputs) -> _Layout:
    """The text, its trained char ranges, its trained answers, and where whole assistant messages
    end."""
    out = _Layout("", [], [], [], [])
    last_answer = {seg.message: k for k, seg in enumerate(segments) if seg.kind == "answer"}
    for k, seg in enumerate(segments):
        start = len(out.text)
        out.text += seg.text
        m = messages[seg.message] if seg.message >= 0 else {"role": "template"}
        is_target = targets is None or seg.message in targets
        if _trained(seg.kind, m["role"], m.get("loss"), is_target, train_on_inputs):
            out.spans.append((start, len(out.text)))
        if seg.kind == "answer" and _trained(seg.kind, m["role"], m.get("loss"), is_target, False):
            out.answers.append((start, len(out.text)))
            if not template.turn_end:
                out.next_token.append(len(out.text))
        if seg.kind == "answer" and not template.turn_end:
            out.closing.add(len(out.text))
        # a cut may follow a whole assistant message only: never inside it (a second tool call, say)
        if (
            m["role"] == "assistant"
            and seg.kind in ("answer", "tail")
            and k >= last_answer.get(seg.message, k)
        ):
            out.ends.append(len(out.text))
    if len(out.text) in out.closing:
        out.final = (
            template.final_turn_end
        )  # training-only close of the last turn (GLM: <|endoftext|>)
        out.text += out.final
    return out


def encode(
    template: TokenizerTemplate,
    tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    targets: set[int] | None = None,
    train_on_inputs: bool = False,
    max_length: int | None = None,
) -> Encoded | Dropped:
    """ids + labels for one conversation; `targets` = indices of assistant messages to train
    (None = all).

    The ids are what inference gives: before each trained answer, exactly the ids of its prompt
    tokenized alone (the text `apply_chat_template(..., add_generation_prompt=True)` writes); then
    the answer's own tokens, ending with the token that ends its turn (exact_ids). Raises
    NotPrefixConsistent when one sample cannot hold every answer that way (the caller trains one
    answer per sample).

    Longer than `max_length`: cut after the last whole assistant turn (its closing token included)
    that fits and trains something; when not even the first trained answer fits, Dropped (an answer
    is never trained cut short, nor without the token that ends it). Dropped too when nothing is
    trained at all.
    """
    answers = assistant_indices(messages)
    last_only = targets is not None and answers and targets == {answers[-1]}
    segments = render_segments(
        template, messages, tools, add_generation_prompt=False, last_answer_only=last_only
    )
    lay = _lay_out(template, segments, messages, targets, train_on_inputs)
    if not lay.spans:
        return Dropped(NOTHING_TO_TRAIN)
    exact = exact_ids(tokenizer, lay)
    labels = _labels(exact, lay.spans)
    if all(label == IGNORE_INDEX for label in labels):
        return Dropped(NOTHING_TO_TRAIN)
    if max_length is None or len(exact.ids) <= max_length:
        return Encoded(exact.ids, labels)
    cut = next(
        (
            n
            for n in (
                sum(1 for s, _ in exact.offsets if s < end) + (end in lay.closing)
                for end in reversed(lay.ends)
            )
            if n <= max_length and any(label != IGNORE_INDEX for label in labels[:n])
        ),
        None,
    )
    if cut is None:
        return Dropped(too_long(max_length))
    return Encoded(exact.ids[:cut], labels[:cut], truncated=True)


@dataclass
class _Exact:
    ids: list[int]
    offsets: list[tuple[int, int]]
    next_token: set[int]  # token indices trained as the token that ends the turn before them


def _labels(exact: _Exact, spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where it overlaps a trained char range or closes a turn, else IGNORE_INDEX
    (token offsets ascend, so each range's tokens are found by bisection)."""
    trained = [False] * len(exact.ids)
    starts, ends = [s for s, _ in exact.offsets], [e for _, e in exact.offsets]
    for a, b in spans:
        for k in range(bisect.bisect_right(ends, a), bisect.bisect_left(starts, b)):
            trained[k] = True
    for k in exact.next_token:
        trained[k] = True
    return [tok if t else IGNORE_INDEX for tok, t in zip(exact.ids, trained)]


def _tokenize(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]] | None]]:
    if tokenizer.is_fast:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [
            (list(i), [tuple(o) for o in off])
            for i, off in zip(enc["input_ids"], enc["offset_mapping"])
        ]
    return [(list(tokenizer(t, add_special_tokens=False)["input_ids"]), None) for t in texts]


_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _facts(tokenizer) -> dict:
    """What encoding asks of a tokenizer on every sample, worked out once per tokenizer and
    vocabulary size (adding tokens changes them): its special token strings, longest first, and
    `_splitters`."""
    facts = _FACTS.get(tokenizer)
    if facts is None or facts["size"] != len(tokenizer):
        special = set(tokenizer.all_special_tokens) | {
            a.content for a in tokenizer.added_tokens_decoder.values() if a.special
        }
        special |= {tokenizer.eos_token} if tokenizer.eos_token else set()
        added = tokenizer.added_tokens_decoder if tokenizer.is_fast else {}
        plain = added and all(not (t.lstrip or t.rstrip or t.normalized) for t in added.values())
        facts = {
            "size": len(tokenizer),
            "special": tuple(sorted((t for t in special if t), key=len, reverse=True)),
            "splitters": frozenset(added) if plain else None,
        }
        _FACTS[tokenizer] = facts
    return facts


def _splitters(tokenizer) -> frozenset | None:
    """The ids of added tokens a fast tokenizer splits the text at before anything else, when each
    piece between them is then tokenized on its own (no added token strips whitespace or is
    normalized); None when that does not hold (prefixes are then tokenized whole)."""
    return _facts(tokenizer)["splitters"]


def _prefix_tokens(tokenizer, text: str, points: list[int]):
    """The tokenization of each `text[:p]`, as tokenizing it alone gives. A fast tokenizer splits at
    its added tokens first and tokenizes each piece on its own, so a prefix's tokens are the whole
    text's tokens up to the last added token that ends within it, then its last piece tokenized
    alone: linear in the text, not quadratic as tokenizing every prefix whole would be."""
    splitters = _splitters(tokenizer)
    if splitters is None or len(points) < 3:
        return _tokenize(tokenizer, [text[:p] for p in points])
    [(ids, offsets)] = _tokenize(tokenizer, [text])
    ends = [(e, k + 1) for k, (i, (_, e)) in enumerate(zip(ids, offsets)) if i in splitters]
    cuts = []
    for p in points:
        j = bisect.bisect_right(ends, (p, len(ids) + 1)) - 1
        cuts.append(ends[j] if j >= 0 else (0, 0))
    tails = _tokenize(tokenizer, [text[s:p] for (s, _), p in zip(cuts, points)])
    return [
        (ids[:n] + t_ids, offsets[:n] + [(a + s, b + s) for a, b in t_off])
        for (s, n), (t_ids, t_off) in zip(cuts, tails)
    ]


def exact_ids(tokenizer, lay: _Layout) -> _Exact:
    """The ids inference gives, built answer by answer: at each answer's start the ids of the prompt
    tokenized alone (a sample whose earlier ids are not a prefix of them cannot hold this answer:
    NotPrefixConsistent); then the answer tokenized after its prompt, or alone where a token would
    straddle the two (the prompt ending 'Assistant: ', the answer 'I am': inference generates after
    the prompt's own last token); then the token that ends it, by its id (a tokenizer whose EOS is
    not in its splitting table, as ChatGLM3's, would otherwise write '</s>' as text pieces merged
    with the answer's last character)."""
    text = lay.text
    marks = []  # (where a piece of text ends, the end token written by id after it)
    for a, b in lay.answers:
        end = _special_ending(tokenizer, text[a:b])
        marks += [(a, None), (b - len(end) if end else b, end)]
    final = lay.final if lay.final and _special_ending(tokenizer, lay.final) == lay.final else None
    marks.append((len(text) - len(final) if final else len(text), final))
    done, start = _Exact([], [], set()), 0
    for n, ((pos, end), (p_ids, p_off)) in enumerate(
        zip(marks, _prefix_tokens(tokenizer, text, [p for p, _ in marks]))
    ):
        if p_ids[: len(done.ids)] != done.ids:
            if n % 2 == 0 and n < len(marks) - 1:  # a prompt that rewrites what the sample holds
                raise NotPrefixConsistent(n // 2)
            p_ids, p_off = _tokenize(tokenizer, [text[start:pos]])[0]
            p_off = (
                None if p_off is None else done.offsets + [(s + start, e + start) for s, e in p_off]
            )
            p_ids = done.ids + p_ids
        new = len(p_ids) - len(done.ids)
        offsets = (
            p_off[len(done.ids) :]
            if p_off is not None
            else _piece_offsets(tokenizer, text, start, pos, new, lay)
        )
        if n and start in lay.next_token and (new or end):
            done.next_token.add(len(done.ids))
        done.ids, done.offsets = list(p_ids), done.offsets + offsets
        if end:
            done.ids.append(tokenizer.convert_tokens_to_ids(end))
            done.offsets.append((pos, pos + len(end)))
        start = pos + len(end or "")
    return done


def _piece_offsets(
    tokenizer, text: str, start: int, end: int, count: int, lay: _Layout
) -> list[tuple[int, int]]:
    """Char ranges of `count` new tokens of a slow tokenizer (no offsets): split where labels
    change, by the token counts of the text's prefixes there."""
    cuts = sorted(
        {
            start,
            end,
            *(x for x in [*lay.ends, *(y for sp in lay.spans for y in sp)] if start < x < end),
        }
    )
    if len(cuts) == 2:
        return [(start, end)] * count
    base = len(tokenizer(text[:start], add_special_tokens=False)["input_ids"]) if start else 0
    out = []
    for a, b in zip(cuts, cuts[1:]):
        upto = (
            count
            if b == end
            else min(count, len(tokenizer(text[:b], add_special_tokens=False)["input_ids"]) - base)
        )
        out += [(a, b)] * max(0, upto - len(out))
    return out


def _special_ending(tokenizer, text: str) -> str | None:
    return next((t for t in _facts(tokenizer)["special"] if text.endswith(t)), None)


_SAID: set[str] = set()


def _say_split_once(template) -> None:
    if template.name not in _SAID:
        _SAID.add(template.name)
        logger.warning(
            "the %s chat template renders earlier turns differently once later turns follow (it "
            "drops earlier thinking, moves the system prompt, or joins history as FastChat's Yuan2 "
            "does): such conversations are trained one answer per sample, each in the text "
            "inference builds for it (the data summary counts the samples made)",
            template.name,
        )


def assistant_indices(messages: list[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def encode_samples(
    template: TokenizerTemplate,
    tokenizer,
    conv: dict,
    mode: str = "all",
    train_on_inputs: bool = False,
    max_length: int | None = None,
) -> list[Encoded | Dropped]:
    """One conversation -> samples for the multi-turn mode: all turns, the last turn, or one per
    turn."""
    messages, tools = conv["messages"], conv.get("tools")
    turns = assistant_indices(messages)
    if mode == "all":
        try:
            return [encode(template, tokenizer, messages, tools, None, train_on_inputs, max_length)]
        except (
            NotPrefixConsistent
        ):  # the template rewrites earlier turns: each answer in its own text
            _say_split_once(template)
            mode = "split"
    try:
        if mode == "last":
            return [
                encode(
                    template, tokenizer, messages, tools, {turns[-1]}, train_on_inputs, max_length
                )
            ]
        return [
            encode(template, tokenizer, messages[: i + 1], tools, {i}, train_on_inputs, max_length)
            for i in turns
        ]
    except (
        NotPrefixConsistent
    ) as e:  # even alone, the answer's text does not follow its generation prompt
        raise UserError(
            f"the {template.name} chat template writes answer {e.args[0]} after a prompt other "
            "than the one it builds for generating it, so no sample can be trained in the text "
            "inference sees; train such conversations with a project template for the family "
            "(--template_name; mistral_v0_3 and deepseek_r1 follow the official prompts of Mistral "
            "v0.3 and DeepSeek-R1) or drop them (--skip_invalid_samples True)."
        ) from e
