"""Loading tokenizers and models: dtype, 4/8-bit quantization, vocab resize, RoPE scaling,
attention, heads; adapters are attached by adapters.py.

`load_model(head="lm")` gives a causal LM, `head="reward"` a one-logit sequence classifier (reward
model). The same function serves every stage, so a flag means the same thing everywhere.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

import torch
from peft import TaskType
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.errors import UserError, first_line
from pipeline.model.adapters import attach_lora
from pipeline.model.attention import choose_attention
from pipeline.model.integrity import check_folder_whole

if TYPE_CHECKING:  # annotations only: the model layer does not depend on the flags package
    from pipeline.args.model import ModelArguments, PeftArguments

logger = logging.getLogger(__name__)

HEADS = {
    "lm": (AutoModelForCausalLM, TaskType.CAUSAL_LM),
    "reward": (AutoModelForSequenceClassification, TaskType.SEQ_CLS),
}


def looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with ./ ../ ~, or more than one
    slash."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
    )


def check_model_folder(name: str, flag: str) -> None:
    """A local model path that does not exist is named as such (the hub client calls it a malformed
    repo id); a local folder must be whole (pipeline/model/integrity.py)."""
    path = os.path.expanduser(name)
    if looks_local(name) and not os.path.isdir(path):
        what = "is a file, not a model folder" if os.path.exists(path) else "does not exist"
        raise UserError(
            f"{flag} {name} {what}; give the folder holding config.json "
            "(or a hub id like org/name)."
        )
    check_folder_whole(
        path, flag
    )  # damaged or cut-short files: one sentence, not a library traceback


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    flag = (
        "--tokenizer_name_or_path"
        if model_args.tokenizer_name_or_path != model_args.model_name_or_path
        else "--model_name_or_path"
    )
    check_model_folder(model_args.tokenizer_name_or_path, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.tokenizer_name_or_path,
            trust_remote_code=model_args.trust_remote_code,
            cache_dir=model_args.cache_dir,
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a tokenizer from {model_args.tokenizer_name_or_path} ({first_line(e)}); "
            "check --tokenizer_name_or_path / --model_name_or_path."
        ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info(
            "tokenizer has no pad token; using eos %r for padding (pads never enter the loss)",
            tokenizer.eos_token,
        )
    return tokenizer


def resolve_dtype(model_args: ModelArguments, peft_args: PeftArguments) -> torch.dtype:
    """auto: bf16 weights for adapter training on a bf16 GPU; float32 master weights otherwise."""
    if model_args.torch_dtype != "auto":
        return getattr(torch, model_args.torch_dtype)
    bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return (
        torch.bfloat16
        if (bf16_gpu and (peft_args.use_peft or model_args.quantized))
        else torch.float32
    )


def quantization_config(
    model_args: ModelArguments, dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if model_args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4" if model_args.qlora else "fp4",
            bnb_4bit_use_double_quant=model_args.qlora,
            bnb_4bit_compute_dtype=dtype,
        )
    return None


def _device_map() -> dict[str, int | str] | None:
    # Quantized weights must be placed at load time: each torchrun rank on its own GPU.
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def resize_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Grow the embeddings when the tokenizer knows more tokens than the model; return whether it
    did."""
    weight = model.get_input_embeddings().weight
    current = getattr(weight, "ds_shape", weight.shape)[0]  # under ZeRO-3 the local shape is 0
    if len(tokenizer) <= current:
        return False
    model.resize_token_embeddings(len(tokenizer))
    logger.warning(
        "tokenizer has %d tokens but the model %d: embeddings resized to %d",
        len(tokenizer),
        current,
        len(tokenizer),
    )
    return True


def apply_rope_scaling(config, kind: str, max_length: int | None) -> None:
    """Scale RoPE so positions up to max_length fit: factor = max_length /
    max_position_embeddings."""
    limit = config.max_position_embeddings
    if not max_length or max_length <= limit:
        raise UserError(
            f"--rope_scaling {kind} stretches the context beyond the model's {limit} positions; "
            f"set --model_max_length above {limit} (got {max_length})."
        )
    params = dict(config.rope_parameters or {})
    params.update(rope_type=kind, factor=math.ceil(max_length / limit * 100) / 100)
    if kind == "yarn":
        params["original_max_position_embeddings"] = limit
    config.rope_parameters = params
    config.max_position_embeddings = max_length
    logger.info(
        "RoPE scaling %s with factor %.2f: %d -> %d positions",
        kind,
        params["factor"],
        limit,
        max_length,
    )


def load_config(model_args: ModelArguments, max_length: int | None = None):
    """The checkpoint's config, checked against --model_type and stretched by --rope_scaling (cheap:
    no weights)."""
    check_model_folder(model_args.model_name_or_path, "--model_name_or_path")
    try:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path,
            trust_remote_code=model_args.trust_remote_code,
            cache_dir=model_args.cache_dir,
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a model config from {model_args.model_name_or_path} ({first_line(e)})."
        ) from e
    if model_args.model_type and model_args.model_type != config.model_type:
        raise UserError(
            f"--model_type {model_args.model_type} but {model_args.model_name_or_path} "
            f"is a '{config.model_type}' model; "
            "drop --model_type (it is detected) or fix it."
        )
    if model_args.rope_scaling:
        apply_rope_scaling(config, model_args.rope_scaling, max_length)
    return config


def load_model(
    model_args: ModelArguments,
    peft_args: PeftArguments,
    tokenizer: PreTrainedTokenizerBase,
    head: str = "lm",
    gradient_checkpointing: bool = False,
    max_length: int | None = None,
    trainable_dtype: torch.dtype = torch.float32,
    packing: bool = False,
    half_precision: bool = False,
    new_head: bool = False,
) -> PreTrainedModel:
    """`packing`: batches are flattened packed rows, so a varlen attention kernel may be used
    (model/attention.py); `half_precision`: the run computes in bf16/fp16 (what that kernel needs);
    `new_head`: the head may start untrained (the RM stage puts a score head on a language model);
    otherwise every weight must come from the folder."""
    auto_class, task_type = HEADS[head]
    config = load_config(model_args, max_length)
    if head == "reward":
        config.num_labels = 1
        config.pad_token_id = tokenizer.pad_token_id
    dtype = resolve_dtype(model_args, peft_args)
    quant = quantization_config(model_args, dtype)
    model, info = auto_class.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        dtype=dtype,
        quantization_config=quant,
        device_map=_device_map() if quant else None,
        attn_implementation=choose_attention(
            model_args.flash_attn, packing, half_precision, config
        ),
        trust_remote_code=model_args.trust_remote_code,
        cache_dir=model_args.cache_dir,
        output_loading_info=True,
    )
    check_loaded_weights(
        model_args.model_name_or_path, config, head, info["missing_keys"], new_head
    )
    resized = resize_embeddings(model, tokenizer)
    model.config.use_cache = (
        False  # training: and packed position_ids only separate documents without a cache
    )
    if quant:
        prepare_quantized(model, gradient_checkpointing)
    if not peft_args.use_peft:
        return model
    return attach_lora(model, peft_args, task_type, resized, trainable_dtype)


def prepare_quantized(model: PreTrainedModel, gradient_checkpointing: bool) -> None:
    """A quantized base before its adapters: every weight frozen and, under checkpointing, the
    embeddings' output made to require grad, so the checkpointed layers recompute with the
    adapters' gradients. The weights left unquantized (embeddings, output head, norms) stay in the
    dtype they were loaded in: peft's prepare_model_for_kbit_training casts them to float32, which
    on Llama-3-8B turns the 1 GiB embedding and 1 GiB output head into 2 GiB each and has autocast
    cast the head back to bf16 at every chunk of the loss.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight into its inference layout the
    first time the layer runs in eval mode without gradients (an evaluation, a rollout, a reference
    forward), for good: its kernel for that layout has no backward, so every training step after it
    would lose the gradient through the base layers and train the adapters below them on a wrong
    one. The repacking is turned off on every 4-bit layer of a model loaded to train."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False
    if gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable()


HEAD_NAMES = {"lm": "language-model output head", "reward": "reward (score) head"}


def check_loaded_weights(path: str, config, head: str, missing: set[str], new_head: bool) -> None:
    """Refuse weights that would start random: a folder of the wrong kind (a reward model where a
    language model is needed, or the reverse) or of another shape. transformers only prints a load
    report for them."""
    head_prefix = "score." if head == "reward" else "lm_head."
    head_missing = sorted(k for k in missing if k.startswith(head_prefix))
    other = sorted(k for k in missing if not k.startswith(head_prefix))
    kind = ", ".join(config.architectures or [config.model_type])
    if other:
        raise UserError(
            f"{path} ({kind}) lacks {len(other)} weights this model needs "
            f"(e.g. {other[0]}), which would "
            "start random: it is incomplete or not a checkpoint of this model; check the folder."
        )
    if head_missing and not new_head:
        fix = (
            "the RM stage's output folder (or its merged model)"
            if head == "reward"
            else (
                "a language-model folder: the base, PT or SFT output (or a merged one), "
                "not a reward model"
            )
        )
        raise UserError(
            f"{path} is a {kind} checkpoint without the {HEAD_NAMES[head]} this stage needs "
            f"({head_missing[0]} would start random); give {fix}."
        )
