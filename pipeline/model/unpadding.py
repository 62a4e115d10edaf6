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

from itertools import accumulate
from typing import Any, NamedTuple

import torch


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
