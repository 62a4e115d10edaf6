"""Flags of another method are refused, not ignored: adapter flags under full training or the other
adapter kind, DPO's per-loss settings under another loss, and data flags the RL stages do not
read."""

from __future__ import annotations

import pytest

from pipeline.args import PeftArguments
from pipeline.errors import UserError
from stages import dpo, ppo
from tests.helpers import DATA


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (
            dict(use_peft=False, lora_rank=16),
            "--lora_rank: not read by this method \\(--use_peft False",
        ),
        (
            dict(use_peft=False, target_modules="q_proj", num_virtual_tokens=8),
            "--num_virtual_tokens, --target_modules",
        ),
        (dict(peft_type="prefix_tuning", lora_alpha=32.0), "--lora_alpha: not read .*prefix"),
        (dict(peft_type="lora", num_virtual_tokens=32), "--num_virtual_tokens: not read .*LoRA"),
    ],
)
def test_adapter_flags_of_another_method_are_refused(kwargs, named):
    with pytest.raises(UserError, match=named):
        PeftArguments(**kwargs)


def test_adapter_flags_of_the_chosen_method_and_defaults_given_aloud_pass():
    PeftArguments(
        use_peft=False, lora_rank=8, modules_to_save="embed_tokens,lm_head"
    )  # default rank; full trains them
    PeftArguments(peft_type="prefix_tuning", num_virtual_tokens=32)
    PeftArguments(lora_rank=32, lora_alpha=64.0, target_modules="q_proj,v_proj", use_dora=True)


@pytest.mark.parametrize(
    "loss, extra, named",
    [
        ("sigmoid", ("--simpo_gamma", "1.0"), "--simpo_gamma: not read by --loss_type sigmoid"),
        (
            "simpo",
            ("--desirable_weight", "2.0"),
            "--desirable_weight: not read by --loss_type simpo",
        ),
    ],
)
def test_dpo_settings_of_another_loss_are_refused(tiny_model, tmp_path, loss, extra, named):
    argv = [
        "--model_name_or_path",
        str(tiny_model),
        "--train_file_dir",
        str(DATA / "reward"),
        "--template_name",
        "qwen",
        "--output_dir",
        str(tmp_path / "o"),
        "--loss_type",
        loss,
        *extra,
    ]
    with pytest.raises(UserError, match=named):
        dpo.main(argv)


@pytest.mark.parametrize(
    "extra, named",
    [
        (
            ("--validation_split_percentage", "5"),
            "--validation_split_percentage 5.0 \\(held-out prompts come only",
        ),
        (
            ("--preprocessing_num_workers", "4"),
            "--preprocessing_num_workers \\(prompts are tokenized in this process",
        ),
    ],
)
def test_rl_stages_refuse_data_flags_they_do_not_read(tiny_model, tmp_path, extra, named):
    argv = [
        "--model_name_or_path",
        str(tiny_model),
        "--reward_model_name_or_path",
        str(tiny_model),
        "--template_name",
        "qwen",
        "--train_file_dir",
        str(DATA / "sft"),
        "--output_dir",
        str(tmp_path / "o"),
        "--max_steps",
        "1",
        *extra,
    ]
    with pytest.raises(UserError, match=named):
        ppo.parse(argv)


def test_sft_max_new_tokens_without_predict_with_generate_is_refused(tiny_model, tmp_path):
    from stages import sft

    argv = [
        "--model_name_or_path",
        str(tiny_model),
        "--train_file_dir",
        str(DATA / "sft"),
        "--template_name",
        "qwen",
        "--output_dir",
        str(tmp_path / "o"),
        "--max_new_tokens",
        "64",
    ]
    with pytest.raises(
        UserError, match="--max_new_tokens sets the held-out answers of --predict_with_generate"
    ):
        sft.main(argv)
