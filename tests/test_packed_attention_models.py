"""Packed rows attend as the model itself does: the varlen kernel keeps a model's sliding window
(Mistral, Qwen2, Gemma, gpt-oss layers), and models whose attention it cannot compute (Gemma 2's
soft cap, gpt-oss's sinks) keep transformers' own attention instead of having it silently dropped.
On the CPU the kernel is the per-sample SDPA reference (the GPU's flash kernel is compared with it
in tests/test_attention_kernel.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GptOssConfig, MistralConfig

from pipeline.model import attention

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
