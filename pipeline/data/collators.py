"""Batch collators: padded tensors from tokenized samples, for every stage.

One padding helper (`pad`) serves all of them and the RL rollouts: pads never carry a label
(IGNORE_INDEX) and always a zero attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.data.masking import IGNORE_INDEX


def pad(
    sequences: list[list[int]], value: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): `sequences` padded with `value` to the longest, on the right or the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, span] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


@dataclass
class PackedBlockCollator:
    """Right-pads pretraining blocks: pads get IGNORE_INDEX labels and a fresh position segment."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, _ = pad([f["input_ids"] for f in features], self.pad_token_id)
        labels, _ = pad([f["input_ids"] for f in features], IGNORE_INDEX)
        longest = input_ids.shape[1]
        position_ids = [
            list(f["position_ids"]) + list(range(longest - len(f["position_ids"])))
            for f in features
        ]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": torch.tensor(position_ids, dtype=torch.long),
        }


@dataclass
class PaddingCollator:
    """Right-pads chat samples: pads get IGNORE_INDEX labels and a zero attention mask."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad([f["input_ids"] for f in features], self.pad_token_id)
        labels, _ = pad([f["labels"] for f in features], IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


@dataclass
class PairCollator:
    """Reward-model pairs: chosen then rejected sequences (right-padded) in one batch of 2B rows."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = pad(
            [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features],
            self.pad_token_id,
        )
        margin = torch.tensor([float(f.get("margin", 0.0)) for f in features])
        return {"input_ids": ids, "attention_mask": mask, "margin": margin}


@dataclass
class FlatteningCollator:
    """Packed rows (pipeline/data/packing.py) of a step flattened into one sequence: no padding at
    all.

    `position_ids` restart at every sample and no attention mask is sent, so a varlen kernel (or
    transformers' block-diagonal mask built from the position ids) keeps the samples apart.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def flat(key: str) -> torch.Tensor:
            return torch.tensor([[x for f in features for x in f[key]]], dtype=torch.long)

        return {
            "input_ids": flat("input_ids"),
            "labels": flat("labels"),
            "position_ids": flat("position_ids"),
        }
