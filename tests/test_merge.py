"""merge_peft_adapter: a sequence-classification (reward) adapter keeps its trained score head; a
base other than the adapter's own, or of the wrong kind, is refused."""

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.model.merge import merge_adapter


def test_reward_adapter_merge_keeps_score_head(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    peft_model = get_peft_model(
        model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(1)
    with (
        torch.no_grad()
    ):  # stand-in for training: move LoRA B and the score head away from their init
        for _name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    adapter_dir = tmp_path / "rm-adapter"
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    merged_dir = merge_adapter(str(tiny_model), str(adapter_dir), str(tmp_path / "rm-merged"))

    batch = tokenizer(
        ["What color is ka-bo? red", "ka-bo 是什么颜色? 蓝色"], return_tensors="pt", padding=True
    )
    reload = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    adapter = PeftModel.from_pretrained(reload, adapter_dir).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    fresh = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, pad_token_id=tokenizer.pad_token_id
    ).eval()
    with torch.no_grad():
        want, got = adapter(**batch).logits, merged(**batch).logits
        assert torch.allclose(got, want, atol=1e-4)
        assert not torch.allclose(fresh(**batch).logits, want, atol=1e-2)
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id


def test_merge_refuses_a_base_other_than_the_adapters_own(tiny_model, tmp_path):
    """The adapter folder records its base's fingerprint at save; another base of the same shape is
    refused (its merge would run and give a wrong model), and a base of the wrong kind is refused by
    its missing head."""
    from pipeline.errors import UserError
    from pipeline.model.merge import FINGERPRINT
    from pipeline.model.tiny_model import build
    from tests.helpers import train_sft

    adapter = train_sft(tiny_model, tmp_path / "lora", 2, "--use_peft", "True")
    assert (adapter / FINGERPRINT).is_file()
    other = build(tmp_path / "other-tiny", seed=7)  # same architecture and shapes, other weights
    with pytest.raises(
        UserError, match=f"trained on {tiny_model}, but --base_model {other} holds other weights"
    ):
        merge_adapter(str(other), str(adapter), str(tmp_path / "wrong"))
    assert not (tmp_path / "wrong").exists()
    # a fine-tuned copy of the base (4 full steps at 2e-5) is another base too
    tuned = train_sft(tiny_model, tmp_path / "tuned", 4, "--learning_rate", "2e-5")
    with pytest.raises(UserError, match=f"--base_model {tuned} holds other weights"):
        merge_adapter(str(tuned), str(adapter), str(tmp_path / "wrong"))
    # the same base saved in another dtype is still its own base
    for dtypes in ([torch.bfloat16], [torch.float16], [torch.float16, torch.bfloat16]):
        same, source = tmp_path / "-".join(map(str, dtypes)), tiny_model
        for dtype in dtypes:  # the last: rounded twice, float32 -> float16 -> bf16
            AutoModelForCausalLM.from_pretrained(source, dtype=dtype).save_pretrained(same)
            source = same
        AutoTokenizer.from_pretrained(tiny_model).save_pretrained(same)
        merged = merge_adapter(str(same), str(adapter), str(tmp_path / f"merged-{same.name}"))
        assert (merged / "config.json").is_file()
    # a reward-model folder as the base of a language-model adapter: no lm_head to merge into
    (adapter / FINGERPRINT).unlink()
    rm_folder = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(
        rm_folder
    )
    with pytest.raises(UserError, match="without the language-model output head"):
        merge_adapter(str(rm_folder), str(adapter), str(tmp_path / "wrong-kind"))
