"""Run one stage for 2 steps on the tiny model and print, as JSON, the flags it accepts that the run
never read after parsing: {class name: [field, ...]}. Run by tests/test_flags_read.py in its own
process (it patches the argument classes' attribute access).

    python -m tests.flag_audit STAGE WORK_DIR
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import fields
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainingArguments,
)

from pipeline.model.tiny_model import build
from tests.helpers import DATA


def own_fields(cls) -> set[str]:
    """The flags the project declares: all of a plain class; of a TrainingArguments subclass only
    those the Trainer does not have (the Trainer's own are its business, and the RL loops check
    theirs: pipeline/args/rl_checks.py)."""
    names = {f.name for f in fields(cls)}
    return (
        names - {f.name for f in fields(TrainingArguments)}
        if issubclass(cls, TrainingArguments)
        else names
    )


def stage_argv(stage: str, model: Path, reward: Path, out: Path) -> list[str]:
    common = [
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
    ]
    chat = ["--template_name", "qwen"]
    return (
        common
        + {
            "pt": [
                "--train_file_dir",
                str(DATA / "pt"),
                "--validation_file_dir",
                str(DATA / "pt_eval"),
                "--block_size",
                "64",
            ],
            "sft": [
                *chat,
                "--train_file_dir",
                str(DATA / "sft"),
                "--validation_file_dir",
                str(DATA / "sft_eval"),
            ],
            "rm": [
                *chat,
                "--train_file_dir",
                str(DATA / "reward"),
                "--validation_file_dir",
                str(DATA / "reward_eval"),
            ],
            "dpo": [
                *chat,
                "--train_file_dir",
                str(DATA / "reward"),
                "--validation_file_dir",
                str(DATA / "reward_eval"),
            ],
            "ppo": [
                *chat,
                "--train_file_dir",
                str(DATA / "sft"),
                "--validation_file_dir",
                str(DATA / "sft_eval"),
                "--reward_model_name_or_path",
                str(reward),
                "--max_new_tokens",
                "4",
            ],
            "grpo": [
                *chat,
                "--train_file_dir",
                str(DATA / "sft"),
                "--validation_file_dir",
                str(DATA / "sft_eval"),
                "--reward_funcs",
                "exact_match",
                "--max_new_tokens",
                "4",
                "--num_generations",
                "2",
            ],
        }[stage]
    )


def main() -> None:
    stage, work = sys.argv[1], Path(sys.argv[2])
    model = build(work / "model")
    reward = work / "reward"
    config = AutoConfig.from_pretrained(model)
    config.num_labels, config.pad_token_id = 1, AutoTokenizer.from_pretrained(model).pad_token_id
    AutoModelForSequenceClassification.from_config(config).save_pretrained(reward)
    AutoTokenizer.from_pretrained(model).save_pretrained(reward)

    module = importlib.import_module(f"stages.{stage}")
    classes = {cls.__name__: cls for cls in module.ARGUMENTS}
    read: dict[str, set[str]] = {name: set() for name in classes}
    tracking = {"on": False}
    for name, cls in classes.items():
        watched, original = own_fields(cls), cls.__getattribute__

        def getattribute(self, attr, _name=name, _watched=watched, _original=original):
            if tracking["on"] and attr in _watched:
                read[_name].add(attr)
            return _original(self, attr)

        cls.__getattribute__ = getattribute
    parse_args = module.parse_args

    def parse_then_track(*args, **kwargs):
        parsed = parse_args(*args, **kwargs)
        tracking["on"] = True
        return parsed

    module.parse_args = parse_then_track
    module.main(stage_argv(stage, model, reward, work / "out"))
    print(json.dumps({name: sorted(own_fields(cls) - read[name]) for name, cls in classes.items()}))


if __name__ == "__main__":
    main()
