"""The validation pass every stage runs right after parsing: checks that span several argument classes.

A check on one flag lives in the `__post_init__` of the dataclass that owns it (pipeline/args.py);
a check that needs two concerns (model + adapter, model + length, trainer + hardware) lives here, so a
wrong combination stops in one sentence before any tokenization or model loading. The RL stages add
their own checks in pipeline/rl/config.py.
"""

from __future__ import annotations

from pipeline.args import ModelArguments, PeftArguments
from pipeline.errors import UserError
from pipeline.model.attention import choose_attention
from pipeline.model.loading import load_config


def check_common(model_args: ModelArguments, peft_args: PeftArguments, max_length: int | None = None) -> None:
    """Checks every stage shares: quantized weights need an adapter; the model config exists, has the
    --model_type given and stretches to max_length under --rope_scaling; --flash_attn is installed."""
    if model_args.quantized and not peft_args.use_peft:
        raise UserError("4/8-bit weights cannot be trained in full; add --use_peft True (LoRA/QLoRA) or drop quantization.")
    load_config(model_args, max_length)
    choose_attention(model_args.flash_attn, packing=False)  # --flash_attn without the package stops here


def resolve_packing(packing: bool | None, peft_args: PeftArguments, neft_alpha: float = 0.0) -> bool:
    """--packing: on unless something would change what a packed sample computes. Prefix tuning prepends
    virtual tokens to every sequence and NEFTune scales its noise by the sequence length, so both train
    unpacked; asking for packing with either stops here."""
    unpackable = "--peft_type prefix_tuning" if peft_args.use_peft and peft_args.peft_type == "prefix_tuning" else \
        "--neft_alpha" if neft_alpha else None
    if packing and unpackable:
        raise UserError(f"--packing True cannot be combined with {unpackable}; drop one of them.")
    return unpackable is None if packing is None else packing


def resolve_checkpointing(training_args, peft_args: PeftArguments) -> None:
    """Gradient checkpointing (on by default) cannot run prefix tuning: its virtual key/value tokens do not
    survive the recomputed forward. Off by default there; asked for explicitly, it stops here."""
    if not (peft_args.use_peft and peft_args.peft_type == "prefix_tuning" and training_args.gradient_checkpointing):
        return
    if not getattr(training_args, "checkpointing_by_default", False):
        raise UserError("--gradient_checkpointing True cannot be combined with --peft_type prefix_tuning; drop one of them.")
    training_args.gradient_checkpointing = False
    if hasattr(training_args, "activation_checkpointing"):  # transformers >= 5.2x reads this name
        training_args.activation_checkpointing = False


def check_eval_data(data_args, training_args) -> None:
    """Evaluation during training (--eval_strategy steps/epoch, --eval_on_start) needs held-out data: a
    --validation_file_dir / --validation_file or a --validation_split_percentage above 0."""
    wants = str(training_args.eval_strategy) not in ("no", "IntervalStrategy.NO") or training_args.eval_on_start
    if wants and not data_args.has_validation and data_args.validation_split_percentage <= 0:
        flag = "--eval_on_start" if training_args.eval_on_start else f"--eval_strategy {training_args.eval_strategy.value}"
        raise UserError(f"{flag} evaluates during training but there is no held-out data; give --validation_file_dir "
                        "(or --validation_file), a --validation_split_percentage above 0, or --eval_strategy no.")
