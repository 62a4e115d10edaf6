"""Batch collators: padded tensors from tokenized samples, for every stage.

One padding helper (`pad`) serves all of them and the RL rollouts: pads never carry a label
(IGNORE_INDEX) and always a zero attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.data.masking import IGNORE_INDEX
from pipeline.model.attention import cu_seqlens


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
    transformers' block-diagonal mask built from the position ids) keeps the samples apart. The
    samples' bounds are sent too, computed here on the host (`cu_seq_lens_q/k`: cumulative starts;
    `max_length_q/k`: the longest sample), under the names transformers passes to every attention
    layer: the kernel reads them without asking the GPU where the samples start (a host
    synchronization each forward).
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        def flat(key: str) -> list[int]:
            return [x for f in features for x in f[key]]

        positions = torch.tensor([flat("position_ids")], dtype=torch.long)
        if positions[0, 0] != 0:
            raise ValueError("a packed row must start a sample (position id 0) at its first token")
        bounds, longest = cu_seqlens(positions)  # on the host tensor: no GPU involved
        return {
            "input_ids": torch.tensor([flat("input_ids")], dtype=torch.long),
            "labels": torch.tensor([flat("labels")], dtype=torch.long),
            "position_ids": positions,
            "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds,
            "max_length_q": longest,
            "max_length_k": longest,
        }
