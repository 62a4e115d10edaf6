"""Adapters on a loaded model: LoRA / DoRA / QLoRA, P-Tuning v2 (prefix tuning), resuming an
adapter, what `--target_modules all` means, reaching the base model under a PEFT wrapper, and
switching the adapters off for a frozen read (a reference, a reward model) without peft's walk.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from transformers import PreTrainedModel

from pipeline.errors import UserError, first_line
from pipeline.model.integrity import check_folder_whole

if TYPE_CHECKING:  # annotations only: the model layer does not depend on the flags package
    from pipeline.args.model import PeftArguments

logger = logging.getLogger(__name__)


def unwrap(model):
    """The transformers model under a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Leaf names of every linear layer except the output head(s): what --target_modules all
    means."""
    heads = {id(model.get_output_embeddings())}
    heads |= {
        id(m) for n, m in model.named_modules() if n.split(".")[-1] in ("score", "classifier")
    }
    names = set()
    for name, module in model.named_modules():
        if id(module) in heads:
            continue
        if isinstance(module, torch.nn.Linear):  # bitsandbytes' Linear4bit/Linear8bitLt subclass it
            names.add(name.split(".")[-1])
    return sorted(names)


def embedding_module_names(model: PreTrainedModel) -> list[str]:
    """Leaf names of the input and output embeddings (embed_tokens / lm_head for Llama-style
    models)."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return sorted({name.split(".")[-1] for name, m in model.named_modules() if id(m) in wanted})


def attach_lora(
    model: PreTrainedModel,
    peft_args: PeftArguments,
    task_type: TaskType,
    resized: bool,
    trainable_dtype: torch.dtype = torch.float32,
) -> PeftModel:
    if peft_args.peft_path:
        logger.info("resuming adapter from %s", peft_args.peft_path)
        check_folder_whole(peft_args.peft_path, "--peft_path")
        model = PeftModel.from_pretrained(model, peft_args.peft_path, is_trainable=True)
    elif peft_args.peft_type == "prefix_tuning":
        model = get_peft_model(
            model,
            PrefixTuningConfig(
                task_type=task_type, num_virtual_tokens=peft_args.num_virtual_tokens
            ),
        )
    else:
        targets = peft_args.target_module_list
        targets = linear_module_names(model) if targets == "all" else targets
        modules_to_save = peft_args.modules_to_save_list
        if resized and not set(embedding_module_names(model)) <= set(modules_to_save):
            # New token rows are random; without training the embeddings LoRA can never learn them.
            modules_to_save = sorted(set(modules_to_save) | set(embedding_module_names(model)))
            logger.warning(
                "vocabulary was resized: also training %s in full (--modules_to_save)",
                modules_to_save,
            )
        config = LoraConfig(
            task_type=task_type,
            r=peft_args.lora_rank,
            lora_alpha=peft_args.lora_alpha,
            lora_dropout=peft_args.lora_dropout,
            target_modules=targets,
            modules_to_save=modules_to_save or None,
            use_dora=peft_args.use_dora,
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as e:
            raise UserError(
                f"LoRA setup failed: {first_line(e)}; check --target_modules / --modules_to_save."
            ) from e
    # One dtype for everything trained (ZeRO-3 refuses mixed dtypes in a parameter group): float32
    # masters under autocast, also for modules_to_save copies of bf16 embeddings; under DeepSpeed
    # its compute dtype.
    for param in model.parameters():
        if param.requires_grad and param.dtype != trainable_dtype:
            param.data = param.data.to(trainable_dtype)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "%s: %d trainable of %d parameters (%.2f%%)",
        peft_args.peft_type,
        trainable,
        total,
        100 * trainable / total,
    )
    return model


_PLAIN_LORA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plain_lora_layers(model) -> list | None:
    """The adapter layers of a PEFT model whose every adapter is plain LoRA (no DoRA or other
    variant, no LoRA biases, no modules_to_save or trainable tokens, no prompt learning): those
    whose `_disable_adapters` flag alone switches the adapters off as peft's `disable_adapter()`
    does. None for any other model."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    if any(
        str(getattr(c.peft_type, "value", c.peft_type)) != "LORA"
        or getattr(c, "modules_to_save", None)
        for c in configs.values()
    ):
        return None
    layers = []
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            return None
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module, LoraLayer) or any(
                getattr(module, name, None) for name in ("lora_variant", "lora_magnitude_vector")
            ):
                return None
            if any(getattr(module, "lora_bias", {}).values()):
                return None
            layers.append(module)
    return layers or None


def reference_adapter_is_base(model, name: str = "ref") -> bool:
    """Whether adapter `name` (trl's frozen copy of a new adapter, the DPO/KTO reference) changes
    nothing: plain LoRA whose every B weight is exactly zero (a fresh adapter), whole on this
    process (not a ZeRO-3 shard)."""
    layers = plain_lora_layers(model)
    if layers is None or set(model.peft_config) != {"default", name}:
        return False
    for layer in layers:
        weights = []
        if name in layer.lora_B:
            weights.append(layer.lora_B[name].weight)
        if name in getattr(layer, "lora_embedding_B", {}):
            weights.append(layer.lora_embedding_B[name])
        for weight in weights:
            if hasattr(weight, "ds_id") or weight.numel() == 0 or torch.count_nonzero(weight):
                return False
    return True


@contextmanager
def adapters_off(model: PeftModel) -> Iterator[PeftModel]:
    """`model` with its adapters switched off, as peft's `disable_adapter()` leaves it. Read under
    no_grad (a reference or reward forward), a plain LoRA model's layers (listed once per model)
    have their switch set directly: peft's own switch walks every module and weight at each call to
    set trainable flags that only training reads."""
    layers = None
    if not torch.is_grad_enabled() and isinstance(model, PeftModel):
        kept = _PLAIN_LORA.get(model)
        if kept is None or kept[0] != tuple(model.peft_config):
            kept = _PLAIN_LORA[model] = (tuple(model.peft_config), plain_lora_layers(model))
        layers = kept[1]
    if layers is None:
        with model.disable_adapter():
            yield model
        return
    was = [layer._disable_adapters for layer in layers]
    was_model = model._adapters_disabled
    for layer in layers:
        layer._disable_adapters = True
    model._adapters_disabled = True  # what PeftModel reports (`active_adapters`, generation)
    try:
        yield model
    finally:
        for layer, value in zip(layers, was):
            layer._disable_adapters = value
        model._adapters_disabled = was_model
