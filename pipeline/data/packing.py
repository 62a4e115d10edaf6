"""Packing: pretraining text into fixed-size blocks, and whole chat samples into rows.

Pretraining: documents are joined (each followed by EOS) and cut into `block_size` blocks. SFT
samples: placed whole into rows by best-fit decreasing, never cut (RM and DPO pairs are not packed
yet). Either way `position_ids` restart at every document or sample start, and no attention mask is
sent, so attention (varlen kernels, or transformers' block-diagonal mask from the position ids)
never crosses from one into another.
"""

from __future__ import annotations

import bisect

from pipeline.data.masking import IGNORE_INDEX


def pack_documents(
    docs: list[list[int]], block_size: int, eos_id: int
) -> dict[str, list[list[int]]]:
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


def tokenize_and_pack(
    batch: dict[str, list], tokenizer, block_size: int
) -> dict[str, list[list[int]]]:
    """datasets.map function: tokenize a batch of {"text"} documents and pack them into blocks."""
    ids = tokenizer(batch["text"], add_special_tokens=True, verbose=False)["input_ids"]
    return pack_documents(ids, block_size, tokenizer.eos_token_id)


# ------------------------------------------------------------ padding-free packing of whole samples


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sample indices into rows of at most `capacity` tokens: longest first, each into the
    open row it fills best (least room left), else a new row. Every sample is placed whole; order
    within a row is longest first. Samples longer than `capacity` must have been cut or dropped
    before."""
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(f"a sample of {too_long[0]} tokens cannot fit a row of {capacity}")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k < len(room):
            left, row = room.pop(k)
            rows[row].append(i)
            bisect.insort(room, (left - lengths[i], row))
        else:
            rows.append([i])
            bisect.insort(room, (capacity - lengths[i], len(rows) - 1))
    return rows


def pack_rows(samples: list[dict], capacity: int) -> list[dict]:
    """Packed rows of tokenized samples ({"input_ids", "labels"}): ids and labels concatenated,
    `position_ids` restarting at 0 for each sample, and the first label of each sample ignored so
    that no token is ever predicted from the sample before it."""
    rows = []
    for members in best_fit_decreasing([len(s["input_ids"]) for s in samples], capacity):
        ids, labels, positions = [], [], []
        for i in members:
            sample = samples[i]
            ids += sample["input_ids"]
            labels += [IGNORE_INDEX] + list(sample["labels"][1:])
            positions += list(range(len(sample["input_ids"])))
        rows.append(
            {"input_ids": ids, "labels": labels, "position_ids": positions, "samples": len(members)}
        )
    return rows


def pack_dataset(dataset, capacity: int, name: str):
    """A datasets.Dataset of packed rows from one of samples; returns (rows, a one-line summary)."""
    from datasets import Dataset

    samples = dataset.to_list()
    rows = pack_rows(samples, capacity)
    tokens = sum(len(s["input_ids"]) for s in samples)
    fill = tokens / max(len(rows) * capacity, 1)
    longest = max(len(s["input_ids"]) for s in samples)
    summary = (
        f"{name}: {len(samples)} samples ({tokens} tokens) packed whole into {len(rows)} rows of "
        f"<= {capacity} tokens ({fill:.1%} full); a step's rows are flattened, so 0 padding tokens "
        f"(padding every sample to the longest, {longest}, would be "
        f"{1 - tokens / (len(samples) * longest):.1%})"
    )
    return Dataset.from_list(rows), summary
