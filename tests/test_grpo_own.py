"""GRPO and its relatives in the project's own loop (stages/grpo.py --rl_engine own, the default):
every variant trains the policy from the reward model's scores, DAPO leaves groups that all scored
alike out of the update, a run resumes from its checkpoint (which holds no value model), and the
flags are checked. The arithmetic of each variant is hand-checked in test_group_math.py; learning on
the synthetic task in test_ppo.py."""

import json
import math

import pytest
from safetensors.torch import load_file

from pipeline.errors import UserError
from pipeline.rl.group_math import VARIANTS
from stages import grpo
from tests.helpers import DATA


def flags(policy, out, *extra, reward=None):
    return [
        "--model_name_or_path",
        str(policy),
        "--template_name",
        "qwen",
        "--train_file_dir",
        str(DATA / "sft"),
        "--output_dir",
        str(out),
        "--model_max_length",
        "128",
        "--max_new_tokens",
        "8",
        "--seed",
        "0",
        "--per_device_train_batch_size",
        "8",
        "--num_generations",
        "4",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--learning_rate",
        "1e-3",
        "--use_peft",
        "True",
        *(
            ["--reward_funcs", "model", "--reward_model_name_or_path", str(reward)]
            if reward
            else ["--reward_funcs", "exact_match"]
        ),
        *extra,
    ]


@pytest.fixture(scope="module")
def scorer(tiny_model, tmp_path_factory):
    """A reward model with a fresh score head on the tiny model: different scores for different
    answers."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("scorer")
    torch.manual_seed(3)
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(
        folder
    )
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def steps_of(out):
    return [
        h
        for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "loss" in h
    ]


@pytest.mark.parametrize("algorithm", sorted(VARIANTS))
def test_each_variant_trains_the_adapter_from_reward_model_scores(
    tiny_model, scorer, tmp_path, algorithm
):
    out = tmp_path / algorithm
    recipe = grpo.main(
        flags(
            tiny_model,
            out,
            "--algorithm",
            algorithm,
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
            reward=scorer,
        )
    )
    assert type(recipe).__name__ == "GroupRecipe" and recipe.value_model is None
    steps = steps_of(out)
    assert len(steps) == 2
    for h in steps:
        assert all(
            math.isfinite(h[k]) for k in ("loss", "loss/policy", "grad_norm", "objective/scores")
        ), h
        assert h["groups_kept"] == 1.0  # reward-model scores differ within a group
    # the rate each step trained at: the full rate first (linear decay, no warmup), then lower
    assert steps[0]["learning_rate"] == 1e-3 and 0 < steps[1]["learning_rate"] < 1e-3
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert (
        max(w.norm().item() for name, w in weights.items() if "lora_B" in name) > 0
    )  # moved off its zero init


def test_dapo_drops_groups_that_all_scored_alike(tiny_model, tmp_path):
    """exact_match with an untrained policy cut at 2 tokens: every answer scores 0, every group
    alike, nothing to learn from: DAPO keeps no group and the adapter stays at its zero init."""
    out = tmp_path / "dapo"
    grpo.main(
        flags(
            tiny_model,
            out,
            "--algorithm",
            "dapo",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
            "--max_new_tokens",
            "2",
            "--kl_coef",
            "0",
        )
    )
    (step,) = steps_of(out)
    assert step["objective/scores"] == 0 and step["groups_kept"] == 0 and step["loss"] == 0
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert max(w.norm().item() for name, w in weights.items() if "lora_B" in name) == 0


def test_a_group_run_resumes_from_its_checkpoint(tiny_model, scorer, tmp_path):
    out = tmp_path / "resume"
    grpo.main(flags(tiny_model, out, "--max_steps", "2", "--save_steps", "1", reward=scorer))
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoint-1" / "value_model").exists()
    again = tmp_path / "again"
    recipe = grpo.main(
        flags(
            tiny_model,
            again,
            "--max_steps",
            "2",
            "--save_steps",
            "1",
            "--resume_from_checkpoint",
            str(out / "checkpoint-1"),
            reward=scorer,
        )
    )
    assert recipe.step == 2
    first, resumed = steps_of(out), steps_of(again)
    assert resumed[-1]["step"] == 2 and resumed[-1]["loss"] == pytest.approx(
        first[-1]["loss"], rel=1e-4, abs=1e-7
    )


def test_group_flags_are_checked(tiny_model, tmp_path):
    with pytest.raises(UserError, match="--algorithm dapo runs in the project's own loop only"):
        grpo.main(
            flags(
                tiny_model,
                tmp_path / "x",
                "--algorithm",
                "dapo",
                "--rl_engine",
                "trl",
                "--max_steps",
                "1",
            )
        )
    with pytest.raises(UserError, match=r"must be a multiple of --num_generations \(3"):
        grpo.main(flags(tiny_model, tmp_path / "x", "--num_generations", "3", "--max_steps", "1"))
    with pytest.raises(UserError, match="--num_generations must be at least 2, got 1"):
        grpo.main(flags(tiny_model, tmp_path / "x", "--num_generations", "1", "--max_steps", "1"))
    with pytest.raises(UserError, match="--max_steps .* must be set"):
        grpo.main(flags(tiny_model, tmp_path / "x"))


def test_a_given_cliprange_replaces_a_variants_own_clip(tiny_model, tmp_path):
    own = grpo.main(
        flags(
            tiny_model,
            tmp_path / "own",
            "--algorithm",
            "gspo",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
        )
    )
    assert (own.eps_low, own.eps_high) == (3e-4, 4e-4)
    dapo = grpo.main(
        flags(
            tiny_model,
            tmp_path / "dapo",
            "--algorithm",
            "dapo",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
        )
    )
    assert (dapo.eps_low, dapo.eps_high) == (0.2, 0.28)
    given = grpo.main(
        flags(
            tiny_model,
            tmp_path / "given",
            "--algorithm",
            "gspo",
            "--cliprange",
            "0.1",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
        )
    )
    assert (given.eps_low, given.eps_high) == (0.1, 0.1)


def test_ppo_script_sends_a_group_algorithm_to_its_script(tiny_model, tmp_path):
    from stages import ppo

    with pytest.raises(UserError, match="--algorithm dapo runs in its own script .*run_grpo.sh"):
        ppo.main(flags(tiny_model, tmp_path / "x", "--algorithm", "dapo", "--max_steps", "1"))


def test_ppo_refuses_num_generations_which_belongs_to_the_group_algorithms(tiny_model, tmp_path):
    """PPO samples one answer per prompt: --num_generations is stages/grpo.py's flag, an unknown
    flag to PPO."""
    from stages import ppo

    with pytest.raises(UserError, match="--num_generations"):
        ppo.main(
            [
                "--model_name_or_path",
                str(tiny_model),
                "--reward_model_name_or_path",
                str(tiny_model),
                "--train_file_dir",
                str(DATA / "sft"),
                "--output_dir",
                str(tmp_path / "p"),
                "--num_generations",
                "4",
            ]
        )
