"""--compile_layers: the parts of each decoder layer (attention, MLP, norms) compiled by
torch.compile, the rest of the model eager.

A small training step (one packed row of 4096 tokens on a 1B model) is host-bound: on an H200 the
GPU idled 55% of it while Python launched ~1,500 kernels a step (bench/results). A compiled part is
one graph whose elementwise work (norm, RoPE, SwiGLU) the compiler fuses, so far fewer launches
leave the host. The parts are compiled, not the layer: newer transformers run gradient
checkpointing inside the layer's own forward, where torch.compile cannot trace it (the whole layer
would silently run eager); around the parts, checkpointing wraps them as it wraps plain modules.
The module call is compiled, not the forward method: with the `kernels` package installed,
transformers swaps some modules' forward (norms) whenever the model changes between training and
evaluation, which would drop a compiled forward. The one graph break left is transformers' own
hook on attention modules that records their outputs (it reads a context variable): the attention
itself is compiled before it.
Parts of the same class share one compilation, with dynamic shapes: a packed row's length changes
every step and must not recompile. The layers are found by the model's own `_no_split_modules`
(the classes transformers keeps whole on one device: the decoder layers).
"""

from __future__ import annotations

import logging

import torch

from pipeline.errors import UserError
from pipeline.model.adapters import unwrap

logger = logging.getLogger(__name__)


RECOMPILE_LIMIT = 32


def refuse_uncompilable(parts: list[torch.nn.Module]) -> None:
    """Layers torch.compile cannot take whole: bitsandbytes' quantized linears (their CPU path
    repacks the weight inside the forward) and DoRA adapters (peft's weight dequantization breaks
    the graph in every linear, which then runs eager)."""
    for part in parts:
        for module in part.modules():
            if type(module).__module__.startswith("bitsandbytes"):
                raise UserError(
                    "--compile_layers does not compile quantized layers (--load_in_4bit, "
                    "--load_in_8bit, --qlora); drop one of them."
                )
            if len(getattr(module, "lora_magnitude_vector", ()) or ()):
                raise UserError(
                    "--compile_layers does not compile DoRA adapters (--use_dora True); "
                    "drop one of them."
                )


def is_compiled(part: torch.nn.Module) -> bool:
    return getattr(part, "_compiled_call_impl", None) is not None


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile the parts of every decoder layer of `model` (under any PEFT wrapper) in place: each
    child module holding weights (attention, MLP, norms). The count of layers."""
    base = unwrap(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(
            f"--compile_layers: {type(base).__name__} names no decoder layer class "
            "(_no_split_modules); drop the flag for this model."
        )
    parts = [
        child
        for layer in layers
        for child in layer.children()
        if next(child.parameters(), None) is not None and not is_compiled(child)
    ]
    refuse_uncompilable(parts)
    # one code object serves every part of a class in every mode a run uses (training, no-grad
    # reference forwards, adapters on and off, evaluation; KTO with LoRA needs 7): room for all of
    # them under dynamo's default limit of 8 would be tight (past it, that mode runs eager behind
    # one warning in the log)
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for part in parts:
        part.compile(dynamic=True)
    logger.info(
        "--compile_layers: the %s of %d %s layers compiled",
        ", ".join(sorted({type(p).__name__ for p in parts})),
        len(layers),
        type(layers[0]).__name__,
    )
    return len(layers)
