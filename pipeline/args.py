"""Command-line arguments shared by every stage: one dataclass per concern, parsed by HfArgumentParser.

Flag names follow the seed README (`--model_name_or_path --train_file_dir --use_peft ...`) plus every
`transformers.TrainingArguments` flag. A YAML/JSON config file may come first (or via `--config`);
flags on the command line override it. Unknown flags are an error.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import HfArgumentParser, TrainingArguments

from pipeline.arg_checks import (
    check_deepspeed_file,
    check_deepspeed_matches,
    check_numbers,
    check_output_apart,
    check_precision,
    check_template_name,
    check_test_file,
    check_writable_folder,
)
from pipeline.config_file import config_file_argv
from pipeline.errors import UserError, first_line
from pipeline.seed_flags import translate

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Model folder or hub id (required)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to the model's own."})
    model_type: str | None = field(
        default=None, metadata={"help": "Optional check: must equal the checkpoint's config.model_type."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "auto = bfloat16 for adapters on a bf16 GPU (float16 under --fp16 True), float32 otherwise; "
                                 "float16 trains only with --fp16 True on a GPU", "choices": DTYPES},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models are cached."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base model in 8-bit (bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4-bit (bitsandbytes)."})
    qlora: bool = field(default=False, metadata={"help": "QLoRA: 4-bit NF4 with double quantization."})
    rope_scaling: str | None = field(
        default=None, metadata={"help": "Stretch RoPE to --model_max_length: linear, dynamic or yarn.",
                                "choices": ["linear", "dynamic", "yarn"]})
    flash_attn: bool = field(default=False, metadata={"help": "Use FlashAttention-2 (needs the flash-attn package)."})
    shift_attn: bool = field(default=False, metadata={"help": "LongLoRA S^2-Attn (not supported: rejected)."})

    def __post_init__(self):
        if self.shift_attn:
            raise UserError("--shift_attn (LongLoRA S^2-Attn) is not supported: it needs a patched attention forward, "
                            "which this project does not do; use --rope_scaling linear for long-context training.")
        if not self.model_name_or_path:
            raise UserError("--model_name_or_path is required: give a model folder or hub id.")
        if self.load_in_4bit and self.load_in_8bit:
            raise UserError("--load_in_4bit and --load_in_8bit exclude each other; choose one.")
        if self.qlora and self.load_in_8bit:
            raise UserError("--qlora quantizes to 4-bit NF4; drop --load_in_8bit.")
        if self.qlora:
            self.load_in_4bit = True
        self.tokenizer_name_or_path = self.tokenizer_name_or_path or self.model_name_or_path

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


@dataclass
class PeftArguments:
    use_peft: bool = field(default=True, metadata={"help": "True: LoRA adapters; False: full training."})
    target_modules: str = field(
        default="all", metadata={"help": "Comma list of module names, or 'all' = every linear but the head."}
    )
    lora_rank: int = field(default=8)
    lora_alpha: float = field(default=16.0)
    lora_dropout: float = field(default=0.05)
    modules_to_save: str | None = field(
        default=None, metadata={"help": "Comma list trained in full beside LoRA, e.g. embed_tokens,lm_head."}
    )
    peft_path: str | None = field(default=None, metadata={"help": "Adapter folder to resume training from."})
    peft_type: str = field(default="lora", metadata={"help": "lora, or prefix_tuning (P-Tuning v2)",
                                                     "choices": ["lora", "prefix_tuning"]})
    num_virtual_tokens: int = field(default=16, metadata={"help": "Prefix length for P-Tuning v2."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})

    def __post_init__(self):
        if self.use_dora and self.peft_type != "lora":
            raise UserError("--use_dora applies to LoRA; drop it or use --peft_type lora.")
        if self.lora_rank <= 0:
            raise UserError(f"--lora_rank must be positive, got {self.lora_rank}.")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.peft_path and not self.use_peft:
            raise UserError("--peft_path resumes a LoRA adapter; it needs --use_peft True.")
        if self.peft_path and not Path(self.peft_path, "adapter_config.json").is_file():
            raise UserError(f"--peft_path {self.peft_path} has no adapter_config.json; point it at an adapter folder.")
        check_mode_flags(self)  # after the checks of each value, which name the problem more precisely

    @property
    def target_module_list(self) -> list[str] | str:
        return "all" if self.target_modules.strip() == "all" else split_list(self.target_modules)

    @property
    def modules_to_save_list(self) -> list[str]:
        return split_list(self.modules_to_save) if self.modules_to_save else []


@dataclass
class DataArguments:
    train_file_dir: str | None = field(default=None, metadata={"help": "Folder searched recursively for data."})
    validation_file_dir: str | None = field(default=None, metadata={"help": "Folder of held-out data."})
    train_file: list[str] | None = field(default=None, metadata={
        "help": "Training data file(s), instead of --train_file_dir; several allowed (space or comma separated)."})
    validation_file: list[str] | None = field(default=None, metadata={
        "help": "Held-out data file(s), instead of --validation_file_dir."})
    test_file: list[str] | None = field(default=None, metadata={
        "help": "SFT with --predict_with_generate True: file(s) whose answers are generated and scored after training."})
    validation_split_percentage: float = field(
        default=1.0, metadata={"help": "Percent of training data held out when no validation dir is given."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training samples; -1 = all."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on eval samples; -1 = all."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={
        "help": "PT: recompute its cached tokenization. The other stages never cache it (always recomputed)."})

    def __post_init__(self):
        for name in ("train_file", "validation_file", "test_file"):
            if getattr(self, name):
                setattr(self, name, [part for value in getattr(self, name) for part in split_list(value)])
        for name in ("train", "validation"):
            if getattr(self, f"{name}_file_dir") and getattr(self, f"{name}_file"):
                raise UserError(f"give --{name}_file_dir (a folder) or --{name}_file (files), not both.")
        if not self.train_file_dir and not self.train_file:
            raise UserError("--train_file_dir is required: give the folder holding your training files (or the files "
                            "themselves with --train_file).")
        if not 0 <= self.validation_split_percentage < 100:
            raise UserError(f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value == 0:
                raise UserError(f"--{name} 0 would leave no samples; give a positive number, or -1 for all.")
            if value is not None and value < 0:
                setattr(self, name, None)  # -1 (the seed's spelling) means "all"

    @property
    def train_source(self) -> tuple[str | list[str], str]:
        """(folder or list of files, the flag that gave it) of the training data."""
        return (self.train_file, "--train_file") if self.train_file else (self.train_file_dir, "--train_file_dir")

    @property
    def validation_source(self) -> tuple[str | list[str] | None, str]:
        if self.validation_file:
            return self.validation_file, "--validation_file"
        return self.validation_file_dir, "--validation_file_dir"

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_file_dir or self.validation_file)


@dataclass
class PreferenceArguments:
    """Shared by the RM, DPO and PPO stages: how pairs are rendered and how long they may be."""

    template_name: str = field(default="auto", metadata={"help": "Chat template (the one SFT used), or auto."})
    chat_template_kwargs: str | None = field(default=None, metadata={
        "help": "JSON object given to every render of the chat template (training, checks, the saved model), "
                "e.g. '{\"enable_thinking\": false}'."})
    model_max_length: int = field(default=2048, metadata={"help": "Longest prompt+answer; longer pairs are dropped and counted."})
    max_source_length: int | None = field(default=None, metadata={"help": "Seed spelling: prompt budget (adds to the answer's)."})
    max_target_length: int | None = field(default=None, metadata={"help": "Seed spelling: answer budget."})
    skip_invalid_samples: bool = field(default=False, metadata={"help": "Skip (and count) invalid records instead of stopping."})

    def __post_init__(self):
        if (self.max_source_length is None) != (self.max_target_length is None):
            raise UserError("give both --max_source_length and --max_target_length, or neither (or --model_max_length).")
        if self.max_source_length is not None:
            self.model_max_length = self.max_source_length + self.max_target_length


@dataclass
class PipelineTrainingArguments(TrainingArguments):
    """TrainingArguments with defaults that fit the hardware present and the seed's output layout."""

    bf16: bool | None = field(default=None, metadata={"help": "Mixed bf16; default: on when the GPU supports it."})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "Recompute activations in the backward pass instead of keeping them (default: on, except PPO)."})
    use_liger_kernel: bool | None = field(default=None, metadata={
        "help": "liger-kernel's fused RMSNorm, RoPE and SwiGLU (default: on for PT and SFT on a CUDA GPU where "
                "liger-kernel is installed)."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard, none, ..."})
    logging_steps: float = field(default=10)
    do_train: bool = field(default=True, metadata={"help": "Train (default True)."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate on held-out data after training, if any."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, a step number, 'yes'/'last', or 'auto' (if any)."}
    )
    max_nonfinite_steps: int = field(default=3, metadata={
        "help": "Stop (no final model) after this many optimizer steps in a row with a NaN/inf loss or gradient norm "
                "(or a gradient norm of exactly 0 under a non-zero loss: a collapsed run)."})
    logging_nan_inf_filter: bool = field(default=False, metadata={
        "help": "Kept off: a NaN/inf loss is logged as what it is (True is refused)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start afresh in an --output_dir holding another run: its checkpoints and results are removed first."})

    # defaults chosen from measurements (README "Speed and memory"); the stages' subclasses may differ
    default_checkpointing: ClassVar[bool] = True
    default_liger: ClassVar[bool] = False

    def __post_init__(self):
        if not self.output_dir:
            raise UserError("--output_dir is required.")
        check_writable_folder(self.output_dir, "--output_dir")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_nonfinite_steps < 1:
            raise UserError(f"--max_nonfinite_steps must be at least 1 (1 = stop at the first), got {self.max_nonfinite_steps}.")
        if self.logging_nan_inf_filter:
            raise UserError("--logging_nan_inf_filter True would log a NaN/inf loss as a number; this project logs it as "
                            "it is and stops a diverged run (--max_nonfinite_steps); drop the flag.")
        self.checkpointing_by_default = self.gradient_checkpointing is None and \
            getattr(self, "activation_checkpointing", None) is None
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = self.default_checkpointing
        if getattr(self, "activation_checkpointing", None) is None and hasattr(self, "activation_checkpointing"):
            # transformers 5 renamed the flag; the seeds' --gradient_checkpointing sets the new name (no warning)
            self.activation_checkpointing = self.gradient_checkpointing
        if self.use_liger_kernel is None:
            self.use_liger_kernel = bool(self.default_liger and torch.cuda.is_available()
                                         and importlib.util.find_spec("liger_kernel") is not None)
        if self.do_predict:
            raise UserError("--do_predict is not supported by the training stages; use the inference command.")
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not self.fp16)
        if not torch.cuda.is_available():
            # Without this, torchrun on a CPU-only machine runs N unsynchronised copies instead of DDP.
            self.use_cpu = True
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        if self.fp16 and not torch.cuda.is_available():
            raise UserError("--fp16 needs a CUDA GPU; drop it on a CPU-only machine.")
        if self.tf32 and not torch.cuda.is_available():
            raise UserError("--tf32 True needs an NVIDIA GPU (Ampere or newer); drop it on a CPU-only machine.")
        if self.use_liger_kernel:
            if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
                raise UserError("--use_liger_kernel needs a CUDA GPU and the liger-kernel package (pip install -e '.[gpu]').")
            # the stages compute the loss from hidden states themselves (pipeline/train/causal_lm.py, trl's fused
            # head); liger replaces RMSNorm, RoPE and SwiGLU
            self.liger_kernel_config = self.liger_kernel_config or {"fused_linear_cross_entropy": False,
                                                                    "cross_entropy": False}
        check_numbers((self,))  # before the Trainer's own checks, which name no flag
        check_deepspeed_file(self)
        try:
            super().__post_init__()
        except ValueError as e:
            raise UserError(first_line(e)) from e
        check_deepspeed_matches(self)


@dataclass
class CausalLMTrainingArguments(PipelineTrainingArguments):
    """PT and SFT: liger-kernel's fused layers on by default on a CUDA GPU (measured faster and leaner)."""

    default_liger: ClassVar[bool] = True
    master_weights: str = field(default="model", metadata={
        "help": "Full training under --bf16: model (float32 weights, autocast casts them to bf16 at every forward) or "
                "optimizer (bf16 weights in the model, float32 masters in the optimizer: no casts; "
                "pipeline/train/master_weights.py).", "choices": ("model", "optimizer")})


def trainable_dtype(training_args: TrainingArguments) -> torch.dtype:
    """dtype for trainable weights. Without DeepSpeed: float32 masters under autocast. DeepSpeed runs the
    model in its own precision and keeps float32 masters in the optimizer, so trainables take that dtype."""
    if training_args.deepspeed and training_args.bf16:
        return torch.bfloat16
    if training_args.deepspeed and training_args.fp16:
        return torch.float16
    return torch.float32


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan", re.IGNORECASE)


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """`--flag -1e-3` as `--flag=-1e-3`: argparse takes a value such as -1e-3 for an unknown option otherwise."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NUMBER.fullmatch(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse `[config.yaml] [--config FILE] --flag value ...`, or the GLM demos' `DATA_DIR MODEL CONFIG
    [yes|STEP]` (pipeline/seed_configs.py), into the given dataclasses."""
    argv = config_file_argv(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)  # --train_file is not --train_file_dir
    argv = _attach_negative_numbers(translate(argv, dataclass_types))
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as e:
        raise UserError(f"{e}. Run with --help to list the flags.") from e
    check_numbers(parsed)
    check_output_apart(parsed)
    check_test_file(parsed)
    check_template_name(parsed)
    check_precision(parsed)
    return parsed


LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules", "use_dora")


def check_mode_flags(peft: PeftArguments) -> None:
    """Adapter flags set away from their defaults where the chosen method would not read them are refused."""
    defaults = {f.name: f.default for f in fields(PeftArguments)}
    changed = {n for n in defaults if n != "use_peft" and getattr(peft, n) != defaults[n]}
    if not peft.use_peft:
        # --peft_path has its own sentence below; --modules_to_save asks for what full training does anyway
        unused, method = sorted(changed - {"peft_path", "modules_to_save"}), "--use_peft False trains the full model"
    elif peft.peft_type == "prefix_tuning":
        unused, method = sorted(changed & set(LORA_ONLY) - {"use_dora"}), "--peft_type prefix_tuning trains a prefix"
    else:
        unused, method = sorted(changed & {"num_virtual_tokens"}), "--peft_type lora trains LoRA adapters"
    if unused:
        raise UserError(f"{', '.join('--' + n for n in unused)}: not read by this method ({method}); drop them "
                        "or choose the method they belong to.")


def given_flags(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> set[str]:
    """Names of the flags a command line gives (config files and the seeds' spellings read as parse_args reads them)."""
    argv = translate(config_file_argv(list(sys.argv[1:] if argv is None else argv)), dataclass_types)
    return {token[2:].split("=", 1)[0] for token in argv if token.startswith("--")}


def resolve_resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """Turn --resume_from_checkpoint (path, step number, yes/last, auto) into a folder or None; the folder's files
    are checked whole (a checkpoint cut short by a full disk is named, not loaded)."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "no", "false", "none"):
        return None
    from pipeline.model.integrity import check_folder_whole
    from pipeline.train.checkpoints import COMPLETE, is_complete, last_complete_checkpoint

    out = Path(training_args.output_dir)
    last = last_complete_checkpoint(out) if out.is_dir() else None
    if str(value).lower() in ("auto", "yes", "true", "last"):
        if last is None and str(value).lower() != "auto":
            raise UserError(f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in {out}.")
        path = last
    else:
        path = Path(out, f"checkpoint-{value}") if str(value).isdigit() else Path(value)
        if not path.is_dir():
            raise UserError(f"--resume_from_checkpoint {value}: {path} does not exist.")
        if not is_complete(path):
            raise UserError(f"--resume_from_checkpoint {value}: {path} is incomplete (no {COMPLETE}: its save was "
                            "interrupted, or an older version wrote it); pick an earlier checkpoint or delete this one.")
    if path is not None:
        check_folder_whole(path, "--resume_from_checkpoint")
    return None if path is None else str(path)
