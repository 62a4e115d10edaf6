"""Parsing JSON that a user wrote (data files, strings inside records, request bodies), so that
whatever json.loads cannot turn into usable data is a json.JSONDecodeError with a line and column,
not a crash.

json.loads itself raises RecursionError for deep nesting, ValueError for an integer longer than
Python converts (4300 digits by default), and accepts lone UTF-16 surrogates ("\\ud800") that no
tokenizer, Arrow table or UTF-8 encoder takes. `loads` turns all three into a `JSONLimitError` (a
JSONDecodeError: every caller that handles bad JSON handles these) and caps nesting at
MAX_JSON_DEPTH, well under the recursion limit, so a value it returns can be dumped and parsed again
anywhere in the pipeline.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from pipeline.errors import UserError

MAX_JSON_DEPTH = (
    100  # objects and lists in one another; real records nest a handful, tool schemas a dozen
)
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?')
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"(\\*)\\u([dD][89a-fA-F][0-9a-fA-F]{2})")


class JSONLimitError(json.JSONDecodeError):
    """Well-formed JSON past what the pipeline takes; `fix` says what to write instead."""

    def __init__(self, msg: str, doc: str, pos: int, fix: str = ""):
        super().__init__(msg, doc, pos)
        self.fix = fix

    def __reduce__(self):
        return self.__class__, (self.msg, self.doc, self.pos, self.fix)


def loads(text: str) -> Any:
    """json.loads, where deep nesting, a too-long integer and a lone surrogate are JSONLimitErrors
    too."""
    try:
        value = json.loads(text)
    except RecursionError as e:
        raise _too_deep(text) from e
    except json.JSONDecodeError:
        raise
    except (
        ValueError
    ) as e:  # the integer digit limit: the one ValueError json.loads raises besides bad syntax
        raise _long_integer(text, e) from e
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH:
        raise _too_deep(text)
    if ("\\u" in text and _has_surrogate(value)) or not _is_text(text):
        raise _lone_surrogate(text)
    return value


def parse_json(text: str, where: str) -> Any:
    """`loads` for a caller with no handler of its own: any problem is a UserError starting with
    `where`."""
    try:
        return loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: {describe(e)}") from e


def describe(e: json.JSONDecodeError) -> str:
    """The problem and its fix, after a caller's "file:line: " (line and column inside the text
    included)."""
    if isinstance(e, JSONLimitError):
        return f"{e.msg} (line {e.lineno} column {e.colno}); {e.fix}."
    return f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the JSON syntax."


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:  # no recursion: the walk must not fail where json.loads did not
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack += [
                    (child, depth + 1)
                    for child in (node.values() if isinstance(node, dict) else node)
                ]
    return deepest


def _is_text(s: str) -> bool:
    """Whether `s` is all characters (UTF-8 encodes every one): no lone surrogate."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _has_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if not node.isascii() and not _is_text(node):
                return True
        elif isinstance(node, dict):
            stack += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            stack += node
    return False


def _too_deep(text: str) -> JSONLimitError:
    depth, pos = 0, 0
    for m in _TOKENS.finditer(text):
        token = m.group()
        depth += 1 if token in "[{" else -1 if token in "]}" else 0
        if depth > MAX_JSON_DEPTH:
            pos = m.start()
            break
    return JSONLimitError(
        f"objects and lists nested more than {MAX_JSON_DEPTH} deep",
        text,
        pos,
        f"flatten the data to at most {MAX_JSON_DEPTH} levels",
    )


def _long_integer(text: str, error: ValueError) -> JSONLimitError:
    limit = (
        sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    )  # Python 3.11+
    for m in _TOKENS.finditer(text):
        token = m.group()
        if (
            limit
            and token[0] in "-0123456789"
            and token.lstrip("-").isdigit()
            and len(token.lstrip("-")) > limit
        ):
            return JSONLimitError(
                f"an integer of {len(token.lstrip('-'))} digits, "
                f"more than the {limit} Python reads",
                text,
                m.start(),
                "write such a number as a string",
            )
    return JSONLimitError(f"a value Python cannot read ({error})", text, 0, "write it as a string")


def _lone_surrogate(text: str) -> JSONLimitError:
    pos, paired_low = 0, -1
    for m in _SURROGATE_ESCAPE.finditer(text):
        if (
            len(m.group(1)) % 2 or m.start(2) == paired_low
        ):  # an escaped backslash, or the low half of a pair
            continue
        high = m.group(2)[1].lower() in "89ab"
        after = _SURROGATE_ESCAPE.match(text, m.end())
        if high and after and not after.group(1) and after.group(2)[1].lower() in "cdef":
            paired_low = after.start(2)
            continue
        pos = m.start() + len(m.group(1))
        break
    else:
        raw = _SURROGATE.search(text)
        pos = raw.start() if raw else 0
    return JSONLimitError(
        "a lone UTF-16 surrogate escape (half of a character) in a string",
        text,
        pos,
        "write the character whole (both halves of its surrogate pair) or remove it",
    )
