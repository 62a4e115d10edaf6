"""The run_pipeline.sh config: read a YAML file naming the base model, data, template, method and
per-stage flags, check it, and print it as shell assignments for run_pipeline.sh to `eval`.

    python -m pipeline.tools.pipeline_config configs/pipeline_default.yaml
    python -m pipeline.tools.pipeline_config --check-flags configs/pipeline_default.yaml

The second form parses every stage's flags with that stage's own argument parser (check_flags), so a
typo or bad value in a late stage stops the pipeline before the first stage trains.

Keys (all optional): output_root, base_model (null: build the embedded tiny model), template, method
(full | lora | qlora), stages (a subset of pt sft rm ppo dpo; run in that order, a stage left out
hands its input on), exact_match (held-out exact match of the SFT start and result on
data.sft_eval), data (train / eval folders per stage), flags (per stage: a mapping of extra stage
flags, which win over the pipeline's own; the key `method` there sets that stage's method instead of
the top-level one).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from pipeline.command_line import command_parser
from pipeline.errors import UserError, first_line, run_cli

STAGES = ("pt", "sft", "rm", "ppo", "dpo")
METHODS = {
    "full": ["--use_peft", "False"],
    "lora": ["--use_peft", "True"],
    "qlora": ["--use_peft", "True", "--qlora", "True"],
}
# Folders of the shipped sample data; PPO's prompts are the SFT chats.
DEFAULT_DATA = {
    "pt": "data/pt",
    "pt_eval": "data/pt_eval",
    "sft": "data/sft",
    "sft_eval": "data/sft_eval",
    "rm": "data/reward",
    "rm_eval": "data/reward_eval",
    "ppo": "data/sft",
    "ppo_eval": "data/sft_eval",
    "dpo": "data/reward",
    "dpo_eval": "data/reward_eval",
}
DEFAULTS = {
    "output_root": "outputs/demo",
    "base_model": None,
    "template": "auto",
    "method": "lora",
    "stages": list(STAGES),
    "exact_match": True,
    "data": {},
    "flags": {},
}
# Set from the config's own keys and the chain of stages, so a stage flag may not set them again.
PIPELINE_FLAGS = (
    "model_name_or_path",
    "output_dir",
    "train_file_dir",
    "validation_file_dir",
    "template_name",
    "reward_model_name_or_path",
    "resume_from_checkpoint",
    "config",
)


def load(path: str) -> dict[str, Any]:
    """The config with defaults filled in; every mistake is one UserError naming the key and the
    fix."""
    # Plain YAML, not pipeline.args' reader: that module imports torch, which costs seconds per run.
    if not Path(path).is_file():
        raise UserError(f"pipeline config {path} does not exist.")
    try:
        given = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise UserError(
            f"pipeline config {path} cannot be read ({e.strerror}); make it readable (chmod a+r)."
        ) from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"pipeline config {path} does not parse: {first_line(e)}") from e
    except (
        RecursionError,
        ValueError,
    ) as e:  # nesting past the recursion limit, an integer past 4300 digits
        raise UserError(
            f"pipeline config {path} does not parse ({first_line(e)}); write a flat mapping of "
            "keys to plain values."
        ) from e
    if not isinstance(given, dict):
        raise UserError(f"pipeline config {path} must hold a mapping of keys to values.")
    config = {**DEFAULTS, **given}
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise UserError(
            f"{path}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(DEFAULTS)}."
        )
    if config["method"] not in METHODS:
        raise UserError(
            f"{path}: method must be one of {', '.join(METHODS)}, got {config['method']!r}."
        )
    stages = config["stages"]
    if not isinstance(stages, list) or not stages or set(stages) - set(STAGES):
        raise UserError(
            f"{path}: stages must be a list of some of {', '.join(STAGES)}, got {stages!r}."
        )
    if "ppo" in stages and "rm" not in stages:
        raise UserError(
            f"{path}: stage ppo scores its answers with the rm stage's model; add rm to stages."
        )
    config["data"] = _data_folders(config["data"], path)
    flags = config["flags"]
    config["flags"] = _stage_flags(flags, path)  # checks the shape of `flags` first
    config["stage_methods"] = _stage_methods(flags, config["method"], path)
    return config


def _stage_methods(flags: Any, method: str, path: str) -> dict[str, str]:
    """Each stage's method: flags.<stage>.method where given (e.g. full PPO after a QLoRA SFT), else
    `method`."""
    methods = {}
    for stage in STAGES:
        own = (flags.get(stage) or {}).get("method")
        if own is not None and own not in METHODS:
            raise UserError(
                f"{path}: flags.{stage}.method must be one of {', '.join(METHODS)}, got {own!r}."
            )
        methods[stage] = own or method
    return methods


def _data_folders(data: Any, path: str) -> dict[str, str | None]:
    if not isinstance(data, dict) or set(data) - set(DEFAULT_DATA):
        raise UserError(f"{path}: data must map some of {', '.join(DEFAULT_DATA)} to folders.")
    folders = {**DEFAULT_DATA, **data}
    for key, folder in folders.items():
        if folder is not None and not Path(folder).is_dir():
            raise UserError(
                f"{path}: data.{key} folder {folder} does not exist; fix the path or set it to "
                "null."
            )
    for stage in STAGES:
        if folders[stage] is None:
            raise UserError(f"{path}: data.{stage} (the {stage} training folder) cannot be null.")
    return folders


def _stage_flags(flags: Any, path: str) -> dict[str, list[str]]:
    if not isinstance(flags, dict) or set(flags) - set(STAGES):
        raise UserError(
            f"{path}: flags must map some of {', '.join(STAGES)} to mappings of stage flags."
        )
    argv = {}
    for stage in STAGES:
        given = flags.get(stage) or {}
        if not isinstance(given, dict):
            raise UserError(
                f"{path}: flags.{stage} must be a mapping of flag names to values, got {given!r}."
            )
        taken = sorted(set(given) & set(PIPELINE_FLAGS))
        if taken:
            raise UserError(
                f"{path}: flags.{stage} sets {', '.join(taken)}, which the pipeline sets itself; "
                "use the config's base_model, data and template keys instead."
            )
        argv[stage] = [
            word
            for name, value in given.items()
            if name != "method"
            for word in _flag(name, value, f"{path}: flags.{stage}")
        ]
    return argv


def _flag(name: str, value: Any, where: str) -> list[str]:
    """`--name value` (a list gives several values; null leaves the flag out), as the stage parser
    reads it."""
    if value is None:
        return []
    if isinstance(value, dict):
        raise UserError(
            f"{where}.{name} holds a mapping; a flag takes a value or a list of values."
        )
    return [f"--{name}"] + [str(v) for v in (value if isinstance(value, list) else [value])]


def stage_args(config: dict[str, Any], stage: str) -> list[str]:
    """What run_pipeline.sh passes a stage's launcher after the flags that follow from the chain
    (--model_name_or_path, --output_dir, --resume_from_checkpoint and PPO's
    --reward_model_name_or_path): template, data, method, --eval_on_start (the report's "before"
    column), then the stage's own flags."""
    data = config["data"]
    words = [] if stage == "pt" else ["--template_name", str(config["template"])]
    words += ["--train_file_dir", data[stage]]
    if data[f"{stage}_eval"]:
        words += ["--validation_file_dir", data[f"{stage}_eval"]]
    words += METHODS[config["stage_methods"][stage]]
    if stage != "ppo":  # the PPO loop evaluates its start itself
        words += ["--eval_on_start", "True"]
    return words + config["flags"][stage]


def _parse_names_and_values(stage: str, argv: list[str]) -> None:
    """Parse with stage `stage`'s own argument classes (STAGE_ARGUMENTS, the ones its parse() uses):
    names, types, choices and each class's __post_init__ checks. The checks parse() adds after that
    (check_common, validate_ppo) read the start model's config, which for a later stage an earlier
    stage has yet to make."""
    from pipeline.args import (
        STAGE_ARGUMENTS,
        parse_args,
    )  # torch and transformers: only for this check

    arguments = STAGE_ARGUMENTS[stage]
    parsed = parse_args(arguments, argv)
    stage_checks(stage, arguments, parsed, argv)


def stage_checks(stage: str, arguments: tuple, parsed: tuple, argv: list[str]) -> None:
    """The checks a stage's parse() adds that need no model: flags its method or loop would not
    read."""
    from pipeline.args import given_flags
    from pipeline.args.rl_checks import check_rl_data_flags, check_trainer_flags
    from pipeline.train.master_weights import check_master_weights

    model_args, data_args, peft_args, *_, training_args = parsed
    if stage == "ppo":
        check_trainer_flags(training_args, given_flags(arguments, argv), "PPO")
        check_rl_data_flags(data_args, training_args)
    if stage in ("pt", "sft"):
        check_master_weights(model_args, peft_args, training_args)


def check_flags(config: dict[str, Any], path: str, output_root: str) -> None:
    """Parse each stage's arguments as run_pipeline.sh will pass them (placeholders for the models
    that earlier stages make); the first mistake is one UserError naming the stage and the flag."""
    for stage in config["stages"]:
        chain = [
            "--model_name_or_path",
            f"<{stage} start model>",
            "--output_dir",
            str(Path(output_root, stage)),
            "--resume_from_checkpoint",
            "auto",
        ]
        if stage == "ppo":
            chain += ["--reward_model_name_or_path", "<rm model>"]
        argparse_errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(argparse_errors):
                _parse_names_and_values(stage, chain + stage_args(config, stage))
        except UserError as e:
            reason = str(e).replace(
                "Run with --help to list", f"bash run_{stage}.sh --help lists", 1
            )
            raise UserError(f"{path}: flags.{stage}: {reason}") from e
        except SystemExit as e:  # argparse rejected a value: its last line says which flag and why
            lines = argparse_errors.getvalue().strip().splitlines() or ["a flag was rejected"]
            reason = lines[-1].split(" error: ", 1)[-1]
            raise UserError(f"{path}: flags.{stage}: {reason}.") from e


def shell_lines(config: dict[str, Any]) -> list[str]:
    """Bash assignments: scalars, and arrays of ready-to-pass flags (`"${pt_flags[@]}"`)."""

    def array(name: str, words: list[str]) -> str:
        return f"{name}=({' '.join(shlex.quote(w) for w in words)})"

    lines = [
        f"{key}={shlex.quote(str(config[key] or ''))}"
        for key in ("output_root", "base_model", "template")
    ]
    exact_match_data = config["data"]["sft_eval"] if config["exact_match"] else None
    lines.append(f"exact_match_data={shlex.quote(exact_match_data or '')}")
    lines.append(array("stages", config["stages"]))
    for stage in STAGES:
        data = config["data"]
        words = ["--train_file_dir", data[stage]]
        if data[f"{stage}_eval"]:
            words += ["--validation_file_dir", data[f"{stage}_eval"]]
        lines.append(array(f"{stage}_data", words))
        lines.append(array(f"{stage}_method", METHODS[config["stage_methods"][stage]]))
        lines.append(array(f"{stage}_flags", config["flags"][stage]))
        lines.append(array(f"{stage}_args", stage_args(config, stage)))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(
        prog="python -m pipeline.tools.pipeline_config",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config", metavar="CONFIG.yaml", help="a pipeline config (configs/pipeline_default.yaml)"
    )
    parser.add_argument(
        "--check-flags",
        action="store_true",
        help="check every stage's flags as that stage would parse them, then stop",
    )
    args = parser.parse_args(argv)
    config = load(args.config)
    if args.check_flags:
        check_flags(config, args.config, os.environ.get("OUTPUT_ROOT") or config["output_root"])
        return
    print("\n".join(shell_lines(config)))


if __name__ == "__main__":
    run_cli(main)
