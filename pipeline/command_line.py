"""The parser of every command that is not a training stage (chat, serve, webui, predict, evaluate,
report, preview, convert, the pipeline config, merge_peft_adapter.py): its flags read as the stages
read theirs (HfArgumentParser, pipeline/args/parsing.py), so one way of typing works everywhere.
It imports nothing heavy: `--help` of a light command stays instant.

- each long flag answers to both spellings, `--trust_remote_code` and `--trust-remote-code`;
- a switch is given bare or with a value, `--trust_remote_code`, `--trust_remote_code True`,
  `--trust_remote_code=false` (a value that is not a truth word is the next operand, not the
  switch's: `--check-flags configs/x.yaml` still reads the file);
- no abbreviations (`--model` is never `--model_max_length`), and `--flag -1` keeps -1 as a value.

Declare switches with `action="store_true"`, as argparse has it; `command_parser` turns them into
switches of this kind.
"""

from __future__ import annotations

import argparse
import re
import sys

TRUE_WORDS, FALSE_WORDS = {"true", "yes", "t", "y", "1"}, {"false", "no", "f", "n", "0"}
TRUTH_WORDS = TRUE_WORDS | FALSE_WORDS
_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan", re.IGNORECASE)


def truth(value: str | bool) -> bool:
    """A switch's value, read as HfArgumentParser reads a boolean field."""
    if isinstance(value, bool):
        return value
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"a truth value is expected (True or False), not {value!r}")


def attach_negative_numbers(argv: list[str]) -> list[str]:
    """`--flag -1e-3` as `--flag=-1e-3`: argparse takes a value such as -1e-3 for an unknown option
    otherwise."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NUMBER.fullmatch(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _both_spellings(names: tuple[str, ...]) -> list[str]:
    out = list(names)
    for name in names:
        if name.startswith("--"):
            for other in (name.replace("_", "-"), "--" + name[2:].replace("-", "_")):
                if other not in out:
                    out.append(other)
    return out


class _Spellings:
    """add_argument with both spellings, and store_true as a switch that takes a truth value."""

    def add_argument(self, *names, **kwargs):
        if kwargs.get("action") == "store_true":
            kwargs.pop("action")
            kwargs.update(type=truth, nargs="?", const=True, metavar="True|False")
            kwargs.setdefault("default", False)
        return super().add_argument(*_both_spellings(names), **kwargs)


class _Group(_Spellings, argparse._ArgumentGroup):
    pass


class CommandParser(_Spellings, argparse.ArgumentParser):
    def add_argument_group(self, *args, **kwargs):
        group = _Group(self, *args, **kwargs)
        self._action_groups.append(group)
        return group

    def _switches(self) -> set[str]:
        return {
            name
            for action in self._actions
            if action.type is truth
            for name in action.option_strings
        }

    def parse_known_args(self, args=None, namespace=None):
        """A bare switch is given the value True; a switch followed by a truth word takes it."""
        argv = list(sys.argv[1:] if args is None else args)
        switches, out, k = self._switches(), [], 0
        while k < len(argv):
            token = argv[k]
            if token in switches:
                following = argv[k + 1] if k + 1 < len(argv) else None
                if following is not None and following.lower() in TRUTH_WORDS:
                    out.append(f"{token}={following}")
                    k += 2
                    continue
                out.append(f"{token}=True")
            else:
                out.append(token)
            k += 1
        return super().parse_known_args(attach_negative_numbers(out), namespace)


def command_parser(**kwargs) -> CommandParser:
    """An argparse parser for a command, reading flags as the stages do (see the module text)."""
    kwargs.setdefault("allow_abbrev", False)
    return CommandParser(**kwargs)
