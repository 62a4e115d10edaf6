"""Checks that span flags, run right after parsing, before any data or model is loaded (a check of
one flag lives in the `__post_init__` of the class that declares it).

Run by parse_args for every stage: every number within its range, --output_dir apart from what the
run reads, the --deepspeed file readable and consistent with the batch flags, float16 only as a
loss-scaled GPU run. Run by each stage's parse(): model + adapter + length (check_common), packing
and checkpointing against the method, held-out data for evaluation. The RL loops' own checks are in
rl_checks.py.

The bounds live in one table (NUMBER_BOUNDS) so that every numeric flag of every stage has a stated
range; tests/test_reliability.py fails when a stage gains a numeric flag that is in neither table.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import fields
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from pipeline.data.json_text import loads
from pipeline.errors import UserError, first_line

logger = logging.getLogger("pipeline")

# name: (lowest, lowest allowed?, highest, highest allowed?); None = no bound on that side. None
# values pass.
NUMBER_BOUNDS: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "learning_rate": (0, False, None, False),
    "weight_decay": (0, True, None, False),
    "adam_beta1": (0, True, 1, False),
    "adam_beta2": (0, True, 1, False),
    "adam_epsilon": (0, False, None, False),
    "max_grad_norm": (0, True, None, False),
    "num_train_epochs": (0, True, None, False),
    "max_steps": (-1, True, None, False),
    "warmup_steps": (0, True, None, False),
    "logging_steps": (0, False, None, False),
    "save_steps": (0, False, None, False),
    "eval_steps": (0, False, None, False),
    "eval_delay": (0, True, None, False),
    "label_smoothing_factor": (0, True, 1, False),
    "save_total_limit": (1, True, None, False),
    "dataloader_num_workers": (0, True, None, False),
    "dataloader_prefetch_factor": (1, True, None, False),
    "ddp_timeout": (0, False, None, False),
    "ddp_bucket_cap_mb": (0, False, None, False),
    "eval_accumulation_steps": (1, True, None, False),
    "torch_empty_cache_steps": (1, True, None, False),
    "seed": (0, True, 2**32 - 1, True),
    "data_seed": (0, True, 2**32 - 1, True),
    "per_device_train_batch_size": (1, True, None, False),
    "per_device_eval_batch_size": (1, True, None, False),
    "gradient_accumulation_steps": (1, True, None, False),
    "max_nonfinite_steps": (1, True, None, False),
    "lora_rank": (1, True, None, False),
    "lora_alpha": (0, False, None, False),
    "lora_dropout": (0, True, 1, False),
    "num_virtual_tokens": (1, True, None, False),
    "preprocessing_num_workers": (1, True, None, False),
    "validation_split_percentage": (0, True, 100, False),
    "block_size": (1, True, None, False),
    "model_max_length": (1, True, None, False),
    "max_source_length": (1, True, None, False),
    "max_target_length": (1, True, None, False),
    "packing_length": (1, True, None, False),
    "loss_chunk_size": (1, True, None, False),
    "neft_alpha": (0, True, None, False),
    "neftune_noise_alpha": (0, True, None, False),
    "max_new_tokens": (1, True, None, False),
    "temperature": (0, True, None, False),
    "top_p": (0, False, 1, True),
    "kl_coef": (0, True, None, False),
    "target_kl": (0, False, None, False),
    "kl_horizon": (1, True, None, False),
    "cliprange": (0, False, None, False),
    "cliprange_value": (0, False, None, False),
    "gamma": (0, True, 1, True),
    "lam": (0, True, 1, True),
    "vf_coef": (0, True, None, False),
    "num_generations": (1, True, None, False),
    "ppo_epochs": (1, True, None, False),
    "mini_batch_size": (1, True, None, False),
    "missing_eos_penalty": (0, True, None, False),
    "beta": (0, False, None, False),
    "simpo_gamma": (0, True, None, False),
    "desirable_weight": (0, False, None, False),
    "undesirable_weight": (0, False, None, False),
    "label_smoothing": (0, True, 0.5, False),
    "center_rewards_coefficient": (0, True, None, False),
}
# Numeric flags with no range to check: ids and counts the libraries interpret themselves
# (-1 = "all"/"unset").
UNBOUNDED = {"local_rank", "max_train_samples", "max_eval_samples"}


def _range(low, low_ok, high, high_ok) -> str:
    parts = [
        f"{'>=' if low_ok else '>'} {low:g}" if low is not None else "",
        f"{'<=' if high_ok else '<'} {high:g}" if high is not None else "",
    ]
    return " and ".join(p for p in parts if p)


def check_numbers(parsed: tuple[Any, ...]) -> None:
    """Every numeric flag finite and within its range (NUMBER_BOUNDS), in one sentence naming the
    flag."""
    for args in parsed:
        for f in fields(args):
            value = getattr(args, f.name, None)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{f.name} must be a finite number, got {value}.")
            if f.name == "max_steps" and value == 0:  # transformers would train one step
                raise UserError(
                    "--max_steps 0 would train nothing; give a number of steps above 0, or -1 "
                    "(the default) to train --num_train_epochs."
                )
            if f.name not in NUMBER_BOUNDS:
                continue
            low, low_ok, high, high_ok = NUMBER_BOUNDS[f.name]
            below = low is not None and (value < low or (value == low and not low_ok))
            above = high is not None and (value > high or (value == high and not high_ok))
            if below or above:
                hint = (
                    " (-1, the default, means: use --num_train_epochs)"
                    if f.name == "max_steps"
                    else ""
                )
                raise UserError(
                    f"--{f.name} must be {_range(low, low_ok, high, high_ok)}{hint}, got {value:g}."
                )


def check_writable_folder(folder: str, flag: str) -> None:
    """The folder, or the nearest part of its path that exists, must be a folder this process can
    write in."""
    path = Path(folder).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder; give a folder path.")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(
            f"{flag} {folder} lies under {existing}, which is a file, not a folder; give a folder "
            "path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"{flag} {folder} cannot be written: {existing} is read-only for this user (or on a "
            "read-only filesystem); give a folder you can write to."
        )


# Flags that name what a run reads. --output_dir may not be one of them or lie inside one (its
# saves, checkpoint rotation and --overwrite_output_dir would destroy the start model or mix outputs
# into the data), and none of them may lie inside what the run itself writes or removes in
# --output_dir (checkpoints, logs).
INPUT_SUFFIXES = ("_name_or_path", "_file_dir", "_file", "peft_path", "ref_model")
RUN_WRITTEN = ("checkpoint-*", "tmp-checkpoint-*", "logs")


def check_output_apart(parsed: tuple[Any, ...]) -> None:
    """Refuse an --output_dir that is, or lies inside, an input folder (or holds one where the run
    writes)."""
    training = next(
        (a for a in parsed if hasattr(a, "output_dir") and hasattr(a, "learning_rate")), None
    )
    if training is None or not training.output_dir:
        return
    out = Path(training.output_dir).resolve()
    for args in parsed:
        for f in fields(args):
            value = getattr(args, f.name, None)
            if not (
                isinstance(value, str)
                and value
                and f.name.endswith(INPUT_SUFFIXES)
                and Path(value).exists()
            ):
                continue
            source = Path(value).resolve()
            if out == source or source in out.parents:
                raise UserError(
                    f"--output_dir {training.output_dir} is "
                    f"{'the folder' if out == source else 'inside'} of --{f.name} {value}: saving "
                    "there would overwrite or mix with what the run reads; choose another "
                    "--output_dir (for example a sibling folder)."
                )
            if out in source.parents and any(
                fnmatch(source.relative_to(out).parts[0], p) for p in RUN_WRITTEN
            ):
                raise UserError(
                    f"--{f.name} {value} lies inside --output_dir {training.output_dir}, where "
                    "this run writes and rotates its checkpoints (and --overwrite_output_dir "
                    "removes them); copy it elsewhere or choose another --output_dir."
                )


def check_template_name(parsed: tuple[Any, ...]) -> None:
    """An unknown --template_name is refused with the parsing, before any data or weights are
    read."""
    from pipeline.data.templates import get_template

    for args in parsed:
        name = getattr(args, "template_name", None)
        if isinstance(name, str) and name != "auto":
            get_template(name)


def check_test_file(parsed: tuple[Any, ...]) -> None:
    """--test_file is read only where answers are generated and scored (SFT with
    --predict_with_generate True)."""
    data = next((a for a in parsed if hasattr(a, "test_file")), None)
    if data is None or not data.test_file:
        return
    if not any(hasattr(a, "predict_with_generate") for a in parsed):
        raise UserError(
            "--test_file is read by the SFT stage (predicted and scored after training); drop it "
            "here."
        )
    if not any(getattr(a, "predict_with_generate", False) for a in parsed):
        raise UserError(
            "--test_file is predicted and scored after training only with --predict_with_generate "
            "True; add that flag or drop --test_file."
        )


def check_precision(parsed: tuple[Any, ...]) -> None:
    """float16 trains one way: float32 trained weights (full model, or adapters over a frozen
    float16 base) under --fp16 True, i.e. float16 autocast with a loss scaler, on a CUDA GPU. Any
    other float16 set-up is refused in one sentence: on CPU (autocast and GradScaler there are no
    supported training mode), float16 weights without --fp16 (no loss scaling; a float32 head met
    float16 hidden states: "Half != float"), and float16 weights updated by the optimizer itself
    (full training; DeepSpeed's fp16 engine keeps float32 masters, so it may). Under --fp16 True the
    `auto` dtype of adapter training resolves to float16, the precision the run computes in."""
    model = next((a for a in parsed if hasattr(a, "torch_dtype")), None)
    peft = next((a for a in parsed if hasattr(a, "use_peft")), None)
    training = next((a for a in parsed if hasattr(a, "fp16") and hasattr(a, "learning_rate")), None)
    if model is None or peft is None or training is None:
        return
    if model.torch_dtype == "auto" and training.fp16 and (peft.use_peft or model.quantized):
        model.torch_dtype = "float16"
    if model.torch_dtype == "bfloat16" and training.fp16:
        raise UserError(
            "--torch_dtype bfloat16 with --fp16 True mixes two half types; use --torch_dtype "
            "float16 with --fp16 True, or bfloat16 weights with --bf16 True."
        )
    if model.torch_dtype != "float16":
        return
    if not torch.cuda.is_available():
        raise UserError(
            "--torch_dtype float16 trains only on a CUDA GPU with --fp16 True (float16 autocast "
            "with a loss scaler is no CPU training mode); on CPU use --torch_dtype float32 (the "
            "default) or bfloat16."
        )
    if not training.fp16:
        raise UserError(
            "--torch_dtype float16 computes in float16, which needs a loss scaler: add --fp16 True "
            "(float16 autocast with loss scaling; the trained weights stay float32), or load "
            "bfloat16 or float32 weights."
        )
    if not peft.use_peft and not training.deepspeed:
        raise UserError(
            "--torch_dtype float16 with full training (--use_peft False) would have the optimizer "
            "update float16 weights; drop --torch_dtype (float32 masters under --fp16 True), train "
            "an adapter (--use_peft True), or use --deepspeed (its fp16 engine keeps float32 "
            "masters)."
        )


# DeepSpeed keys that must agree with the batch flags (or be "auto", which the Trainer fills from
# them)
_DS_BATCH = {
    "train_micro_batch_size_per_gpu": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
}


def check_deepspeed_matches(training_args) -> None:
    """The Trainer compares the DeepSpeed file's other set values (learning rate, clipping, betas,
    bf16/fp16...) with the flags only when training starts, and then raises a traceback; here they
    are one sentence up front."""
    config = getattr(
        training_args, "hf_deepspeed_config", None
    )  # set by TrainingArguments only under --deepspeed
    found = [
        m.lstrip("- ").replace("ds ", "").replace(" vs hf ", " in the file but --")
        for m in (config.mismatches if config is not None else [])
    ]
    if found:
        raise UserError(
            f"--deepspeed {training_args.deepspeed} disagrees with the flags: {'; '.join(found)}; "
            'set those values to "auto" in the file (they then follow the flags) or make them '
            "equal."
        )


def deepspeed_without_launcher(training_args) -> None:
    """`python stages/x.py --deepspeed ...` with no torchrun: DeepSpeed would look for MPI and fail
    with an import traceback; one process is what the user meant, so its environment is set as
    torchrun would for one process."""
    if not training_args.deepspeed or any(
        k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    ):
        return
    import socket

    with socket.socket() as s:  # a free port for the one-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        MASTER_PORT=os.environ.get("MASTER_PORT", str(port)),
    )
    logger.warning(
        "--deepspeed without a launcher: running as one process (use run_<stage>.sh or torchrun "
        "for more)"
    )


def check_deepspeed_file(training_args) -> None:
    """--deepspeed: an existing JSON file (a mistake in it named by line) whose batch sizes match
    the flags."""
    source = training_args.deepspeed
    if not isinstance(source, str) or not source:
        return
    path = Path(source)
    if not path.is_file():
        raise UserError(
            f"--deepspeed {source} does not exist; give a DeepSpeed JSON file such as "
            "deepspeed_configs/zero2.json."
        )
    try:
        config = loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"--deepspeed {source} is not UTF-8 text ({first_line(e)}).") from e
    except json.JSONDecodeError as e:
        raise UserError(
            f"--deepspeed {source}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})."
        ) from e
    if not isinstance(config, dict):
        raise UserError(f"--deepspeed {source} must hold a JSON object of DeepSpeed settings.")
    for key, flag in _DS_BATCH.items():
        value = config.get(key, "auto")
        if value != "auto" and value != getattr(training_args, flag):
            raise UserError(
                f"--deepspeed {source} sets {key} {value} but --{flag} is "
                f'{getattr(training_args, flag)}; set it to "auto" in the file (it then follows '
                "the flag) or make the two equal."
            )
    total = config.get("train_batch_size", "auto")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    expected = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * world
    )
    if total != "auto" and total != expected:
        raise UserError(
            f"--deepspeed {source} sets train_batch_size {total} but the flags give {expected} "
            f"(--per_device_train_batch_size x --gradient_accumulation_steps x {world} processes); "
            'set it to "auto" in the file or make them agree.'
        )


def check_common(
    model_args, peft_args, max_length: int | None = None, length_flag: str = "--model_max_length"
) -> None:
    """Checks every stage shares: quantized weights need an adapter; the model config exists, has
    the --model_type given and stretches to max_length under --rope_scaling; --flash_attn is
    installed."""
    from pipeline.model.attention import (
        choose_attention,
    )  # the model package reads these classes: imported late
    from pipeline.model.loading import load_config

    if model_args.quantized and not peft_args.use_peft:
        raise UserError(
            "4/8-bit weights cannot be trained in full; add --use_peft True (LoRA/QLoRA) or drop "
            "quantization."
        )
    config = load_config(model_args, max_length)
    limit = getattr(config, "max_position_embeddings", None)
    if max_length and limit and max_length > limit and not model_args.rope_scaling:
        logger.warning(
            "%s %d is above the %d positions %s was trained with: a sample longer than %d "
            "trains at positions the model never saw (an index error for learned positions); "
            "lower %s, or stretch the positions with --rope_scaling linear|dynamic|yarn",
            length_flag,
            max_length,
            limit,
            model_args.model_name_or_path,
            limit,
            length_flag,
        )
    choose_attention(
        model_args.flash_attn, packing=False
    )  # --flash_attn without the package stops here


def resolve_packing(packing: bool | None, peft_args, neft_alpha: float = 0.0) -> bool:
    """--packing: on unless something would change what a packed sample computes. Prefix tuning
    prepends virtual tokens to every sequence and NEFTune scales its noise by the sequence length,
    so both train unpacked; asking for packing with either stops here."""
    unpackable = (
        "--peft_type prefix_tuning"
        if peft_args.use_peft and peft_args.peft_type == "prefix_tuning"
        else "--neft_alpha"
        if neft_alpha
        else None
    )
    if packing and unpackable:
        raise UserError(f"--packing True cannot be combined with {unpackable}; drop one of them.")
    return unpackable is None if packing is None else packing


def bad_json_flag(training_args) -> str | None:
    """The sentence for a TrainingArguments flag given as a JSON object that does not parse
    (transformers' own error names no flag), or None."""
    for name in getattr(training_args, "_VALID_DICT_FIELDS", ()):
        value = getattr(training_args, name, None)
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                json.loads(value)
            except ValueError as e:
                return f"--{name} is not valid JSON ({e}): write an object, e.g. '{{\"key\": 2}}'."
    return None


def checkpointing_options(training_args) -> dict[str, Any]:
    """--gradient_checkpointing_kwargs as a dict (transformers has parsed the JSON already; newer
    versions call it activation_checkpointing_kwargs, which wins where set)."""
    value = getattr(training_args, "activation_checkpointing_kwargs", None)
    value = value if value is not None else training_args.gradient_checkpointing_kwargs
    if value is not None and not isinstance(value, dict):
        raise UserError(
            "--gradient_checkpointing_kwargs takes a JSON object, e.g. "
            f"'{{\"every_n_layers\": 2}}'; got {value!r}."
        )
    return dict(value or {})


def check_checkpointing_options(training_args) -> None:
    """transformers' own checkpointing options, read by every stage (the RL loops pass them on
    themselves): `every_n_layers` (recompute every n-th decoder layer only: less recomputation and
    host work, more memory) and `offload` (the saved activations in pinned host memory: needs a
    GPU). Options without checkpointing would do nothing, so they are refused."""
    options = checkpointing_options(training_args)
    if not options:
        return
    if not training_args.gradient_checkpointing:
        raise UserError(
            "--gradient_checkpointing_kwargs acts only with gradient checkpointing on; drop it or "
            "add --gradient_checkpointing True."
        )
    every = options.get("every_n_layers", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UserError(
            "--gradient_checkpointing_kwargs: every_n_layers must be a whole number >= 1 "
            f"(1 = every layer), got {every!r}."
        )
    offload = options.get("offload", False)
    if not isinstance(offload, bool):
        raise UserError(
            f"--gradient_checkpointing_kwargs: offload must be true or false, got {offload!r}."
        )
    if offload and not torch.cuda.is_available():
        raise UserError(
            "--gradient_checkpointing_kwargs: offload keeps the saved activations in pinned host "
            "memory, which needs a CUDA GPU; drop it on a CPU-only machine."
        )


def resolve_checkpointing(training_args, peft_args) -> None:
    """Gradient checkpointing (on by default) cannot run prefix tuning: its virtual key/value tokens
    do not survive the recomputed forward. Off by default there; asked for explicitly, it stops
    here."""
    if not (
        peft_args.use_peft
        and peft_args.peft_type == "prefix_tuning"
        and training_args.gradient_checkpointing
    ):
        return
    if not getattr(training_args, "checkpointing_by_default", False):
        raise UserError(
            "--gradient_checkpointing True cannot be combined with --peft_type prefix_tuning; drop "
            "one of them."
        )
    if checkpointing_options(training_args):
        raise UserError(
            "--gradient_checkpointing_kwargs acts only with gradient checkpointing, which "
            "--peft_type prefix_tuning turns off; drop it."
        )
    training_args.gradient_checkpointing = False
    if hasattr(training_args, "activation_checkpointing"):  # transformers >= 5.2x reads this name
        training_args.activation_checkpointing = False


def eval_strategy_name(training_args) -> str:
    """--eval_strategy as the user typed it (steps, epoch, no)."""
    return str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))


def evaluates_during_training(training_args) -> bool:
    """--eval_strategy steps/epoch or --eval_on_start."""
    return eval_strategy_name(training_args) != "no" or bool(
        getattr(training_args, "eval_on_start", False)
    )


def check_eval_data(data_args, training_args) -> None:
    """Evaluation during training (--eval_strategy steps/epoch, --eval_on_start) needs held-out
    data: a --validation_file_dir / --validation_file or a --validation_split_percentage above 0."""
    wants = evaluates_during_training(training_args)
    if wants and not data_args.has_validation and data_args.validation_split_percentage <= 0:
        flag = (
            "--eval_on_start"
            if training_args.eval_on_start
            else f"--eval_strategy {training_args.eval_strategy.value}"
        )
        raise UserError(
            f"{flag} evaluates during training but there is no held-out data; give "
            "--validation_file_dir (or --validation_file), a --validation_split_percentage above "
            "0, or --eval_strategy no."
        )
