"""Padding-free forward passes for the pair stages (RM, DPO and its relatives).

Their batches arrive padded (chosen and rejected sequences of every pair, one row each), because the
losses read one value per row. Here the model never sees the padding: the rows' real tokens are laid
end to end in one sequence whose `position_ids` restart at 0 at every row, no attention mask is sent
(so the varlen kernel of model/attention.py, or transformers' block-diagonal mask from the position
ids, keeps the rows apart), and the per-token outputs are put back into the padded layout the losses
expect. What a row computes is unchanged; only the pad tokens' work is gone.

The pair stages install a padding-free `forward` on their model instance
(pipeline/model/patches.py), so calls still pass through DDP, DeepSpeed and PEFT wrappers on their
way to it; the RL loops call flatten themselves.
"""

from __future__ import annotations

import torch


def flatten(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (1, tokens), position_ids (1, tokens), keep (rows, width) bool) of a padded batch: every
    row's attended tokens in order, positions counting from 0 in each row. Rows must be contiguous
    (left or right padding)."""
    keep = attention_mask.bool()
    positions = (keep.long().cumsum(1) - 1)[keep]
    return input_ids[keep].unsqueeze(0), positions.unsqueeze(0), keep


def restore(flat: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The padded layout (rows, width, ...) of per-token values of a flattened batch (1, tokens,
    ...); zeros at pads."""
    out = flat.new_zeros(keep.shape + flat.shape[2:])
    out[keep] = flat[0]
    return out
