"""One way of typing flags for every command: the commands that are not stages parse with
pipeline/command_line.py, which reads flags as the stages' HfArgumentParser does (both spellings, a
switch bare or with a truth value, no abbreviations, negative numbers as values)."""

import ast

import pytest

from pipeline.command_line import command_parser
from tests.helpers import REPO


def commands_files():
    return [
        *REPO.glob("*.py"),
        *(REPO / "pipeline").rglob("*.py"),
        *(REPO / "stages").rglob("*.py"),
    ]


def test_no_command_builds_a_plain_argparse_parser():
    """Every parser of a user's command comes from command_parser (the RL checks' internal finder of
    given flags, which answers no user, is the one plain parser)."""
    plain = []
    for path in commands_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "ArgumentParser"
                and not any(k.arg == "add_help" for k in node.keywords)
                and path.name != "command_line.py"
            ):
                plain.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not plain, plain


def parser():
    p = command_parser(prog="x")
    p.add_argument("config", nargs="?")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--check-flags", action="store_true")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--model_max_length", type=int)
    p.add_argument_group("limits").add_argument("--max_batch", type=int, default=1)
    return p


@pytest.mark.parametrize(
    "argv, trust, check",
    [
        ([], False, False),
        (["--trust_remote_code"], True, False),
        (["--trust-remote-code", "True"], True, False),
        (["--trust_remote_code", "false"], False, False),
        (["--trust_remote_code=no"], False, False),
        (["--check_flags", "c.yaml"], False, True),
        (["--check-flags", "1", "c.yaml"], False, True),
    ],
)
def test_switches_are_given_bare_or_with_a_truth_value(argv, trust, check):
    args = parser().parse_args(argv)
    assert (args.trust_remote_code, args.check_flags) == (trust, check)
    assert args.config == ("c.yaml" if "c.yaml" in argv else None)


def test_both_spellings_negative_values_and_no_abbreviations(capsys):
    args = parser().parse_args(["--top-k", "-1", "--max-batch", "4"])
    assert (args.top_k, args.max_batch) == (-1, 4)
    with pytest.raises(SystemExit):
        parser().parse_args(["--model", "7"])  # not --model_max_length
    assert "unrecognized arguments: --model" in capsys.readouterr().err


def test_a_real_command_reads_the_stage_spelling():
    import merge_peft_adapter

    args = merge_peft_adapter.build_parser().parse_args(
        ["--lora-model", "a", "--output_dir", "b", "--trust_remote_code", "True"]
    )
    assert (args.lora_model, args.output_dir, args.trust_remote_code) == ("a", "b", True)
