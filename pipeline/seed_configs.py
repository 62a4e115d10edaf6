"""The ChatGLM3 and GLM-4 fine-tuning demos' config files and command line, read as this project's
flags.

Their config files (`lora.yaml`, `ptuning_v2.yaml`, `sft.yaml`) are nested: a `data_config` section
(file names relative to the data folder, `num_proc`), `max_input_length`/`max_output_length`,
`combine`/`freezeV`, a `training_args` section (transformers' flags, with a nested
`generation_config`) and a `peft_config` section (peft's own names: `peft_type: LORA`, `r`,
`target_modules: [...]`; absent means full fine-tuning). `flatten` turns such a mapping into flat
flags, saying once what each demo key became; a key that cannot mean anything here is refused in one
sentence.

Their command line is positional, `finetune DATA_DIR MODEL CONFIG [yes|STEP|ds_config.json]`; every
stage script takes it as well
(`python stages/sft.py data/AdvertiseGen THUDM/glm-4-9b-chat configs/glm4/lora.yaml yes`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.seed_flags import note

logger = logging.getLogger(__name__)

SECTIONS = ("data_config", "training_args", "peft_config")
DATA_FILES = {"train_file": "train_file", "val_file": "validation_file", "test_file": "test_file"}
PEFT_NAMES = {
    "r": "lora_rank",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "target_modules",
    "num_virtual_tokens": "num_virtual_tokens",
    "modules_to_save": "modules_to_save",
    "use_dora": "use_dora",
}
PEFT_TYPES = {"LORA": "lora", "PREFIX_TUNING": "prefix_tuning"}
FROM_THE_MODEL = ("num_attention_heads", "token_dim", "num_layers", "num_transformer_submodules")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def is_nested(config: dict[str, Any]) -> bool:
    """A demo-style config: it has one of their sections or their length keys."""
    return any(key in config for key in (*SECTIONS, "max_input_length", "max_output_length"))


def positional(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """`DATA_DIR MODEL CONFIG [yes|STEP|ds_config.json] [--flag value ...]` as (config path, data
    folder, flags), or None when argv does not start that way."""
    lead = []
    for token in argv:
        if token.startswith("-"):
            break
        lead.append(token)
    if len(lead) not in (3, 4) or not lead[2].endswith(CONFIG_SUFFIXES):
        return None
    data_dir, model, config = lead[:3]
    flags = ["--model_name_or_path", model]
    if len(lead) == 4:
        fourth = lead[3]
        if fourth.endswith(".json"):
            flags += ["--deepspeed", fourth]
        elif fourth.lower() in ("yes", "true", "last", "auto") or fourth.isdigit():
            flags += ["--resume_from_checkpoint", fourth]
        elif fourth.lower() not in ("", "no", "false"):
            raise UserError(
                f"the fourth argument {fourth!r} is not yes, a checkpoint step or a "
                "DeepSpeed .json file; give yes to resume from the last checkpoint, a step such "
                "as 600, or leave it out."
            )
    _say(
        "positional",
        f"DATA_DIR {data_dir} MODEL {model} CONFIG {config} is read as "
        f"--model_name_or_path {model} with {config}'s data files in {data_dir}",
    )
    return config, data_dir, flags + argv[len(lead) :]


def _say(key: str, text: str) -> None:
    """What a demo key became, said once per process when logging is set up (seed_flags.note)."""
    note(logger, (key, text), text)


def _section(config: dict, name: str, path: str) -> dict:
    value = config.get(name) or {}
    if not isinstance(value, dict):
        raise UserError(
            f"{path}: {name} must be a mapping of keys to values, got {type(value).__name__}."
        )
    return value


def _data_flags(data: dict, path: str, data_dir: str | None) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    for key, value in data.items():
        if key in DATA_FILES and value:
            names = value if isinstance(value, list) else [value]
            flags[DATA_FILES[key]] = [str(Path(data_dir, n)) if data_dir else str(n) for n in names]
        elif key == "num_proc":
            flags["preprocessing_num_workers"] = value
        elif value is not None:
            raise UserError(
                f"{path}: data_config.{key} has no counterpart here; data_config takes train_file, "
                "val_file, test_file and num_proc."
            )
    if "train_file" not in flags:
        raise UserError(
            f"{path}: data_config.train_file is missing; name the training file (e.g. train.json)."
        )
    return flags


def _peft_flags(peft: dict, path: str) -> dict[str, Any]:
    if not peft:
        _say("peft", f"{path}: no peft_config, so every weight is trained (--use_peft False)")
        return {"use_peft": False}
    kind = str(peft.get("peft_type", "LORA")).upper()
    if kind not in PEFT_TYPES:
        raise UserError(
            f"{path}: peft_config.peft_type {kind} is not supported; "
            "use LORA or PREFIX_TUNING (P-Tuning v2)."
        )
    task = str(peft.get("task_type", "CAUSAL_LM")).upper()
    if task != "CAUSAL_LM":
        raise UserError(
            f"{path}: peft_config.task_type {task} is not a causal language model task; "
            "use CAUSAL_LM."
        )
    flags: dict[str, Any] = {"use_peft": True, "peft_type": PEFT_TYPES[kind]}
    for key, value in peft.items():
        if key in ("peft_type", "task_type") or value is None:
            continue
        if key in FROM_THE_MODEL:
            _say(
                key,
                f"{path}: peft_config.{key} is read from the model's config here, so {value} "
                "changes nothing",
            )
        elif key in PEFT_NAMES:
            flags[PEFT_NAMES[key]] = ",".join(map(str, value)) if isinstance(value, list) else value
        else:
            raise UserError(
                f"{path}: peft_config.{key} has no counterpart here; it takes "
                f"{', '.join(PEFT_NAMES)}."
            )
    return flags


def _training_flags(training: dict, path: str) -> dict[str, Any]:
    flags = dict(training)
    generation = flags.pop("generation_config", None) or {}
    if not isinstance(generation, dict):
        raise UserError(
            f"{path}: training_args.generation_config must be a mapping such as "
            "{max_new_tokens: 512}."
        )
    for key, value in generation.items():
        if key != "max_new_tokens":
            raise UserError(
                f"{path}: training_args.generation_config.{key} has no counterpart here; "
                "evaluation generates greedily and takes max_new_tokens."
            )
        flags["max_new_tokens"] = value
    return flags


def flatten(config: dict[str, Any], path: str, data_dir: str | None = None) -> dict[str, Any]:
    """A demo-style nested config as flat flags (file names joined to `data_dir` when given)."""
    flags: dict[str, Any] = {}
    flags.update(_data_flags(_section(config, "data_config", path), path, data_dir))
    for key, target in (
        ("max_input_length", "max_source_length"),
        ("max_output_length", "max_target_length"),
    ):
        if config.get(key) is not None:
            flags[target] = config[key]
    if "combine" in config:
        _say(
            "combine",
            f"{path}: combine is how the demo tokenizes a conversation; here every conversation is "
            "rendered whole with the model's chat template and each answer's ids checked against "
            "it, so it changes nothing",
        )
    if "freezeV" in config:
        _say(
            "freezeV",
            f"{path}: freezeV freezes a vision tower; the models trained here have none, so it "
            "changes nothing",
        )
    flags.update(_training_flags(_section(config, "training_args", path), path))
    flags.update(_peft_flags(_section(config, "peft_config", path), path))
    for key, value in config.items():
        if key not in (*SECTIONS, "max_input_length", "max_output_length", "combine", "freezeV"):
            flags[key] = (
                value  # a flat flag beside the sections (e.g. template_name): the parser checks it
            )
    return flags
