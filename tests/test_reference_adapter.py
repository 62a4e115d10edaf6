"""The DPO/KTO reference of a LoRA policy: a new adapter's frozen copy is dropped (the base model is
the reference, computed with the adapter switched off), an adapter that changes the model keeps its
copy, and the direct switch gives exactly peft's disabled-adapter outputs."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.model import adapters, patches
from pipeline.train import preference
from stages import dpo
from tests.test_dpo import COMMON


def lora_model(tiny_model, **config):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, **config)
    peft_model = get_peft_model(model, config)
    peft_model.add_adapter("ref", config)  # what trl does for a policy without a reference
    for name, p in peft_model.named_parameters():
        if ".default." in name:
            peft_model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(p.data)
    return peft_model


def test_only_a_new_plain_lora_copy_counts_as_the_base(tiny_model):
    model = lora_model(tiny_model)
    assert adapters.reference_adapter_is_base(model)
    layer = next(m for m in model.modules() if hasattr(m, "lora_B") and "ref" in m.lora_B)
    with torch.no_grad():
        layer.lora_B["ref"].weight[0, 0] = 1e-3  # an adapter that was trained
    assert not adapters.reference_adapter_is_base(model)
    assert not adapters.reference_adapter_is_base(lora_model(tiny_model, use_dora=True))
    assert not adapters.reference_adapter_is_base(
        lora_model(tiny_model, modules_to_save=["lm_head"])
    )


def test_the_direct_switch_gives_peft_disabled_outputs_and_restores_the_model(tiny_model):
    import trl.trainer.dpo_trainer as trl_dpo

    model = lora_model(tiny_model)
    with torch.no_grad():  # a trained adapter, so that on and off differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    patches.adapters_off_for_reference()
    ids = torch.arange(3, 40)[None]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with model.disable_adapter():
            peft_off = model(input_ids=ids).logits
        with trl_dpo.use_adapter(model, None):
            ours = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.equal(on, peft_off)
    assert torch.equal(ours, peft_off) and torch.equal(after, on)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # with gradients on (not a reference forward), peft's own switch runs
    with trl_dpo.use_adapter(model, None):
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_a_model_with_a_trained_head_is_switched_off_by_peft(tiny_model):
    """modules_to_save (the reward model's head under LoRA) is not plain LoRA: the frozen read goes
    through peft's switch, which also restores the head's original copy."""
    from pipeline.model.adapters import adapters_off, plain_lora_layers

    model = lora_model(tiny_model, modules_to_save=["lm_head"])
    assert plain_lora_layers(model) is None
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)
        ids = torch.arange(3, 40)[None]
        with model.disable_adapter():
            peft_off = model(input_ids=ids).logits
        with adapters_off(model):
            ours = model(input_ids=ids).logits
        assert torch.equal(ours, peft_off) and not torch.equal(ours, model(input_ids=ids).logits)


@pytest.mark.slow
def test_lora_dpo_trains_alike_with_the_base_as_its_reference(sft_model, tmp_path, monkeypatch):
    """Two LoRA DPO runs from the same start: the reference through trl's adapter copy and switch,
    and the base with the adapter switched off: the same losses step by step; only the first keeps
    the copy."""

    def run(out):
        return dpo.main(
            [
                *("--model_name_or_path", str(sft_model), "--output_dir", str(tmp_path / out)),
                *("--validation_split_percentage", "0", "--learning_rate", "1e-3"),
                *("--max_steps", "3", "--lora_dropout", "0", "--do_eval", "False"),
                *COMMON,
                *("--logging_steps", "1"),
            ]
        )

    ours = run("base")
    with monkeypatch.context() as m:
        m.setattr(preference, "base_as_reference", lambda trainer: None)
        import trl.trainer.dpo_trainer as trl_dpo

        m.setattr(trl_dpo, "use_adapter", trl_dpo.use_adapter.replaces)
        theirs = run("copy")
    assert "ref" not in ours.model.peft_config and "ref" in theirs.model.peft_config

    def losses(trainer):
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    assert len(losses(ours)) == 3 and losses(ours)[2] < losses(ours)[0] - 1e-3  # it learns
    assert losses(ours) == pytest.approx(losses(theirs), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        ("--use_peft", "True", "--lora_dropout", "0"),
        ("--use_peft", "True", "--peft_type", "prefix_tuning", "--num_virtual_tokens", "4"),
    ],
    ids=["lora", "prefix"],
)
def test_a_resumed_dpo_adapter_run_ends_where_the_whole_run_does(method, tiny_model, tmp_path):
    """The checkpoint holds the trained adapter only (a new LoRA adapter's reference is the base;
    prefix tuning keeps trl's frozen copy): resumed from half-way, the run ends with the weights of
    the run that was never stopped."""
    import shutil

    from safetensors.torch import load_file

    def run(out, *extra):
        dpo.main(
            [
                *("--model_name_or_path", str(tiny_model), "--output_dir", str(out)),
                *("--validation_split_percentage", "0", "--learning_rate", "1e-2", *method),
                *COMMON,
                *("--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"),
                *("--do_eval", "False", *extra),
            ]
        )
        return load_file(str(out / "adapter_model.safetensors"))

    whole = run(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run(tmp_path / "resumed", "--resume_from_checkpoint", "auto")
    start = load_file(str(tmp_path / "whole" / "checkpoint-2" / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    assert any(not torch.equal(whole[k], start[k]) for k in whole)  # steps 3-4 trained
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
