"""Padding-free packing of whole samples and the loss without full-vocabulary logits: packing
changes how many samples a step holds, never what a sample computes (logits, per-token loss,
gradients)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.data.collators import FlatteningCollator, PaddingCollator
from pipeline.data.conversations import read_conversations
from pipeline.data.masking import IGNORE_INDEX, encode
from pipeline.data.packing import best_fit_decreasing, pack_dataset, pack_rows
from pipeline.data.templates import resolve_template
from pipeline.train.losses import causal_lm_loss_sum
from tests.helpers import DATA


@pytest.fixture(scope="module")
def chats(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = resolve_template("qwen", tokenizer)
    convs, _ = read_conversations(str(DATA / "sft"), "--train_file_dir")
    samples = [encode(template, tokenizer, c["messages"], c.get("tools")) for c in convs[:12]]
    return [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]


def test_best_fit_decreasing_places_every_sample_whole_and_fills_rows():
    lengths = [5, 3, 4, 2, 6, 1, 7, 7]
    rows = best_fit_decreasing(lengths, capacity=7)
    assert sorted(i for row in rows for i in row) == list(
        range(len(lengths))
    )  # each sample once, whole
    assert all(sum(lengths[i] for i in row) <= 7 for row in rows)
    assert len(rows) == 5 == -(-sum(lengths) // 7)  # 35 tokens in 5 full rows: the fewest possible
    with pytest.raises(ValueError, match="cannot fit"):
        best_fit_decreasing([8], capacity=7)


def test_rows_restart_positions_and_never_train_a_sample_start(chats):
    rows = pack_rows(chats, capacity=256)
    assert sum(r["samples"] for r in rows) == len(chats)
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == row["samples"] and starts[0] == 0
        assert all(
            row["labels"][s] == IGNORE_INDEX for s in starts
        )  # no token predicted across samples
    trained = sorted(
        t for r in rows for t, label in zip(r["input_ids"], r["labels"]) if label != IGNORE_INDEX
    )
    assert trained == sorted(
        t for s in chats for t, label in zip(s["input_ids"], s["labels"]) if label != IGNORE_INDEX
    )


def _per_sample_logits(model, batch, lengths):
    """Logits of each sample, cut out of a flattened packed batch."""
    logits = model(**batch, use_cache=False).logits[0]
    out, start = [], 0
    for n in lengths:
        out.append(logits[start : start + n])
        start += n
    return out


def test_packed_logits_loss_and_gradients_equal_unpacked(tiny_model, chats):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).float()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rows = pack_rows(chats, capacity=512)
    packed = FlatteningCollator()(rows)
    order = [
        i
        for members in best_fit_decreasing([len(s["input_ids"]) for s in chats], 512)
        for i in members
    ]
    packed_logits = _per_sample_logits(
        model,
        {k: v for k, v in packed.items() if k != "labels"},
        [len(chats[i]["input_ids"]) for i in order],
    )
    padded = PaddingCollator(pad_token_id=0)([chats[i] for i in order])
    alone = model(
        input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
    ).logits
    for k, i in enumerate(order):
        n = len(chats[i]["input_ids"])
        assert torch.allclose(packed_logits[k], alone[k, :n], atol=1e-5), i
    # the same supervised tokens, the same summed loss and gradients, packed or padded
    head = model.get_output_embeddings()

    def loss_and_grads(batch):
        model.zero_grad()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = model(
            **inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1
        ).hidden_states[-1]
        total, count = causal_lm_loss_sum(hidden, batch["labels"], head, chunk_size=64)
        (total / count).backward()
        return total.item(), count.item(), [p.grad.clone() for p in model.parameters()]

    packed_loss, packed_count, packed_grads = loss_and_grads(packed)
    padded_loss, padded_count, padded_grads = loss_and_grads(padded)
    assert packed_count == padded_count and packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for a, b in zip(packed_grads, padded_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_changing_one_sample_leaves_the_others_alone(tiny_model, chats):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = pack_rows(chats[:3], capacity=1024)
    assert len(rows) == 1
    lengths = [
        len(chats[i]["input_ids"])
        for i in best_fit_decreasing([len(s["input_ids"]) for s in chats[:3]], 1024)[0]
    ]
    batch = {k: v for k, v in FlatteningCollator()(rows).items() if k != "labels"}
    with torch.no_grad():
        before = _per_sample_logits(model, batch, lengths)
        changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        changed["input_ids"][0, : lengths[0]] = changed["input_ids"][0, : lengths[0]].flip(
            0
        )  # scramble sample 0
        after = _per_sample_logits(model, changed, lengths)
    assert not torch.allclose(before[0], after[0])
    assert all(torch.equal(b, a) for b, a in zip(before[1:], after[1:]))


def test_chunked_loss_equals_cross_entropy_in_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    total, count = causal_lm_loss_sum(hidden, labels, head, chunk_size=3)
    (total / count).backward()
    mine = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    logits = head(hidden)[:, :-1]
    plain = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    plain.backward()
    assert count.item() == (labels[:, 1:] != IGNORE_INDEX).sum().item()
    assert (total / count).item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.allclose(mine[0], hidden.grad, atol=1e-6) and torch.allclose(
        mine[1], head.weight.grad, atol=1e-6
    )


def test_packing_the_shipped_chats_wastes_nothing(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = resolve_template("qwen", tokenizer)
    convs, _ = read_conversations(str(DATA / "sft"), "--train_file_dir")
    from datasets import Dataset

    encoded = [encode(template, tokenizer, c["messages"], c.get("tools")) for c in convs]
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded])
    rows, summary = pack_dataset(dataset, 512, "train")
    tokens = sum(len(e.input_ids) for e in encoded)
    assert len(rows) <= -(-tokens // 512) + 1  # at most one row more than the fewest possible
    step = FlatteningCollator()(rows.to_list()[:4])
    assert step["input_ids"].numel() == sum(
        len(r) for r in rows["input_ids"][:4]
    )  # no pad token is computed
    padded = PaddingCollator(pad_token_id=0)(dataset.to_list()[:16])
    assert (
        padded["attention_mask"] == 0
    ).float().mean() > 0.05  # what padding the same samples would waste
    assert "0 padding tokens" in summary, summary


def test_varlen_attention_glue_keeps_samples_apart(tiny_model, chats, monkeypatch):
    """The registered packed_varlen attention (cumulative lengths from the position ids, GQA,
    layout) gives the unpacked logits. On the CPU its kernel is the per-sample SDPA stand-in; GPU
    runs use torch's varlen."""
    from pipeline.model import attention

    monkeypatch.setitem(attention.KERNEL, "fn", attention.reference_varlen)
    cu_seqlens_of = attention.cu_seqlens
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, attn_implementation=attention.PACKED_VARLEN
    ).eval()
    rows = pack_rows(chats[:4], capacity=1024)
    order = best_fit_decreasing([len(s["input_ids"]) for s in chats[:4]], 1024)[0]
    batch = {k: v for k, v in FlatteningCollator()(rows).items() if k != "labels"}
    cu, longest = attention.cu_seqlens(batch["position_ids"])
    assert cu.tolist()[-1] == batch["input_ids"].shape[1] and len(cu) == 5
    assert longest == max(len(chats[i]["input_ids"]) for i in order)
    # the collator sends the same bounds, computed on the host: the layers never compute them
    assert torch.equal(batch["cu_seq_lens_q"], cu) and batch["max_length_q"] == longest
    computed = []
    monkeypatch.setattr(attention, "cu_seqlens", lambda p: computed.append(1) or cu_seqlens_of(p))
    lengths = [len(chats[i]["input_ids"]) for i in order]
    with torch.no_grad():
        packed = _per_sample_logits(model, batch, lengths)
        assert computed == []
        # without them (a batch from elsewhere) the bounds come from the position ids, once per
        # forward, not once per layer
        bare = {k: batch[k] for k in ("input_ids", "position_ids")}
        again = _per_sample_logits(model, bare, lengths)
    assert len(computed) == 1 < model.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(packed, again))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        for logits, i in zip(packed, order):
            alone = plain(input_ids=torch.tensor([chats[i]["input_ids"]]), use_cache=False).logits[
                0
            ]
            assert torch.allclose(logits, alone, atol=1e-5)
