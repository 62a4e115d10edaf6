"""Model loading: 'all' target modules, adapter resume with --peft_path, model_type check, dtype."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.args import ModelArguments, PeftArguments
from pipeline.errors import UserError
from pipeline.model.adapters import linear_module_names
from pipeline.model.loading import load_model, load_tokenizer, resolve_dtype


def test_all_means_every_linear_but_the_head(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert linear_module_names(model) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def test_peft_path_resumes_the_saved_adapter(tiny_model, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    saved = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, p in saved.named_parameters():
            if "lora_B" in name:
                p.fill_(0.25)
    saved.save_pretrained(tmp_path / "adapter")
    model_args = ModelArguments(model_name_or_path=str(tiny_model))
    model = load_model(
        model_args, PeftArguments(peft_path=str(tmp_path / "adapter")), load_tokenizer(model_args)
    )
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.requires_grad and torch.all(p == 0.25) for p in lora_b)


def test_model_type_mismatch_is_reported(tiny_model):
    model_args = ModelArguments(model_name_or_path=str(tiny_model), model_type="baichuan")
    with pytest.raises(UserError, match="is a 'llama' model"):
        load_model(model_args, PeftArguments(), load_tokenizer(model_args))


def test_cpu_dtype_is_float32_and_explicit_dtype_is_honoured(tiny_model):
    assert resolve_dtype(ModelArguments(model_name_or_path="m"), PeftArguments()) == torch.float32
    model_args = ModelArguments(model_name_or_path=str(tiny_model), torch_dtype="bfloat16")
    model = load_model(model_args, PeftArguments(use_peft=False), load_tokenizer(model_args))
    assert model.dtype == torch.bfloat16 and model.config.use_cache is False
