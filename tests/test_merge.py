"""merge_peft_adapter: a sequence-classification (reward) adapter keeps its trained score head."""

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.model.merge import merge_adapter


def test_reward_adapter_merge_keeps_score_head(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: move LoRA B and the score head away from their init
        for _name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    adapter_dir = tmp_path / "rm-adapter"
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    merged_dir = merge_adapter(str(tiny_model), str(adapter_dir), str(tmp_path / "rm-merged"))

    batch = tokenizer(["What color is ka-bo? red", "ka-bo 是什么颜色? 蓝色"], return_tensors="pt", padding=True)
    reload = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    adapter = PeftModel.from_pretrained(reload, adapter_dir).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1,
                                                               pad_token_id=tokenizer.pad_token_id).eval()
    with torch.no_grad():
        want, got = adapter(**batch).logits, merged(**batch).logits
        assert torch.allclose(got, want, atol=1e-4)
        assert not torch.allclose(fresh(**batch).logits, want, atol=1e-2)
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id
