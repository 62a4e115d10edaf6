"""A 4-bit base trained on the CPU: an eval-mode forward without gradients (evaluation, a rollout, a
reference) must not switch its layers to bitsandbytes' inference layout, whose kernel has no
backward: the adapters' gradients after it must be those before it."""

import pytest
import torch

from stages import sft
from tests.helpers import DATA


def qlora_model(tiny_model, tmp_path):
    from pipeline.model.loading import load_model, load_tokenizer

    model_args, _, peft_args, _, training_args = sft.parse(
        [
            *("--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path)),
            *("--use_peft", "True", "--load_in_4bit", "True", "--qlora", "True"),
            *("--lora_dropout", "0", "--model_max_length", "256"),
            *("--template_name", "qwen", "--train_file_dir", str(DATA / "sft")),
        ]
    )
    tokenizer = load_tokenizer(model_args)
    return load_model(
        model_args,
        peft_args,
        tokenizer,
        gradient_checkpointing=training_args.gradient_checkpointing,
    )


def lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_adapters_train_alike_after_an_eval_forward(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = qlora_model(tiny_model, tmp_path)
    quantized = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert quantized and not any(m.support_avx512bf16_for_cpu for m in quantized)
    ids = torch.arange(5, 45)[None]
    before = lora_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    after = lora_grads(model, ids)
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized
    )
    first = next(n for n in before if "layers.0." in n and "lora_B" in n)  # far from the loss
    assert before.keys() == after.keys() and before[first].abs().sum() > 0
    assert all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)
