"""The own RL loops (stages/ppo.py; stages/grpo.py --rl_engine own) take the Trainer's flags they
implement and refuse the others instead of ignoring them; --do_eval, --lr_scheduler_kwargs and
--per_device_eval_batch_size act; a reward model folder without a score head is refused on every
path that loads one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pipeline.errors import UserError
from pipeline.rl.engine import _schedule
from stages import grpo, ppo
from tests.helpers import DATA
from tests.test_grpo_own import flags as group_flags


def ppo_flags(policy, reward, out, *extra):
    return [
        "--model_name_or_path",
        str(policy),
        "--reward_model_name_or_path",
        str(reward),
        "--template_name",
        "qwen",
        "--train_file_dir",
        str(DATA / "sft"),
        "--output_dir",
        str(out),
        "--model_max_length",
        "128",
        "--max_new_tokens",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "1",
        "--report_to",
        "none",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, named",
    [
        (("--num_train_epochs", "2"), "--num_train_epochs: the loop runs --max_steps"),
        (("--eval_on_start", "True"), "--eval_on_start: the loop evaluates its start model"),
        (
            ("--torch_compile", "True", "--label_smoothing_factor", "0.1"),
            "--label_smoothing_factor, --torch_compile: Trainer",
        ),
    ],
)
def test_ppo_refuses_trainer_flags_it_would_ignore(tiny_model, tmp_path, extra, named):
    with pytest.raises(UserError, match=named):
        ppo.parse(ppo_flags(tiny_model, tiny_model, tmp_path / "o", *extra))


def test_ppo_takes_the_trainer_flags_it_implements_and_defaults_given_aloud(tiny_model, tmp_path):
    ppo.parse(
        ppo_flags(
            tiny_model,
            tiny_model,
            tmp_path / "o",
            "--warmup_steps",
            "0.1",
            "--lr_scheduler_type",
            "cosine",
            "--save_total_limit",
            "2",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "5",
            "--validation_file_dir",
            str(DATA / "sft_eval"),
            "--logging_strategy",
            "steps",
            "--num_train_epochs",
            "3",
        )
    )  # the last two at their defaults


def test_group_loops_refuse_them_too_and_trl_takes_them(tiny_model, tmp_path):
    with pytest.raises(
        UserError, match="--neftune_noise_alpha: Trainer flag.*--algorithm dapo loop"
    ):
        grpo.parse(
            group_flags(
                tiny_model,
                tmp_path / "o",
                "--algorithm",
                "dapo",
                "--max_steps",
                "1",
                "--neftune_noise_alpha",
                "5",
            )
        )
    grpo.parse(
        group_flags(
            tiny_model,
            tmp_path / "o",
            "--rl_engine",
            "trl",
            "--max_steps",
            "1",
            "--neftune_noise_alpha",
            "5",
        )
    )  # trl's GRPOTrainer is a Trainer: it implements them


def test_do_eval_false_skips_the_held_out_evaluation(tiny_model, tmp_path):
    out = tmp_path / "g"
    common = [
        "--validation_file_dir",
        str(DATA / "sft_eval"),
        "--max_steps",
        "1",
        "--save_strategy",
        "no",
    ]
    grpo.main(group_flags(tiny_model, tmp_path / "with", *common))
    assert "eval_exact_match_before" in json.loads(
        (tmp_path / "with" / "eval_results.json").read_text()
    )
    grpo.main(group_flags(tiny_model, out, *common, "--do_eval", "False"))
    assert (
        not (out / "eval_results.json").exists() and (out / "adapter_model.safetensors").is_file()
    )


def test_lr_scheduler_kwargs_reach_the_loops_schedule():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=1.0)
    t = SimpleNamespace(
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": 0.25},
        get_warmup_steps=lambda n: 0,
    )
    schedule = _schedule(optimizer, t, 10)
    for _ in range(10):
        optimizer.step(), schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(0.25)


@pytest.mark.parametrize("engine", ["own", "trl"])
def test_a_language_model_folder_as_the_reward_model_is_refused(tiny_model, tmp_path, engine):
    """Its score head would start random: every answer scored by noise."""
    with pytest.raises(UserError, match="without the reward \\(score\\) head"):
        grpo.main(
            group_flags(
                tiny_model,
                tmp_path / "o",
                "--rl_engine",
                engine,
                "--algorithm",
                "grpo",
                "--max_steps",
                "1",
                reward=tiny_model,
            )
        )


def test_the_pipeline_configs_flag_check_runs_the_stage_checks(tmp_path):
    """run_pipeline.sh checks every stage's flags before the first trains: the loop's refusals
    included."""
    from pipeline.tools import pipeline_config

    config = tmp_path / "run.yaml"
    config.write_text("stages: [sft, rm, ppo]\nflags:\n  ppo:\n    num_train_epochs: 2\n")
    with pytest.raises(UserError, match="--num_train_epochs"):
        pipeline_config.check_flags(
            pipeline_config.load(str(config)), str(config), str(tmp_path / "runs")
        )


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_evaluation_during_training_needs_held_out_prompts(stage, tiny_model, tmp_path):
    module = {"ppo": ppo, "grpo": grpo}[stage]
    argv = (
        ppo_flags(tiny_model, tiny_model, tmp_path / "o")
        if stage == "ppo"
        else group_flags(tiny_model, tmp_path / "o", "--max_steps", "1")
    ) + ["--eval_strategy", "steps", "--eval_steps", "1"]
    with pytest.raises(UserError, match="--eval_strategy steps evaluates during training, but"):
        module.parse(argv)  # it ran and never evaluated
    module.parse(argv + ["--validation_file_dir", str(DATA / "sft_eval")])
