"""PPO stage (own loop) and GRPO/RLOO: the arithmetic against hand-computed values, learning on the
synthetic task from a partly trained SFT policy, determinism, exact resume, LoRA sharing,
torchrun."""

import json
import math
import os
import subprocess

import pytest
import torch

from pipeline.args.rl_checks import check_loop_flags
from pipeline.errors import UserError
from pipeline.model.stops import response_mask
from pipeline.rl import ppo_math as rl
from pipeline.rl.frozen import AdapterOff
from pipeline.rl.saving import load_trainable
from stages import grpo, ppo
from tests.helpers import DATA, REPO, lora_b_norms, read_scalars


def common(policy, reward, out, *extra):
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
        "32",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        *(["--reward_model_name_or_path", str(reward)] if reward else []),
        *extra,
    ]


# ---------------------------------------------------------------- arithmetic, by hand


def test_gae_by_hand():
    rewards, values, mask = (
        torch.tensor([[0.0, 0.0, 1.0]]),
        torch.tensor([[0.5, 0.6, 0.7]]),
        torch.ones(1, 3),
    )
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.4, 0.3]])) and torch.allclose(
        ret, torch.ones(1, 3)
    )
    adv, _ = rl.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # delta2 = 1 - .7 = .3; delta1 = .9*.7 - .6 = .03, A1 = .03 + .45*.3;
    # delta0 = .9*.6 - .5 = .04, A0 = .04 + .45*A1
    assert torch.allclose(adv, torch.tensor([[0.04 + 0.45 * 0.165, 0.165, 0.3]]))
    # padding after the last real token: its value and reward are ignored, the episode ends there
    adv, _ = rl.gae(
        torch.tensor([[0.0, 1.0, 5.0]]),
        torch.tensor([[0.5, 0.6, 9.0]]),
        torch.tensor([[1.0, 1.0, 0.0]]),
        1.0,
        1.0,
    )
    assert torch.allclose(adv, torch.tensor([[0.5, 0.4, 0.0]]))


def test_whitening_kl_and_shaped_rewards_by_hand():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(
        rl.whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6
    )  # mean 2, unbiased var 1
    assert torch.allclose(
        rl.whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6
    )
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert rl.kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert rl.kl_estimate(logp, ref, "k3").item() == pytest.approx(
        -0.5 + math.log(2)
    )  # (q/p - 1) - log(q/p)
    # exact KL over a 2-token vocabulary: p = (3/4, 1/4), q = (1/2, 1/2); and zero for equal
    # distributions
    p, q = torch.log(torch.tensor([[[0.75, 0.25]]])), torch.log(torch.tensor([[[0.5, 0.5]]]))
    assert rl.full_kl(p, q).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert rl.full_kl(p + 3.0, p).item() == pytest.approx(
        0.0, abs=1e-6
    )  # logits are shift-invariant
    rewards = rl.shaped_rewards(
        torch.tensor([2.0]), torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[1.0, 1.0, 0.0]]), 0.5
    )
    assert torch.allclose(rewards, torch.tensor([[-0.05, 1.9, 0.0]]))


def test_clipped_losses_by_hand():
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    loss, clipfrac, approx_kl = rl.policy_loss(logp, old, torch.ones(1, 2), mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)  # max(-1.5, -1.2) and max(-0.5, -0.8)
    assert clipfrac.item() == 0.5
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    vloss, vclip = rl.value_loss(
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([[0.5, 0.5]]),
        torch.tensor([[2.0, 0.0]]),
        mask,
        0.2,
    )
    assert (
        vloss.item() == pytest.approx(0.5 * (1.3**2 + 0.3**2) / 2) and vclip.item() == 1.0
    )  # clipped to 0.7 and 0.3


def test_adaptive_kl_and_response_mask():
    kl = rl.AdaptiveKLController(0.1, target=1.0, horizon=100)
    kl.update(current_kl=2.0, n_steps=10)  # error clipped to +0.2: coef * (1 + 0.2 * 10 / 100)
    assert kl.value == pytest.approx(0.102)
    fixed = rl.AdaptiveKLController(0.1)
    fixed.update(5.0, 10)
    assert fixed.value == 0.1
    mask, ended = response_mask(torch.tensor([[5, 7, 2, 2], [5, 6, 6, 6]]), stop_ids=[2])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]] and ended.tolist() == [True, False]


# ---------------------------------------------------------------- learning


def test_ppo_raises_heldout_reward_and_accuracy(weak_sft_model, reward_model, tmp_path):
    out = tmp_path / "ppo"
    ppo.main(
        common(
            weak_sft_model,
            reward_model,
            out,
            "--validation_file_dir",
            str(DATA / "sft_eval"),
            "--use_peft",
            "False",
            "--learning_rate",
            "1e-5",
            "--max_steps",
            "40",
            "--logging_steps",
            "5",
            "--save_steps",
            "20",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "20",
            "--report_to",
            "tensorboard",
        )
    )
    results = json.loads((out / "eval_results.json").read_text())
    # measured: reward -1.05 -> 0.16, exact match 0.375 -> 0.50, KL to the reference ~0.05 nats per
    # answer
    assert results["eval_score"] > results["eval_score_before"] + 0.5, results
    assert results["eval_exact_match"] > results["eval_exact_match_before"], results
    kls = [
        h["objective/kl"]
        for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "objective/kl" in h
    ]
    assert kls and max(kls) < 1.0 and 0 <= results["eval_kl"] < 1.0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "eval_score" in h] == [
        0,
        20,
        40,
    ]  # before, every --eval_steps, after
    assert read_scalars(out / "logs", "train/objective/scores") and read_scalars(
        out / "logs", "eval_score"
    )
    # per-phase times of every logged step, in the step log, trainer_state.json and tensorboard
    timed = [h for h in history if "objective/kl" in h]
    for h in timed:
        phases = [h[f"time/{k}"] for k in ("generate", "score", "logprobs", "update")]
        assert (
            min(phases) > 0
            and h["time/step"] == pytest.approx(sum(phases), rel=1e-3)
            and h["samples_per_second"] > 0
        )
    assert len(read_scalars(out / "logs", "train/time/generate")) == len(timed)
    # the saved policy carries the template and stops on its end-of-turn token, ready to be the next
    # stage's input
    from transformers import AutoTokenizer, GenerationConfig

    assert AutoTokenizer.from_pretrained(out).chat_template
    end_of_turn = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in GenerationConfig.from_pretrained(out).eos_token_id
    assert (out / "checkpoint-20" / "value_model").is_dir() and not list(
        out.glob("tmp-*")
    )  # saved whole, renamed


def untimed(history_entry: dict) -> dict:
    """A step's statistics without its wall times (which differ run to run)."""
    return {
        k: v
        for k, v in history_entry.items()
        if not k.startswith("time/") and k != "samples_per_second"
    }


def test_same_seed_same_losses_and_exact_resume_with_lora(weak_sft_model, reward_model, tmp_path):
    lora = [
        "--use_peft",
        "True",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler_type",
        "constant",
        "--save_steps",
        "2",
    ]
    loop = ppo.main(common(weak_sft_model, reward_model, tmp_path / "a", *lora, "--max_steps", "3"))
    reference, reward = (
        loop.rollouts.reference,
        loop.rollouts.scorer.reward,
    )  # adapters off: one copy of each base
    assert isinstance(reference, AdapterOff) and reference.model is loop.policy
    assert isinstance(reward, AdapterOff) and reward.model is loop.value_model
    first = ppo.main(
        common(weak_sft_model, reward_model, tmp_path / "b", *lora, "--max_steps", "1")
    )
    assert untimed(first.log_history[0]) == untimed(
        loop.log_history[0]
    )  # same seed: identical first-step losses and statistics
    resumed_dir = tmp_path / "c"
    resumed_dir.mkdir()
    subprocess.run(["cp", "-r", str(tmp_path / "a" / "checkpoint-2"), str(resumed_dir)], check=True)
    resumed = ppo.main(
        common(
            weak_sft_model,
            reward_model,
            resumed_dir,
            *lora,
            "--max_steps",
            "3",
            "--resume_from_checkpoint",
            "auto",
        )
    )
    # step 3 after resuming at 2 equals the uninterrupted run
    assert untimed(resumed.log_history[-1]) == untimed(loop.log_history[-1])
    assert (
        loop.log_history[-1]["step"] == 3
        and loop.log_history[0]["loss"] != loop.log_history[-1]["loss"]
    )


def test_missing_eos_penalty_and_adaptive_kl_act_in_the_loop(
    weak_sft_model, reward_model, tmp_path
):
    short = [
        "--use_peft",
        "True",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "2",
        "--max_new_tokens",
        "2",
        "--save_strategy",
        "no",
    ]
    plain = ppo.main(common(weak_sft_model, reward_model, tmp_path / "a", *short))
    tuned = ppo.main(
        common(
            weak_sft_model,
            reward_model,
            tmp_path / "b",
            *short,
            "--missing_eos_penalty",
            "3.0",
            "--target_kl",
            "0.01",
            "--kl_horizon",
            "100",
        )
    )
    first_plain, first, second = plain.log_history[0], tuned.log_history[0], tuned.log_history[1]
    # same seed, same samples at step 1: the penalty lowers the mean score by 3 x the share cut off
    # without a stop token
    assert first["eos_fraction"] < 1
    penalized = first_plain["objective/scores"] - 3.0 * (1 - first["eos_fraction"])
    assert first["objective/scores"] == pytest.approx(penalized, abs=1e-4)
    # the coefficient used at step 2 is the controller's update from step 1's KL (32 rollouts,
    # horizon 100)
    error = min(max(first["objective/kl"] / 0.01 - 1, -0.2), 0.2)
    assert first["kl_coef"] == 0.05 and second["kl_coef"] == pytest.approx(
        0.05 * (1 + error * 32 / 100), abs=1e-5
    )
    assert plain.log_history[1]["kl_coef"] == 0.05  # no target: fixed
    # the rate each step trained at (linear decay, no warmup): the full rate first, then lower
    rates = [h["learning_rate"] for h in plain.log_history[:2]]
    assert rates[0] == 1e-3 and 0 < rates[1] < 1e-3


def test_a_small_learning_rate_is_logged_as_it_is(weak_sft_model, reward_model, tmp_path):
    ppo.main(
        common(
            weak_sft_model, reward_model, tmp_path / "o", "--use_peft", "True",
            "--learning_rate", "5e-7", "--lr_scheduler_type", "constant", "--max_steps", "1",
            "--max_new_tokens", "2", "--save_strategy", "no",
        )
    )  # fmt: skip
    state = json.loads((tmp_path / "o" / "trainer_state.json").read_text())
    assert state["log_history"][0]["learning_rate"] == 5e-7  # was rounded to 0.0


def test_gradient_checkpointing_saves_fewer_activations_and_keeps_the_losses(
    weak_sft_model, reward_model, tmp_path
):
    def one_step(out, *flags):
        loop = ppo.main(
            common(
                weak_sft_model,
                reward_model,
                out,
                "--use_peft",
                "True",
                "--learning_rate",
                "1e-3",
                "--max_steps",
                "1",
                "--ppo_epochs",
                "1",
                "--save_strategy",
                "no",
                "--do_train",
                "False",
                *flags,
            )
        )
        saved = []  # every tensor autograd keeps for the backward pass during the step

        def pack(t):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loop.train(None)
        return loop.log_history[0], sum(saved)

    plain, plain_saved = one_step(tmp_path / "a", "--gradient_checkpointing", "False")
    checkpointed, checkpointed_saved = one_step(tmp_path / "b")  # on by default for PPO
    assert checkpointed_saved < plain_saved / 2, (
        checkpointed_saved,
        plain_saved,
    )  # layers keep only their inputs
    assert checkpointed["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def test_resume_refuses_weights_of_another_model(weak_sft_model, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weak_sft_model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "whole").mkdir()
    save_file(weights, str(tmp_path / "whole" / "model.safetensors"))
    load_trainable(model, tmp_path / "whole")  # every weight back: fine
    dropped = next(k for k in weights if "layers.0.mlp" in k)
    (tmp_path / "partial").mkdir()
    save_file(
        {k: v for k, v in weights.items() if k != dropped},
        str(tmp_path / "partial" / "model.safetensors"),
    )
    with pytest.raises(UserError, match=f"lacks 1 weights of this model \\(e.g. {dropped}\\)"):
        load_trainable(model, tmp_path / "partial")
    (tmp_path / "extra").mkdir()
    save_file(
        {**weights, "score.weight": torch.zeros(1, 4)},
        str(tmp_path / "extra" / "model.safetensors"),
    )
    with pytest.raises(UserError, match="holds 1 weights this model has not"):
        load_trainable(model, tmp_path / "extra")


def test_qlora_policy_trains_and_saves_an_adapter(weak_sft_model, reward_model, tmp_path):
    loop = ppo.main(
        common(
            weak_sft_model,
            reward_model,
            tmp_path / "q",
            "--qlora",
            "True",
            "--load_in_4bit",
            "True",
            "--learning_rate",
            "1e-3",
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "8",
        )
    )
    assert loop.policy.is_loaded_in_4bit and isinstance(loop.rollouts.reference, AdapterOff)
    assert math.isfinite(loop.log_history[0]["loss"])
    norms = lora_b_norms(tmp_path / "q" / "adapter_model.safetensors")
    assert norms and min(norms) > 0  # the PPO update trained the adapter on the 4-bit base


def test_grpo_with_a_rule_reward_raises_heldout_accuracy(weak_sft_model, tmp_path):
    """The project's own loop (--rl_engine own, the default)."""
    out = tmp_path / "grpo"
    grpo.main(
        common(
            weak_sft_model,
            None,
            out,
            "--algorithm",
            "grpo",
            "--reward_funcs",
            "exact_match",
            "--validation_file_dir",
            str(DATA / "sft_eval"),
            "--use_peft",
            "False",
            "--num_generations",
            "16",
            "--per_device_train_batch_size",
            "64",
            "--temperature",
            "0.5",
            "--learning_rate",
            "3e-5",
            "--max_steps",
            "30",
            "--logging_steps",
            "5",
            "--save_strategy",
            "no",
        )
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_exact_match"] > results["eval_exact_match_before"] + 0.05, (
        results
    )  # measured 0.375 -> 0.479


def test_rloo_trains_with_the_reward_model(weak_sft_model, reward_model, tmp_path):
    trainer = grpo.main(
        common(
            weak_sft_model,
            reward_model,
            tmp_path / "rloo",
            "--algorithm",
            "rloo",
            "--rl_engine",
            "trl",
            "--num_generations",
            "4",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "1e-4",
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
            "--ppo_epochs",
            "2",
            "--cliprange",
            "0.1",
        )
    )
    assert (
        trainer.args.num_iterations == 2 and trainer.args.epsilon == 0.1
    )  # the PPO flags under trl's names
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert trainer.state.global_step == 2 and rewards and all(math.isfinite(r) for r in rewards)
    norms = [p.norm().item() for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert norms and max(norms) > 0  # the RLOO update moved the adapter off its zero init


@pytest.mark.slow
def test_torchrun_two_processes_stay_in_sync_with_an_rm_adapter(
    sft_model, weak_sft_model, tmp_path
):
    from stages import rm

    rm_adapter = tmp_path / "rm-lora"
    rm.main(
        [
            "--model_name_or_path",
            str(sft_model),
            "--output_dir",
            str(rm_adapter),
            "--template_name",
            "qwen",
            "--train_file_dir",
            str(DATA / "reward"),
            "--validation_split_percentage",
            "0",
            "--use_peft",
            "True",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--model_max_length",
            "128",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
        ]
    )
    out = tmp_path / "ppo-ddp"
    env = {**os.environ, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            "bash",
            "run_ppo.sh",
            *common(
                weak_sft_model,
                rm_adapter,
                out,
                "--use_peft",
                "False",
                "--per_device_train_batch_size",
                "8",
                "--max_steps",
                "2",
                "--learning_rate",
                "1e-5",
            ),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trained weights identical on all 2 processes" in run.stdout
    assert (
        out / "reward_model_merged" / "config.json"
    ).is_file()  # the RM adapter was merged once, by rank 0
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 2


def test_clear_errors(weak_sft_model, tmp_path):
    with pytest.raises(UserError, match="needs --reward_model_name_or_path"):
        ppo.main(common(weak_sft_model, None, tmp_path / "x", "--max_steps", "1"))
    with pytest.raises(UserError, match="--algorithm grpo runs in its own script .*run_grpo.sh"):
        ppo.main(
            common(
                weak_sft_model,
                None,
                tmp_path / "x",
                "--algorithm",
                "grpo",
                "--reward_funcs",
                "exact_match",
            )
        )
    with pytest.raises(UserError, match="unknown"):
        grpo.main(
            common(
                weak_sft_model,
                None,
                tmp_path / "x",
                "--algorithm",
                "grpo",
                "--reward_funcs",
                "bleu",
            )
        )
    with pytest.raises(
        UserError, match="--whiten_rewards, --missing_eos_penalty belong to --algorithm ppo"
    ):
        grpo.main(
            common(
                weak_sft_model,
                None,
                tmp_path / "x",
                "--algorithm",
                "grpo",
                "--reward_funcs",
                "exact_match",
                "--whiten_rewards",
                "True",
                "--missing_eos_penalty",
                "1",
            )
        )
    with pytest.raises(UserError, match="--optim adafactor: the PPO loop trains with torch AdamW"):
        ppo.main(common(weak_sft_model, tmp_path / "rm", tmp_path / "x", "--optim", "adafactor"))
    from types import SimpleNamespace  # --fp16 itself needs a GPU; the loop's own check, on its own

    with pytest.raises(
        UserError, match="--fp16 with --deepspeed is not supported by the PPO loop"
    ):  # fp16: test_fp16.py
        check_loop_flags(
            SimpleNamespace(
                optim="adamw_torch", fp16=True, deepspeed="deepspeed_configs/zero2.json"
            )
        )
    with pytest.raises(UserError, match="P-Tuning|peft_type prefix_tuning is for SFT"):
        ppo.main(
            common(weak_sft_model, tmp_path / "rm", tmp_path / "x", "--peft_type", "prefix_tuning")
        )
