"""Padding-free pair stages: the reward model and DPO read each step's chosen and rejected sequences
end to end (pipeline/model/unpadding.py). Packing removes the pads' work, never changes what a
sequence computes: rewards, per-token log-probabilities, losses and gradients equal the padded
batch's."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from pipeline.data.collators import PairCollator
from pipeline.data.masking import IGNORE_INDEX
from pipeline.data.preference_dataset import build_preference_dataset
from pipeline.data.templates import resolve_template
from pipeline.model.attention import cu_seqlens
from pipeline.model.patches import unpadded_log_probs, unpadded_scores
from pipeline.model.unpadding import flatten, restore
from pipeline.train.losses import pairwise_loss
from tests.helpers import DATA


def _pairs(tiny_model, whole: bool):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = resolve_template("qwen", tokenizer)
    dataset, _ = build_preference_dataset(
        str(DATA / "reward"),
        "--train_file_dir",
        template,
        tokenizer,
        512,
        whole_conversations=whole,
    )
    return tokenizer, dataset.select(range(6)).to_list()


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_flatten_and_restore_keep_every_row_in_place():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [0, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]])  # right and left padding
    flat = flatten(ids, mask)
    assert flat.ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3]]
    assert flat.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]  # each row counts from 0
    assert torch.equal(restore(flat.ids, flat), ids * mask)
    # the rows' bounds, as the varlen kernel would find them from the position ids
    cu, longest = cu_seqlens(flat.positions)
    assert flat.bounds["cu_seq_lens_q"].tolist() == cu.tolist() == [0, 3, 5, 8]
    assert flat.bounds["cu_seq_lens_q"].dtype == torch.int32 == cu.dtype
    assert flat.bounds["max_length_q"] == flat.bounds["max_length_k"] == longest == 3
    # a row without tokens has no bounds (the kernel would see an empty sample)
    empty = flatten(ids, torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]]))
    assert empty.ids.tolist() == [[5, 6, 7, 1, 2, 3]]
    assert empty.bounds["cu_seq_lens_k"].tolist() == [0, 3, 6]


def _count_bound_searches(monkeypatch):
    """Run packed attention through the varlen glue (the CPU stand-in kernel) and record every
    time a layer has to find the rows' bounds itself."""
    from pipeline.model import attention

    monkeypatch.setitem(attention.KERNEL, "fn", attention.reference_varlen)
    found = []
    search = attention.cu_seqlens
    monkeypatch.setattr(attention, "cu_seqlens", lambda p: found.append(1) or search(p))
    return attention.PACKED_VARLEN, found


def test_packed_pair_forwards_hand_the_rows_bounds_to_the_varlen_kernel(tiny_model, monkeypatch):
    """DPO's and the reward model's padding-free forwards send the rows' bounds along: the varlen
    attention of every layer reads them (no search on the GPU), and the values equal the padded
    batch's under SDPA."""
    varlen, found = _count_bound_searches(monkeypatch)
    tokenizer, pairs = _pairs(tiny_model, whole=False)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(pairs)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).float().eval()
    add_fused_lm_head(plain)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=varlen)
    model = model.float().eval()
    add_fused_lm_head(model)
    unpadded_log_probs(model)
    with torch.no_grad():
        _dpo_logps(model, batch)  # the first forward checks once that rows stay apart
        found.clear()  # (that check's own rows come without bounds)
        assert torch.allclose(_dpo_logps(model, batch), _dpo_logps(plain, batch), atol=1e-5)
    assert found == []

    tokenizer, pairs = _pairs(tiny_model, whole=True)
    batch = PairCollator(tokenizer.pad_token_id)(pairs)
    scorers = [
        AutoModelForSequenceClassification.from_pretrained(
            tiny_model, num_labels=1, pad_token_id=tokenizer.pad_token_id, **extra
        )
        .float()
        .eval()
        for extra in ({}, {"attn_implementation": varlen})
    ]
    scorers[1].score.load_state_dict(scorers[0].score.state_dict())  # the same random head
    unpadded_scores(scorers[1])
    with torch.no_grad():
        padded = scorers[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for _ in range(2):  # the first call checks once that rows stay apart, without bounds
            found.clear()
            packed = scorers[1](
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], unpad=True
            )
    assert torch.allclose(packed.logits, padded.logits, atol=1e-5)
    assert found == []


def test_packed_rewards_loss_and_gradients_equal_padded(tiny_model):
    tokenizer, pairs = _pairs(tiny_model, whole=True)
    torch.manual_seed(0)
    model = _no_dropout(
        AutoModelForSequenceClassification.from_pretrained(
            tiny_model, num_labels=1, pad_token_id=tokenizer.pad_token_id
        )
    ).float()
    batch = PairCollator(tokenizer.pad_token_id)(pairs)
    assert (batch["attention_mask"] == 0).any()  # the batch has padding to remove

    def loss_of(rewards):
        chosen, rejected = rewards.squeeze(-1).chunk(2)
        return pairwise_loss(chosen, rejected, batch["margin"], 0.01)

    padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    padded_grads = _grads(model, loss_of(padded))
    unpadded_scores(model)
    packed = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], unpad=True
    ).logits
    assert torch.allclose(packed, padded, atol=1e-5)
    assert torch.allclose(loss_of(packed), loss_of(padded), atol=1e-6)
    packed_grads = _grads(model, loss_of(packed))
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5), name
    # the plain call (scoring in PPO, evaluation tools) still pads as before
    again = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(again, padded, atol=1e-6)


def _dpo_logps(model, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        fused_lm_head=True,
        use_cache=False,
    ).log_probs


def _dpo_loss(logps, ref):
    chosen, rejected = (logps.sum(-1) - ref).chunk(2)
    return -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()


def test_packed_dpo_log_probs_loss_and_gradients_equal_padded(tiny_model):
    tokenizer, pairs = _pairs(tiny_model, whole=False)
    torch.manual_seed(0)
    model = _no_dropout(AutoModelForCausalLM.from_pretrained(tiny_model)).float()
    add_fused_lm_head(model)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(pairs)
    assert (batch["attention_mask"] == 0).any()
    ref = torch.randn(2 * len(pairs))

    padded = _dpo_logps(model, batch)
    padded_grads = _grads(model, _dpo_loss(padded, ref))
    # the fused head's per-token values against plain log-softmax of the logits
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
        :, :-1
    ]
    plain = (
        logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        * batch["completion_mask"][:, 1:]
    )
    assert torch.allclose(padded.detach(), plain.detach(), atol=1e-5)

    unpadded_log_probs(model)
    packed = _dpo_logps(model, batch)
    assert packed.shape == padded.shape
    assert torch.allclose(packed, padded, atol=1e-5)
    packed_grads = _grads(model, _dpo_loss(packed, ref))
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5), name


def test_changing_one_rejected_answer_leaves_every_other_sequence_alone(tiny_model):
    tokenizer, pairs = _pairs(tiny_model, whole=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    add_fused_lm_head(model)
    unpadded_log_probs(model)
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    before = _dpo_logps(model, collate(pairs))
    changed = [dict(p) for p in pairs]
    changed[0]["rejected_ids"] = [7] * 5 + changed[0]["rejected_ids"]
    after = _dpo_logps(model, collate(changed))
    n = len(pairs)
    others = [i for i in range(2 * n) if i != n]  # row n is pair 0's rejected sequence
    width = min(before.shape[1], after.shape[1])
    assert torch.allclose(before[others, :width], after[others, :width], atol=1e-6)
    assert not torch.allclose(before[n].sum(), after[n].sum())


def test_reward_packing_refuses_a_model_without_a_score_head(tiny_model):
    from pipeline.errors import UserError

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(UserError, match="--packing False"):
        unpadded_scores(model)


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_pair_stages_pack_by_default_and_refuse_packing_with_prefix_tuning(
    tiny_model, tmp_path, stage
):
    import importlib

    from pipeline.errors import UserError

    parse = importlib.import_module(f"stages.{stage}").parse
    base = [
        "--model_name_or_path",
        str(tiny_model),
        "--train_file_dir",
        str(DATA / "reward"),
        "--output_dir",
        str(tmp_path / stage),
        "--template_name",
        "qwen",
    ]

    def packing(args):
        parsed = parse(base + args)
        return parsed[3].packing  # PreferenceArguments, both stages

    assert packing([]) is True
    assert packing(["--packing", "False"]) is False
    if stage == "rm":  # a reward model cannot train prefix tuning at all (test_method_matrix.py)
        with pytest.raises(UserError, match="prefix_tuning cannot train a reward model"):
            packing(["--peft_type", "prefix_tuning"])
        return
    assert (
        packing(["--peft_type", "prefix_tuning"]) is False
    )  # virtual tokens change what a packed row computes
    with pytest.raises(UserError, match="cannot be combined with --peft_type prefix_tuning"):
        packing(["--peft_type", "prefix_tuning", "--packing", "True"])
