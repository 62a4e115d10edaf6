"""--compile_layers: each decoder layer compiled by torch.compile, the rest of the model eager.

A small training step (one packed row of 4096 tokens on a 1B model) is host-bound: on an H200 the
GPU idled 55% of it while Python launched ~1,500 kernels a step (bench/results). A compiled layer
is one graph whose elementwise work (norm, RoPE, SwiGLU, residual adds) the compiler fuses, so far
fewer launches leave the host. Layers are compiled one by one (the same code, so one compilation
serves all), with dynamic shapes: a packed row's length changes every step and must not
recompile. Gradient checkpointing wraps the compiled layer as it wraps the plain one. The layers
are found by the model's own `_no_split_modules` (the classes transformers keeps whole on one
device: the decoder layers).
"""

from __future__ import annotations

import logging

import torch

from pipeline.errors import UserError
from pipeline.model.adapters import unwrap

logger = logging.getLogger(__name__)


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer of `model` (under any PEFT wrapper) in place; the count."""
    base = unwrap(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(
            f"--compile_layers: {type(base).__name__} names no decoder layer class "
            "(_no_split_modules); drop the flag for this model."
        )
    for layer in layers:
        layer.compile(dynamic=True)
    logger.info("--compile_layers: %d %s layers compiled", len(layers), type(layers[0]).__name__)
    return len(layers)
