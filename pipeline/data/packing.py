"""Packing pretraining text into fixed-size blocks.

Documents are joined (each followed by EOS) and cut into `block_size` blocks; `position_ids` restart at
every document start, so with no attention mask transformers' mask code keeps documents from attending
to each other (needs `use_cache=False`). Padding the blocks of a batch is the collator's job.
"""

from __future__ import annotations


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
