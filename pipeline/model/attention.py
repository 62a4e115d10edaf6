"""Attention over packed rows without a dense mask.

A packed step is one sequence of several samples whose `position_ids` restart at 0 at each sample
(see pipeline/data/packing.py). Kernels that take cumulative sequence lengths ("varlen") attend
within each sample only and never build a [tokens x tokens] mask. Choice, in order:

  --flash_attn True       transformers' flash_attention_2 (the flash-attn package; it reads the
                          position ids)
  packing on a CUDA GPU   "packed_varlen" below: PyTorch's flash kernel called directly
                          (FlashVarlen; PyTorch's public torch.nn.attention.varlen op wraps the
                          same kernel in more Python and wants the kv heads repeated), registered
                          through transformers' AttentionInterface
  otherwise               SDPA, with transformers' block-diagonal mask built from the position ids:
                          the same numbers, slower and memory-hungry on long rows (said once in the
                          log)

"packed_varlen" needs flattened packed batches (no padding, no attention mask); the stages use it
only with the flattening collator, and it never reaches a saved config (transformers does not save
the choice).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import AttentionInterface

logger = logging.getLogger(__name__)
PACKED_VARLEN = "packed_varlen"


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative sample starts as int32, longest sample) of a flattened packed row (1, tokens)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    bounds = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)])
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


def sample_bounds(position_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """cu_seqlens of a packed row, computed once per forward: every layer receives the same
    position_ids tensor, which keeps the result, so the two host synchronizations (nonzero, max)
    happen at the first layer only instead of at each of them (16 layers on the 1B shape, and again
    in checkpointing's recomputation)."""
    kept = getattr(position_ids, "_packed_bounds", None)
    if kept is None or kept[0].device != device:
        cu, max_len = cu_seqlens(position_ids)
        kept = (cu.to(device), max_len)
        position_ids._packed_bounds = kept
    return kept


def _torch_varlen(q, k, v, cu, max_len, scale, window=None):
    """PyTorch's public op: what FlashVarlen replaced, kept as its comparison (bench, GPU tests)."""
    from torch.nn.attention.varlen import varlen_attn

    if (
        k.shape[1] != q.shape[1]
    ):  # grouped-query attention: torch 2.11's kernel wants one kv head per query head
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    left = -1 if window is None else window - 1
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(left, 0))


class FlashVarlen(torch.autograd.Function):
    """The flash kernel behind `varlen_attn`, called directly: causal, no dropout, grouped-query
    heads read in place (the kernel shares each kv head across its query group and sums their
    gradients itself), and none of the custom op's Python dispatch layers, which ran at each of a
    step's 48 attention calls (16 layers, forward, recomputation and backward)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale, window=None):
        # a sliding window of W keys: the query's own and the W - 1 before it (transformers' mask)
        left = None if window is None else window - 1
        right = None if window is None else 0
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale,
            window_size_left=left, window_size_right=right,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len, ctx.scale, ctx.window = max_len, scale, (left, right)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True,
            rng, unused, scale=ctx.scale, window_size_left=ctx.window[0],
            window_size_right=ctx.window[1],
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None


def _flash_varlen(q, k, v, cu, max_len, scale, window=None):
    return FlashVarlen.apply(q, k, v, cu, max_len, scale, window)


def reference_varlen(q, k, v, cu, max_len, scale, window=None):
    """The same computation one sample at a time with SDPA (and the sliding window's mask): the
    CPU stand-in the tests compare against."""
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (heads, len, dim)
        mask = None
        if window is not None:
            i = torch.arange(b - a, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=qs.shape[0] != ks.shape[0],
        ).transpose(0, 1)  # fmt: skip
    return out


KERNEL = {"fn": _flash_varlen}
# what transformers' attention layers may hand an attention function that the kernel cannot compute:
# Gemma 2's soft cap on the attention logits, gpt-oss's attention sinks
UNSUPPORTED = ("softcap", "s_aux")
# model types whose attention layers hand the kernel sinks (s_aux); a type not listed is stopped
# by packed_varlen_attention itself with a sentence
SINK_MODELS = ("gpt_oss", "granite_swa", "granitemoe_swa", "deepseek_v4", "hy_v4")


def packed_varlen_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """transformers attention function: (batch 1, heads, tokens, dim) in, (1, tokens, heads, dim)
    out."""
    if query.shape[0] != 1 or kwargs.get("position_ids") is None:
        raise ValueError(
            "packed_varlen attention takes one flattened packed row with its position_ids"
        )
    unread = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if unread:  # choose_attention keeps such models off this kernel: a model it does not know
        raise ValueError(
            f"{type(module).__name__} attends with {', '.join(unread)}, which the packed varlen "
            "kernel does not compute; train it with --packing False or --flash_attn True"
        )
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("max_length_q") is not None:
        # from the collator or the padding-free pair forward (a no-op move on the same device)
        cu, max_len = kwargs["cu_seq_lens_q"].to(query.device), kwargs["max_length_q"]
    else:
        cu, max_len = sample_bounds(kwargs["position_ids"], query.device)
    # under autocast the rotary embedding hands back float32 q/k; the kernel computes in the
    # autocast dtype
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    q, k, v = (
        t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value)
    )  # (tokens, heads, dim)
    out = KERNEL["fn"](q, k, v, cu, max_len, scaling, kwargs.get("sliding_window"))
    return out.unsqueeze(0), None


AttentionInterface.register(PACKED_VARLEN, packed_varlen_attention)


def torch_varlen_available() -> bool:
    return (
        torch.cuda.is_available()
        and importlib.util.find_spec("torch.nn.attention.varlen") is not None
    )


def kernel_cannot(config) -> str | None:
    """What a model's attention computes that the varlen kernel does not (None: nothing)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None):
        return "a soft cap on its attention logits"
    if getattr(text, "model_type", "") in SINK_MODELS:
        return "attention sinks"
    return None


def choose_attention(
    flash_attn: bool, packing: bool, half_precision: bool = True, config=None
) -> str | None:
    """The attn_implementation for a run (None: transformers' default for the model, SDPA where
    it supports it). The varlen kernel computes in bf16/fp16 only, so a float32 run keeps SDPA;
    it computes sliding windows but not a soft cap or sinks, so those models keep their own."""
    if flash_attn:
        if importlib.util.find_spec("flash_attn") is None:
            from pipeline.errors import UserError

            raise UserError(
                "--flash_attn needs the flash-attn package, which is not installed "
                "(pip install flash-attn on a CUDA machine), or drop the flag to use PyTorch SDPA."
            )
        return "flash_attention_2"
    cannot = None if config is None else kernel_cannot(config)
    if packing and half_precision and torch_varlen_available() and cannot is None:
        return PACKED_VARLEN
    if packing and cannot:
        logger.info(
            "packed rows attend through transformers' own attention for this model, with a "
            "block-diagonal mask from the position ids: it uses %s, which the varlen kernel does "
            "not compute (--flash_attn True does)",
            cannot,
        )
        return None
    if packing:
        logger.info(
            "packed rows attend through SDPA with a block-diagonal mask from the position ids "
            "(no varlen kernel on this device): correct, slower on long rows"
        )
    return None
