"""The model and the training method: ModelArguments (which checkpoint, how it loads) and
PeftArguments (full training, LoRA/QLoRA/DoRA or a P-Tuning v2 prefix), with the checks each
owns."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.args.parsing import split_list
from pipeline.errors import UserError

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model folder or hub id (required)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Defaults to the model's own."}
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Optional check: must equal the checkpoint's config.model_type."},
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "auto = bfloat16 for adapters on a bf16 GPU (float16 under --fp16 True), "
            "float32 otherwise; float16 trains only with --fp16 True on a GPU",
            "choices": DTYPES,
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the checkpoint."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where downloaded models are cached."}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Load the base model in 8-bit (bitsandbytes)."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the base model in 4-bit (bitsandbytes)."}
    )
    qlora: bool = field(
        default=False, metadata={"help": "QLoRA: 4-bit NF4 with double quantization."}
    )
    rope_scaling: str | None = field(
        default=None,
        metadata={
            "help": "Stretch RoPE to --model_max_length: linear, dynamic or yarn.",
            "choices": ["linear", "dynamic", "yarn"],
        },
    )
    flash_attn: bool = field(
        default=False, metadata={"help": "Use FlashAttention-2 (needs the flash-attn package)."}
    )
    shift_attn: bool = field(
        default=False, metadata={"help": "LongLoRA S^2-Attn (not supported: rejected)."}
    )

    def __post_init__(self):
        if self.shift_attn:
            raise UserError(
                "--shift_attn (LongLoRA S^2-Attn) is not supported: it needs a patched attention "
                "forward, which this project does not do; use --rope_scaling linear for "
                "long-context training."
            )
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
    use_peft: bool = field(
        default=True, metadata={"help": "True: LoRA adapters; False: full training."}
    )
    target_modules: str = field(
        default="all",
        metadata={"help": "Comma list of module names, or 'all' = every linear but the head."},
    )
    lora_rank: int = field(default=8)
    lora_alpha: float = field(default=16.0)
    lora_dropout: float = field(default=0.05)
    modules_to_save: str | None = field(
        default=None,
        metadata={"help": "Comma list trained in full beside LoRA, e.g. embed_tokens,lm_head."},
    )
    peft_path: str | None = field(
        default=None, metadata={"help": "Adapter folder to resume training from."}
    )
    peft_type: str = field(
        default="lora",
        metadata={
            "help": "lora, or prefix_tuning (P-Tuning v2)",
            "choices": ["lora", "prefix_tuning"],
        },
    )
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
            raise UserError(
                f"--peft_path {self.peft_path} has no adapter_config.json; "
                "point it at an adapter folder."
            )
        check_mode_flags(
            self
        )  # after the checks of each value, which name the problem more precisely

    @property
    def method(self) -> str:
        """What a checkpoint of this run holds, in words: the full model, or the adapter's shape
        (a checkpoint of another shape cannot be resumed)."""
        if not self.use_peft:
            return "full"
        if self.peft_type == "prefix_tuning":
            return f"prefix tuning, {self.num_virtual_tokens} virtual tokens"
        extra = f", trained in full: {self.modules_to_save}" if self.modules_to_save else ""
        kind = "DoRA" if self.use_dora else "LoRA"
        return f"{kind} rank {self.lora_rank} on {self.target_modules}{extra}"

    @property
    def target_module_list(self) -> list[str] | str:
        return "all" if self.target_modules.strip() == "all" else split_list(self.target_modules)

    @property
    def modules_to_save_list(self) -> list[str]:
        return split_list(self.modules_to_save) if self.modules_to_save else []


LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules", "use_dora")


def check_mode_flags(peft: PeftArguments) -> None:
    """Adapter flags set away from their defaults where the chosen method would not read them are
    refused."""
    defaults = {f.name: f.default for f in fields(PeftArguments)}
    changed = {n for n in defaults if n != "use_peft" and getattr(peft, n) != defaults[n]}
    if not peft.use_peft:
        # --peft_path has its own sentence below; --modules_to_save asks for what full training does
        # anyway
        unused, method = (
            sorted(changed - {"peft_path", "modules_to_save"}),
            "--use_peft False trains the full model",
        )
    elif peft.peft_type == "prefix_tuning":
        unused, method = (
            sorted(changed & set(LORA_ONLY) - {"use_dora"}),
            "--peft_type prefix_tuning trains a prefix",
        )
    else:
        unused, method = (
            sorted(changed & {"num_virtual_tokens"}),
            "--peft_type lora trains LoRA adapters",
        )
    if unused:
        raise UserError(
            f"{', '.join('--' + n for n in unused)}: not read by this method ({method}); drop them "
            "or choose the method they belong to."
        )
