"""The flags the seed documents' readers type, read as this project's (pipeline/seed_flags.py): each
alias changes what its canonical flag changes and is logged once; a flag that cannot apply is
refused in one sentence naming what to use."""

import logging

import pytest

from pipeline import seed_flags
from pipeline.errors import UserError
from stages import dpo, pt, sft
from stages import ppo as ppo_stage
from tests.helpers import DATA

BASE = ["--output_dir", "/tmp/seed-flags-out", "--train_file_dir", str(DATA / "sft")]


@pytest.fixture(autouse=True)
def fresh_log_once(monkeypatch):
    """Each message is logged once per process; other test files may have said it already."""
    monkeypatch.setattr(seed_flags, "_SAID", set())
    monkeypatch.setattr(seed_flags, "_PENDING", [])


def sft_args(tiny_model, *flags):
    parsed = sft.parse(["--model_name_or_path", str(tiny_model), *BASE, *flags])
    seed_flags.say_notes()  # what a stage's setup_logging does
    return parsed


def test_renamed_flags_act_as_their_canonical_flags_and_say_so_once(tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.seed_flags")
    model, _, peft, _, train = sft_args(
        tiny_model,
        "--evaluation_strategy",
        "no",
        "--warmup_ratio",
        "0.03",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
        "--q_lora",
        "False",
    )
    assert train.warmup_steps == 0.03 and str(train.eval_strategy.value) == "no"
    assert peft.target_module_list == ["q_proj", "v_proj"] and model.qlora is False
    sft_args(tiny_model, "--evaluation_strategy", "no")
    said = [r.getMessage() for r in caplog.records if "--evaluation_strategy" in r.getMessage()]
    assert said == [
        "--evaluation_strategy (as the seed documents spell it) is read as --eval_strategy"
    ]


def test_warmup_ratio_is_a_share_of_the_run_up_to_all_of_it(tiny_model):
    *_, whole = sft_args(tiny_model, "--warmup_ratio", "1.0")
    assert 0 < whole.warmup_steps < 1  # a share: transformers reads 1 as one step
    assert whole.get_warmup_steps(1000) == 1000 and whole.get_warmup_steps(7) == 7
    assert sft_args(tiny_model, "--warmup_ratio", "0")[-1].get_warmup_steps(10) == 0
    for bad in ("1.5", "-0.5", "nan", "x"):
        with pytest.raises(UserError, match=f"--warmup_ratio must be a share .* got {bad}"):
            sft_args(tiny_model, "--warmup_ratio", bad)
    # with both, the later wins (a config file's flags come first, the command line's after)
    assert (
        sft_args(tiny_model, "--warmup_ratio", "0.1", "--warmup_steps", "5")[-1].warmup_steps == 5
    )
    assert (
        sft_args(tiny_model, "--warmup_steps", "5", "--warmup_ratio", "0.1")[-1].warmup_steps == 0.1
    )


def test_bare_booleans_mean_true(tiny_model):
    _, _, peft, _, train = sft_args(tiny_model, "--use_peft", "--bf16", "--gradient_checkpointing")
    assert peft.use_peft is True and train.bf16 is True and train.gradient_checkpointing is True


@pytest.mark.parametrize(
    "flags, mode",
    [
        (
            [
                "--efficient_loss",
                "True",
                "--split_example_loss",
                "False",
                "--last_response_loss",
                "False",
            ],
            "all",
        ),
        (
            [
                "--efficient_loss",
                "False",
                "--split_example_loss",
                "True",
                "--last_response_loss",
                "False",
            ],
            "split",
        ),
        (
            [
                "--efficient_loss",
                "False",
                "--split_example_loss",
                "False",
                "--last_response_loss",
                "True",
            ],
            "last",
        ),
    ],
)
def test_fastchat_loss_switches_are_the_multi_turn_modes(tiny_model, flags, mode):
    assert sft_args(tiny_model, *flags)[3].multi_turn_mode == mode


def test_what_training_already_does_is_accepted_and_anything_else_refused(tiny_model):
    sft_args(
        tiny_model, "--device_map", "auto", "--model_type", "auto", "--lazy_preprocess", "True"
    )
    with pytest.raises(
        UserError,
        match=r"--device_map cuda:1 cannot apply here: each training process holds its "
        r"model on its own device; drop it \(or give --device_map auto\)",
    ):
        sft_args(tiny_model, "--device_map", "cuda:1")
    with pytest.raises(UserError, match="are both True; FastChat allows one"):
        sft_args(tiny_model, "--split_example_loss", "True", "--last_response_loss", "True")
    pt_args = pt.parse(
        [
            "--model_name_or_path",
            str(tiny_model),
            "--output_dir",
            "/tmp/seed-flags-pt",
            "--train_file_dir",
            str(DATA / "pt"),
            "--packing",
            "True",
        ]
    )
    assert pt_args  # PT always packs: --packing True changes nothing and is accepted


def test_ppo_seed_flags(tiny_model):
    base = [
        "--model_name_or_path",
        str(tiny_model),
        "--reward_model_name_or_path",
        str(tiny_model),
        "--output_dir",
        "/tmp/seed-flags-ppo",
        "--train_file_dir",
        str(DATA / "sft"),
        "--max_steps",
        "1",
    ]
    _, _, _, ppo, train = ppo_stage.parse(
        [*base, "--batch_size", "8", "--max_source_length", "256", "--max_target_length", "128"]
    )
    assert (
        train.per_device_train_batch_size == 8
        and ppo.max_new_tokens == 128
        and ppo.model_max_length == 384
    )
    for flag, fix in (
        ("--early_stopping", "--target_kl"),
        ("--reward_baseline", "--whiten_rewards True"),
    ):
        with pytest.raises(UserError, match=f"{flag} has no counterpart here: .*{fix}"):
            ppo_stage.parse([*base, flag, "True"])
    pair = dpo.parse(
        [
            "--model_name_or_path",
            str(tiny_model),
            "--output_dir",
            "/tmp/seed-flags-dpo",
            "--train_file_dir",
            str(DATA / "reward"),
            "--max_source_length",
            "256",
            "--max_target_length",
            "128",
        ]
    )
    assert pair[3].max_source_length == 256  # RM and DPO read the two lengths themselves
