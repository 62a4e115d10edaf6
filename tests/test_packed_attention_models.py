"""Packed rows attend as the model itself does: the varlen kernel keeps a model's sliding window
(Mistral, Qwen2, Gemma, gpt-oss layers), and models whose attention it cannot compute (Gemma 2's
soft cap, gpt-oss's sinks) keep transformers' own attention instead of having it silently dropped.
On the CPU the kernel is the per-sample SDPA reference (the GPU's flash kernel is compared with it
in tests/test_attention_kernel.py)."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    Gemma2Config,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    XGLMConfig,
)

from pipeline.model import attention
from pipeline.model.unpadding import keeps_rows_apart

SHAPE = dict(
    vocab_size=200,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def test_packed_rows_keep_the_sliding_window(monkeypatch):
    monkeypatch.setitem(attention.KERNEL, "fn", attention.reference_varlen)
    config = MistralConfig(**SHAPE, sliding_window=4)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    packed = AutoModelForCausalLM.from_config(
        config, attn_implementation=attention.PACKED_VARLEN
    ).eval()
    packed.load_state_dict(plain.state_dict())
    lengths = [11, 7, 3]  # longer and shorter than the window
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 200, (n,), generator=g) for n in lengths]
    ids = torch.cat(samples)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        logits = packed(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        start = 0
        for sample in samples:
            alone = plain(input_ids=sample[None], use_cache=False).logits[0]
            assert torch.allclose(logits[start : start + len(sample)], alone, atol=1e-5)
            start += len(sample)
        # the window matters here: without it the first sample's last positions differ
        unwindowed = attention.reference_varlen
        monkeypatch.setitem(
            attention.KERNEL, "fn", lambda q, k, v, cu, n, s, w: unwindowed(q, k, v, cu, n, s)
        )
        wrong = packed(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    assert (wrong[:11] - logits[:11]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "config, what",
    [
        (Gemma2Config(**SHAPE, attn_logit_softcapping=50.0), "soft cap"),
        (GptOssConfig(**SHAPE, num_local_experts=4), "sinks"),
    ],
)
def test_models_the_kernel_cannot_compute_keep_their_own_attention(config, what, monkeypatch):
    assert what in attention.kernel_cannot(config)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: True)  # as on a GPU
    assert attention.choose_attention(False, packing=True, config=config) is None
    assert (
        attention.choose_attention(False, packing=True, config=MistralConfig(**SHAPE))
        == attention.PACKED_VARLEN
    )


def test_the_kernel_refuses_what_it_would_drop():
    q = torch.zeros(1, 4, 6, 8)
    positions = torch.arange(6)[None]
    with pytest.raises(ValueError, match="softcap"):
        attention.packed_varlen_attention(
            torch.nn.Identity(), q, q, q, None, position_ids=positions, softcap=50.0
        )


LEAKING = {  # models whose attention mask does not read the position ids (on the CPU)
    "opt": lambda: OPTConfig(
        vocab_size=200, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    ),
    "bloom": lambda: BloomConfig(vocab_size=200, hidden_size=32, n_layer=2, n_head=4),
    "xglm": lambda: XGLMConfig(
        vocab_size=200, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64
    ),
}  # fmt: skip
APART = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "mistral (sliding window)": lambda: MistralConfig(**SHAPE, sliding_window=4),
    "qwen2": lambda: Qwen2Config(**SHAPE),
}


def causal_forward(model):
    return lambda ids, pos, bounds: (
        model(input_ids=ids, position_ids=pos, use_cache=False, **bounds).logits
    )


@pytest.mark.parametrize("family", sorted(LEAKING) + sorted(APART))
def test_the_packing_check_finds_models_whose_rows_attend_to_each_other(family):
    torch.manual_seed(0)
    config = (LEAKING | APART)[family]()
    model = AutoModelForCausalLM.from_config(config).train()  # its default attention
    assert keeps_rows_apart(model, causal_forward(model)) is (family in APART)
    assert model.training  # left as it was


def test_sft_loss_refuses_packed_rows_a_model_cannot_keep_apart(tmp_path):
    from transformers import TrainingArguments

    from pipeline.data.collators import FlatteningCollator
    from pipeline.errors import UserError
    from pipeline.train.causal_lm import CausalLMTrainer

    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8], "position_ids": [0, 1, 2, 3]},
        {"input_ids": [9, 10, 11], "labels": [-100, 10, 11], "position_ids": [0, 1, 2]},
    ]
    batch = FlatteningCollator()(rows)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    for config, refused in ((LEAKING["opt"](), True), (APART["llama"](), False)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        trainer = CausalLMTrainer(model=model, args=args)
        if refused:
            with pytest.raises(UserError, match="does not keep packed samples apart.*--packing"):
                trainer.compute_loss(model, batch, num_items_in_batch=4)
        else:
            assert torch.isfinite(trainer.compute_loss(model, batch, num_items_in_batch=4))


def test_pt_blocks_of_such_a_model_train_as_one_sequence(tmp_path, caplog):
    """PT always packs its documents into blocks: a model that cannot keep them apart trains each
    block as one sequence (the classic concatenation), said once, instead of being refused."""
    from transformers import TrainingArguments

    from pipeline.data.collators import PackedBlockCollator
    from pipeline.train.causal_lm import CausalLMTrainer

    block = {"input_ids": [5, 6, 7, 8, 9, 10, 11], "position_ids": [0, 1, 2, 3, 0, 1, 2]}
    batch = PackedBlockCollator(pad_token_id=1)([block])
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LEAKING["opt"]()).eval()  # no dropout
    trainer = CausalLMTrainer(model=model, args=args, blocks=True)
    with caplog.at_level("WARNING"):
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=6)
    plain = {k: v for k, v in batch.items() if k != "position_ids"}
    assert torch.allclose(loss, trainer.compute_loss(model, plain, num_items_in_batch=6))
    assert "each block trains as one sequence" in caplog.text


def test_rollout_rows_of_such_a_model_run_padded(caplog):
    from pipeline.rl import ppo_math
    from pipeline.rl.rollout import token_logprobs_and_entropy
    from tests.test_ppo_lean import full_logits, trajectory

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LEAKING["opt"](), attn_implementation="sdpa")
    model.eval()
    traj = trajectory(model.config.vocab_size)
    want = ppo_math.token_logprobs(full_logits(model, traj), traj.responses, 1.0)
    with torch.no_grad(), caplog.at_level("WARNING"):
        logp, _ = token_logprobs_and_entropy(model, traj, 1.0, with_entropy=False)
    real = traj.response_mask.bool()
    assert torch.allclose(logp[real], want[real], atol=1e-5)
    assert "its rollout rows run padded" in caplog.text


def test_padding_free_pairs_of_such_a_model_are_refused():
    from transformers import AutoModelForSequenceClassification

    from pipeline.errors import UserError
    from pipeline.model.patches import unpadded_scores

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 1, 1]])
    mask = (ids != 1).long()
    for config, refused in ((LEAKING["opt"](), True), (APART["llama"](), False)):
        config.num_labels, config.pad_token_id = 1, 1
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config).eval()
        want = model(input_ids=ids, attention_mask=mask).logits
        unpadded_scores(model)
        if refused:
            with pytest.raises(UserError, match="does not keep packed samples apart"):
                model(input_ids=ids, attention_mask=mask, unpad=True)
        else:
            got = model(input_ids=ids, attention_mask=mask, unpad=True).logits
            assert torch.allclose(got, want, atol=1e-5)
