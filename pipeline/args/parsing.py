"""Reading a command line into the argument classes: a YAML/JSON config file first (or via
--config), the seeds' spellings translated (pipeline/seed_flags.py), negative numbers kept as
values, then the checks that span classes (pipeline/args/checks.py). Unknown flags are an error."""

from __future__ import annotations

import logging
import sys
from typing import Any

from transformers import HfArgumentParser

from pipeline.args.checks import (
    check_numbers,
    check_output_apart,
    check_precision,
    check_template_name,
    check_test_file,
)
from pipeline.command_line import attach_negative_numbers
from pipeline.config_file import config_file_argv
from pipeline.errors import UserError
from pipeline.seed_flags import translate

logger = logging.getLogger(__name__)


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse `[config.yaml] [--config FILE] --flag value ...`, or the GLM demos' `DATA_DIR MODEL
    CONFIG [yes|STEP]` (pipeline/seed_configs.py), into the given dataclasses."""
    argv = config_file_argv(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser(
        dataclass_types, allow_abbrev=False
    )  # --train_file is not --train_file_dir
    argv = attach_negative_numbers(translate(argv, dataclass_types))
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as e:
        raise UserError(f"{e}. Run with --help to list the flags.") from e
    check_numbers(parsed)
    check_step_flags(parsed, {token[2:].split("=", 1)[0] for token in argv if token[:2] == "--"})
    check_output_apart(parsed)
    check_test_file(parsed)
    check_template_name(parsed)
    check_precision(parsed)
    return parsed


STEP_FLAGS = {
    "eval_steps": "eval_strategy",
    "save_steps": "save_strategy",
    "logging_steps": "logging_strategy",
}


def check_step_flags(parsed, given: set[str]) -> None:
    """--eval_steps / --save_steps / --logging_steps are read only under their strategy `steps`.
    Given beside a strategy left at another default (--eval_strategy is "no" unless given) they
    would do nothing: a run meant to evaluate every 100 steps would never evaluate; refused.
    Beside a strategy the command also gives, the strategy is the user's choice: said in the log."""
    for args in parsed:
        for steps, strategy in STEP_FLAGS.items():
            if steps not in given or not hasattr(args, strategy):
                continue
            chosen = getattr(args, strategy)
            chosen = str(getattr(chosen, "value", chosen))
            if chosen == "steps":
                continue
            value = getattr(args, steps)
            value = int(value) if float(value).is_integer() else value
            if strategy in given:
                logger.warning("--%s %s is not read: --%s is %s", steps, value, strategy, chosen)
                continue
            raise UserError(
                f"--{steps} {value} is read only with --{strategy} steps, and --{strategy} is "
                f"{chosen} by default, so it would do nothing: add --{strategy} steps, or drop "
                f"--{steps}."
            )


def given_flags(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> set[str]:
    """Names of the flags a command line gives (config files and the seeds' spellings read as
    parse_args reads them)."""
    argv = translate(
        config_file_argv(list(sys.argv[1:] if argv is None else argv)), dataclass_types
    )
    return {token[2:].split("=", 1)[0] for token in argv if token.startswith("--")}
