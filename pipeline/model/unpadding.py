"""Padding-free forward passes for the pair stages (RM, DPO and its relatives).

Their batches arrive padded (chosen and rejected sequences of every pair, one row each), because the
losses read one value per row. Here the model never sees the padding: the rows' real tokens are laid
end to end in one sequence whose `position_ids` restart at 0 at every row, no attention mask is sent
(so the varlen kernel of model/attention.py, or transformers' block-diagonal mask from the position
ids, keeps the rows apart; the rows' bounds go along, so the kernel never looks for them on the
GPU), and the per-token outputs are put back into the padded layout the losses
expect. What a row computes is unchanged; only the pad tokens' work is gone.

The pair stages install a padding-free `forward` on their model instance
(pipeline/model/patches.py), so calls still pass through DDP, DeepSpeed and PEFT wrappers on their
way to it; the RL loops call flatten themselves.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from itertools import accumulate
from typing import Any, NamedTuple

import torch

_APART: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> keeps_rows_apart


class Flat(NamedTuple):
    """A padded batch laid end to end. `bounds` are the rows' cumulative starts and longest length
    under the names transformers hands to every attention layer (`cu_seq_lens_q/k`,
    `max_length_q/k`): passed to the model, the varlen kernel reads them instead of finding the rows
    again from the position ids."""

    ids: torch.Tensor  # (1, tokens)
    positions: torch.Tensor  # (1, tokens), 0 at each row's first token
    keep: torch.Tensor  # (rows, width) bool: the attended tokens
    index: torch.Tensor  # (tokens,): each flat token's place in the padded batch, row-major
    bounds: dict[str, Any]


def flatten(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Flat:
    """Every row's attended tokens in order, positions counting from 0 in each row. One host
    synchronization (the rows' lengths, for the longest one); the tokens are gathered by index, so
    no boolean indexing asks the GPU again. A row without tokens is left out of the bounds."""
    keep = attention_mask.bool()
    counts = keep.sum(1)
    lengths = counts.tolist()
    # a stable sort of "is padding" puts the kept tokens first, in their order
    index = torch.argsort((~keep).flatten().to(torch.int8), stable=True)[: sum(lengths)]
    positions = (keep.long().cumsum(1) - 1).flatten()[index]
    if all(lengths):
        cu = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    else:  # rare: an empty row has no bounds (built on the host, one small copy)
        starts = [0, *accumulate(n for n in lengths if n)]
        cu = torch.tensor(starts, dtype=torch.int32, device=counts.device)
    longest = max(lengths, default=0)
    bounds = {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }
    return Flat(
        input_ids.flatten()[index].unsqueeze(0), positions.unsqueeze(0), keep, index, bounds
    )


def restore(values: torch.Tensor, flat: Flat) -> torch.Tensor:
    """The padded layout (rows, width, ...) of per-token values (1, tokens, ...) of a flattened
    batch; zeros at pads."""
    rows, width = flat.keep.shape
    out = values.new_zeros((rows * width, *values.shape[2:])).index_copy(0, flat.index, values[0])
    return out.view(rows, width, *values.shape[2:])


@torch.no_grad()
def keeps_rows_apart(
    model: torch.nn.Module,
    forward: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor],
    half: bool = False,
) -> bool:
    """Once per model: whether two rows laid end to end, position ids restarting and no attention
    mask, compute what the second computes alone. transformers separates them only in models that
    build their mask from the position ids (not OPT on SDPA, BLOOM, MPT or XGLM, nor remote code
    that builds its own mask): there, a packed sample would attend to the samples before it.
    `forward(ids, positions, bounds)` gives per-token outputs (1, tokens, ...) the way the caller's
    step computes them (its wrapper, its autocast, the rows' bounds if its step sends them); the
    model is in eval mode for it (no dropout).
    `half`: the step computes in bf16/fp16 (the tolerance is theirs; also read from the outputs'
    dtype and an autocast around the call)."""
    if model in _APART:
        return _APART[model]
    embeddings = model.get_input_embeddings()
    g = torch.Generator().manual_seed(0)
    first, second = 12, 3  # a long row before a short one: a leak weighs most on the short one
    ids = torch.randint(0, embeddings.num_embeddings, (1, first + second), generator=g)
    positions = torch.cat([torch.arange(first), torch.arange(second)])[None]
    device = embeddings.weight.device
    ids, positions = ids.to(device), positions.to(device)
    was_training = model.training
    model.eval()

    def bounds(*lengths: int) -> dict:
        cu = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)
        longest = max(lengths)
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
                "max_length_k": longest}  # fmt: skip

    try:
        together = forward(ids, positions, bounds(first, second))[0, first:]
        alone = forward(ids[:, first:], positions[:, first:], bounds(second))[0]
    except TypeError:  # a forward that takes no rows' bounds cannot run the packed step either
        _APART[model] = False
        return False
    finally:
        model.train(was_training)
    half = half or alone.dtype != torch.float32 or torch.is_autocast_enabled(device.type)
    gap = (together.float() - alone.float()).abs().max().item()
    kept = gap <= (3e-2 if half else 1e-4) * (1 + alone.float().abs().max().item())
    _APART[model] = kept
    return kept


def packing_refused(model: torch.nn.Module) -> str:
    """The sentence for a model whose packed rows would attend to each other."""
    name = type(model).__name__
    return (
        f"{name} does not keep packed samples apart: its attention does not read the position "
        "ids that separate them, so each sample would also attend to the ones packed before it; "
        "add --packing False"
    )
