"""TrainingArguments subclasses, one per kind of loop: the Trainer stages
(PipelineTrainingArguments; --compile_layers for PT, SFT, RM and DPO; PT/SFT with liger-kernel and
--master_weights; RM with its centering term) and the project's own RL loops (PPO, GRPO and
relatives). Their defaults fit the hardware present; the Trainer's own flags keep their names."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import TrainingArguments

from pipeline.args.checks import (
    bad_json_flag,
    check_checkpointing_options,
    check_deepspeed_file,
    check_deepspeed_matches,
    check_numbers,
    check_writable_folder,
)
from pipeline.errors import UserError, first_line


@dataclass
class PipelineTrainingArguments(TrainingArguments):
    """TrainingArguments with defaults that fit the hardware present and the seed's output
    layout."""

    bf16: bool | None = field(
        default=None, metadata={"help": "Mixed bf16; default: on when the GPU supports it."}
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass instead of keeping them "
            "(default: on; off for GRPO and its relatives, whose rollouts generate with the "
            "cache; PPO: on, acting in its update only)."
        },
    )
    use_liger_kernel: bool | None = field(
        default=None,
        metadata={
            "help": "liger-kernel's fused RMSNorm, RoPE and SwiGLU "
            "(default: on for PT and SFT on a CUDA GPU where "
            "liger-kernel is installed)."
        },
    )
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "tensorboard, none, ..."}
    )
    logging_steps: float = field(default=10)
    do_train: bool = field(default=True, metadata={"help": "Train (default True)."})
    do_eval: bool = field(
        default=True, metadata={"help": "Evaluate on held-out data after training, if any."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, a step number, 'yes'/'last', or 'auto' (if any)."},
    )
    max_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "Stop (no final model) after this many optimizer steps in a row "
            "with a NaN/inf loss or gradient norm "
            "(or a gradient norm of exactly 0 under a non-zero loss: a collapsed run)."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Kept off: a NaN/inf loss is logged as what it is (True is refused)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an --output_dir holding another run: "
            "its checkpoints and results are removed first."
        },
    )

    # defaults chosen from measurements (README "Speed and memory"); the stages' subclasses may
    # differ
    default_checkpointing: ClassVar[bool] = True
    default_liger: ClassVar[bool] = False

    def __post_init__(self):
        if not self.output_dir:
            raise UserError("--output_dir is required.")
        check_writable_folder(self.output_dir, "--output_dir")
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_nonfinite_steps < 1:
            raise UserError(
                "--max_nonfinite_steps must be at least 1 (1 = stop at the first), "
                f"got {self.max_nonfinite_steps}."
            )
        if self.logging_nan_inf_filter:
            raise UserError(
                "--logging_nan_inf_filter True would log a NaN/inf loss as a number; "
                "this project logs it as "
                "it is and stops a diverged run (--max_nonfinite_steps); drop the flag."
            )
        self.checkpointing_by_default = (
            self.gradient_checkpointing is None
            and getattr(self, "activation_checkpointing", None) is None
        )
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = self.default_checkpointing
        if getattr(self, "activation_checkpointing", None) is None and hasattr(
            self, "activation_checkpointing"
        ):
            # transformers 5 renamed the flag; the seeds' --gradient_checkpointing sets the new name
            # (no warning)
            self.activation_checkpointing = self.gradient_checkpointing
        if self.use_liger_kernel is None:
            self.use_liger_kernel = bool(
                self.default_liger
                and torch.cuda.is_available()
                and importlib.util.find_spec("liger_kernel") is not None
            )
        if self.do_predict:
            raise UserError(
                "--do_predict is not supported by the training stages; use the inference command."
            )
        if self.bf16 is None:
            self.bf16 = bool(
                torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not self.fp16
            )
        if not torch.cuda.is_available():
            # Without this, torchrun on a CPU-only machine runs N unsynchronised copies instead of
            # DDP.
            self.use_cpu = True
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        if self.fp16 and not torch.cuda.is_available():
            raise UserError("--fp16 needs a CUDA GPU; drop it on a CPU-only machine.")
        if self.tf32 and not torch.cuda.is_available():
            raise UserError(
                "--tf32 True needs an NVIDIA GPU (Ampere or newer); drop it on a CPU-only machine."
            )
        if self.use_liger_kernel:
            if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
                raise UserError(
                    "--use_liger_kernel needs a CUDA GPU and the liger-kernel package "
                    "(pip install -e '.[gpu]')."
                )
            # the stages compute the loss from hidden states themselves
            # (pipeline/train/causal_lm.py, trl's fused head); liger replaces RMSNorm, RoPE and
            # SwiGLU
            self.liger_kernel_config = self.liger_kernel_config or {
                "fused_linear_cross_entropy": False,
                "cross_entropy": False,
            }
        check_numbers((self,))  # before the Trainer's own checks, which name no flag
        check_deepspeed_file(self)
        try:
            super().__post_init__()
        except ValueError as e:
            raise UserError(bad_json_flag(self) or first_line(e)) from e
        check_deepspeed_matches(self)
        check_checkpointing_options(self)


@dataclass
class CompiledLayersArguments(PipelineTrainingArguments):
    """The Trainer stages that run a transformer's layers in one forward and backward (PT, SFT, RM,
    DPO): --compile_layers."""

    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "Compile each decoder layer with torch.compile (dynamic shapes): fewer kernel "
            "launches and the norm, RoPE and SwiGLU fused by the compiler instead of "
            "liger-kernel (off unless given; not with --deepspeed; pipeline/model/compiled.py)."
        },
    )

    def __post_init__(self):
        if self.compile_layers:
            if self.use_liger_kernel:
                raise UserError(
                    "--compile_layers fuses the norm, RoPE and SwiGLU itself; "
                    "drop --use_liger_kernel (the fused loss stays)."
                )
            self.use_liger_kernel = False
            if self.deepspeed:
                raise UserError(
                    "--compile_layers is not supported with --deepspeed "
                    "(its hooks gather the weights inside the layers); drop one."
                )
        super().__post_init__()


@dataclass
class CausalLMTrainingArguments(CompiledLayersArguments):
    """PT and SFT: liger-kernel's fused layers on by default on a CUDA GPU (measured faster and
    leaner)."""

    default_liger: ClassVar[bool] = True
    master_weights: str = field(
        default="auto",
        metadata={
            "help": "Full training under --bf16: optimizer "
            "(bf16 weights in the model, float32 masters in the optimizer: no casts; "
            "pipeline/train/master_weights.py) or model "
            "(float32 weights, autocast casts them to bf16 at every forward). "
            "auto: optimizer wherever it applies and each step is one micro-batch in one "
            "process (--gradient_accumulation_steps 1, no DDP: no bf16 gradient sums), "
            "model otherwise.",
            "choices": ("auto", "model", "optimizer"),
        },
    )


@dataclass
class RMTrainingArguments(CompiledLayersArguments):
    center_rewards_coefficient: float = field(
        default=0.0, metadata={"help": "Weight of mean((r_c + r_r)^2)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the pair collator needs the columns."}
    )


@dataclass
class RLTrainingArguments(PipelineTrainingArguments):
    """PPO, GRPO, RLOO: gradient checkpointing off by default (rollouts generate with the policy's
    cache)."""

    default_checkpointing: ClassVar[bool] = False


@dataclass
class PPOTrainingArguments(RLTrainingArguments):
    """The own PPO loop: checkpointing on by default. It acts only in the update (training mode), so
    rollouts still generate with the cache, and it keeps the policy's and value model's activations
    from holding tens of GiB (1B shape, 16 rollouts of ~1k tokens: 67 -> see bench/results)."""

    default_checkpointing: ClassVar[bool] = True


def trainable_dtype(training_args: TrainingArguments) -> torch.dtype:
    """dtype for trainable weights. Without DeepSpeed: float32 masters under autocast. DeepSpeed
    runs the model in its own precision and keeps float32 masters in the optimizer, so trainables
    take that dtype."""
    if training_args.deepspeed and training_args.bf16:
        return torch.bfloat16
    if training_args.deepspeed and training_args.fp16:
        return torch.float16
    return torch.float32
