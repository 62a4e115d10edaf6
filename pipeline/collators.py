"""Batch construction: packing pretraining text into blocks, and the collator that pads them.

Packed blocks carry `position_ids` that restart at every document start and no attention mask, so
transformers' mask code keeps documents from attending to each other (needs `use_cache=False`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100  # the label value the loss ignores; defined once for the whole project


def pack_documents(docs: list[list[int]], block_size: int, eos_id: int) -> dict[str, list[list[int]]]:
    """Join documents (each followed by EOS) and cut the stream into `block_size` blocks.

    Blocks never pad: the last block of a call keeps whatever tokens remain (shorter than
    block_size) rather than dropping them; the collator pads it with ignored labels.
    position_ids count from 0 at each document start and at each block start.
    """
    stream: list[int] = []
    doc_start: list[bool] = []
    for doc in docs:
        stream += list(doc) + [eos_id]
        doc_start += [True] + [False] * len(doc)
    blocks, block_positions = [], []
    for start in range(0, len(stream), block_size):
        flags = doc_start[start : start + block_size]
        positions, p = [], 0
        for i, is_start in enumerate(flags):
            # a document continued from the previous block starts a new segment at the block start
            p = 0 if (is_start or i == 0) else p + 1
            positions.append(p)
        blocks.append(stream[start : start + block_size])
        block_positions.append(positions)
    return {"input_ids": blocks, "position_ids": block_positions}


def tokenize_and_pack(batch: dict[str, list], tokenizer, block_size: int) -> dict[str, list[list[int]]]:
    """datasets.map function: tokenize a batch of {"text"} documents and pack them into blocks."""
    ids = tokenizer(batch["text"], add_special_tokens=True, verbose=False)["input_ids"]
    return pack_documents(ids, block_size, tokenizer.eos_token_id)


@dataclass
class PackedBlockCollator:
    """Right-pads blocks to the longest in the batch; pads get IGNORE_INDEX labels and a fresh segment."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids, labels, position_ids = [], [], []
        for f in features:
            ids, pad = list(f["input_ids"]), longest - len(f["input_ids"])
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(ids + [IGNORE_INDEX] * pad)
            position_ids.append(list(f["position_ids"]) + list(range(pad)))
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(position_ids, dtype=torch.long),
        }


@dataclass
class PaddingCollator:
    """Right-pads chat samples: pads get IGNORE_INDEX labels and a zero attention mask."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids, labels, mask = [], [], []
        for f in features:
            ids, pad = list(f["input_ids"]), longest - len(f["input_ids"])
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            mask.append([1] * len(ids) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
