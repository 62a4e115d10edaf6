"""Packing: block boundaries, pads never in the loss, documents kept apart by position_ids."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.data.collators import PackedBlockCollator
from pipeline.data.files import load_text_dataset
from pipeline.data.masking import IGNORE_INDEX
from pipeline.data.packing import pack_documents, tokenize_and_pack
from tests.helpers import DATA

EOS = 99


def test_blocks_cut_every_block_size_tokens_with_eos_after_each_document():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    packed = pack_documents(docs, block_size=4, eos_id=EOS)
    assert packed["input_ids"] == [[1, 2, 3, EOS], [4, 5, EOS, 6], [7, 8, 9, 10], [EOS]]
    # positions restart at each document start and at each block start (a continued document)
    assert packed["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3], [0]]


def test_no_token_is_lost_and_only_the_final_block_is_short():
    docs = [list(range(1, n)) for n in (5, 17, 3, 40, 9)]
    packed = pack_documents(docs, block_size=16, eos_id=EOS)
    flat = [t for block in packed["input_ids"] for t in block]
    assert flat == [t for d in docs for t in d + [EOS]]
    assert all(len(b) == 16 for b in packed["input_ids"][:-1])


def test_collator_pads_with_ignored_labels_on_real_data(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    dataset, report = load_text_dataset(str(DATA / "pt"), "--train_file_dir")
    assert report.read == len(dataset) > 0
    packed = tokenize_and_pack(dataset[:50], tokenizer, block_size=64)
    features = [
        {"input_ids": i, "position_ids": p}
        for i, p in zip(packed["input_ids"], packed["position_ids"])
    ]
    batch = PackedBlockCollator(tokenizer.pad_token_id)(
        features[-3:]
    )  # includes the short final block
    labels = batch["labels"]
    assert (labels != tokenizer.pad_token_id).all()
    assert (labels == IGNORE_INDEX).any(), "the short final block should be padded"
    real = labels != IGNORE_INDEX
    assert torch.equal(batch["input_ids"][real], labels[real])
    assert "attention_mask" not in batch


def test_packed_logits_equal_unpacked_logits(tiny_model):
    """Each document in a packed row gives the same logits as when run alone: no cross-document
    attention."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model.config.use_cache = False
    texts = ["The ferry leaves at dawn.", "分词器把文本切成小片段。", "What color is ka-bo? red"]
    docs = [tokenizer(t).input_ids for t in texts]
    packed = pack_documents(docs, block_size=1000, eos_id=tokenizer.eos_token_id)
    ids = torch.tensor(packed["input_ids"])
    pos = torch.tensor(packed["position_ids"])
    with torch.no_grad():
        packed_logits = model(input_ids=ids, position_ids=pos).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc + [tokenizer.eos_token_id]])).logits[0]
            assert torch.allclose(packed_logits[start : start + len(doc) + 1], alone, atol=1e-5)
            start += len(doc) + 1
