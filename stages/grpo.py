"""Stage 4a', GRPO and its relatives: group-relative RL without a value model. Each prompt gets
--num_generations answers; an answer's advantage is its reward against its group's. Rewards: the
reward model and/or rule rewards.

--algorithm (pipeline/rl/group_math.py holds each one's arithmetic, with hand-computed tests):
  grpo     group mean and std, clipped token ratios, each answer's tokens averaged (DeepSeekMath)
  dapo     clip-higher (0.2 / 0.28), every token of the batch weighed alike, groups whose answers
           all scored the same dropped from the update (DAPO's dynamic sampling, without its refill)
  dr_grpo  no std division, token sum over batch x --max_new_tokens (Dr. GRPO)
  gspo     one length-normalized ratio per answer, clipped at 3e-4 / 4e-4 (GSPO)
  rloo     leave-one-out baseline (RLOO)

--rl_engine own (default): the project's own loop, shared with PPO (stages/ppo.py: compiled
static-cache rollouts on a GPU, padding-free updates, checkpoints, resume, SIGTERM, the divergence
guard, DeepSpeed).
--rl_engine trl: trl's GRPOTrainer / RLOOTrainer for grpo and rloo (--ppo_epochs -> num_iterations,
--cliprange -> epsilon, --kl_coef -> beta). bench/ppo.py measures both side by side.
The PPO-only flags (GAE, value clipping, adaptive KL...) are refused.

    python stages/grpo.py --algorithm grpo --model_name_or_path outputs/sft-merged \
        --reward_funcs exact_match \
        --template_name qwen --train_file_dir data/sft --validation_file_dir data/sft_eval \
        --output_dir outputs/grpo
    torchrun --nproc_per_node 8 stages/grpo.py ...      # or: bash run_grpo.sh ...
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

import pipeline  # noqa: F401  first: its filters of known harmless library warnings (library_noise.py) precede trl

# isort: split
from datasets import Dataset
from peft import PeftModel
from transformers import TrainingArguments
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from pipeline.args import STAGE_ARGUMENTS, PPOArguments, given_flags, parse_args, trainable_dtype
from pipeline.args.checks import checkpointing_options
from pipeline.args.rl_checks import (
    GROUP_RELATIVE_FLAGS,
    check_rl_data_flags,
    check_trainer_flags,
    validate_group_relative,
)
from pipeline.data.prompts import load_rl_prompts
from pipeline.data.templates import apply_template_to_tokenizer, resolve_template
from pipeline.errors import UserError, first_line, run_cli
from pipeline.infer.generation import neutral_sampling_kwargs
from pipeline.model.adapters import unwrap
from pipeline.model.loading import load_model, load_tokenizer
from pipeline.model.stops import set_generation_stops
from pipeline.rl import distributed, group_math
from pipeline.rl.frozen import AdapterOff, Separate, own_weights
from pipeline.rl.group_math import VARIANTS
from pipeline.rl.loop import PPORecipe, run, token_share
from pipeline.rl.models import build_group_models, frozen_reward_model, reward_folder
from pipeline.rl.rewards import RULE_REWARDS, RewardScorer
from pipeline.rl.rollout import Rollouts, packed_attention, token_logprobs_and_entropy
from pipeline.rl.timing import PhaseTimer
from pipeline.run.output_dir import claim_output_dir
from pipeline.run.setup import setup_run
from pipeline.train import divergence
from pipeline.train.trainer_steps import train_and_save


class GroupRecipe(PPORecipe):
    """PPO's loop (rollouts, checkpoints, resume, evaluation) with group-relative advantages and no
    value model: for each step, rollout G answers a prompt -> score -> group advantages -> clipped
    policy epochs -> save."""

    def __init__(self, models, tokenizer, template, prompts, eval_prompts, args, training_args):
        super().__init__(models, tokenizer, template, prompts, eval_prompts, args, training_args)
        self.variant = VARIANTS[args.algorithm]
        given = (
            args.cliprange != CLIPRANGE_DEFAULT
        )  # the user's clip replaces a variant's own, on both sides
        self.eps_low = args.cliprange if given else self.variant["eps_low"] or args.cliprange
        self.eps_high = args.cliprange if given else self.variant["eps_high"] or self.eps_low
        self.use_kl = args.kl_coef > 0 and self.rollouts.reference is not None

    def prompts_per_rank(self) -> int:
        return self.batch_size // self.ppo_args.num_generations

    def train_step(self) -> dict[str, float]:
        args, variant, group = self.ppo_args, self.variant, self.ppo_args.num_generations
        torch.manual_seed(self.training_args.seed + 1000 * self.rank + self.step)
        self.policy.eval()
        # 1. This rank's prompts, each --num_generations times in consecutive rows (a group stays on
        # one rank).
        prompts = distributed.step_prompts(
            self.prompts,
            self.step,
            self.prompts_per_rank(),
            self.rank,
            self.world,
            self.training_args.seed,
        )
        timer = PhaseTimer(self.device)
        with timer.phase("generate"):
            traj = self.rollouts.generate([p for p in prompts for _ in range(group)], sample=True)
        with torch.no_grad(), self.autocast:
            with timer.phase("score"):
                scores = self.rollouts.scores(traj)
            # 2. Old log-probs (needed when the policy moves before the last minibatch) and the
            # reference's.
            with (
                timer.phase("logprobs"),
                packed_attention(
                    self.policy, own_weights(self.rollouts.reference), self.value_model
                ),
            ):
                moves = args.ppo_epochs > 1 or self.mini_batch_size < self.batch_size
                old_logp = (
                    token_logprobs_and_entropy(self.policy, traj, args.temperature, False)[0]
                    if moves
                    else None
                )
                ref_logp = (
                    self.rollouts.reference_logprobs(traj, args.temperature)
                    if self.use_kl
                    else None
                )
        # 3. Advantages against the group; groups that all scored alike leave the update (DAPO).
        advantages = group_math.group_advantages(
            scores, group, variant["scale"], variant["leave_one_out"]
        )
        kept = (
            ~group_math.zero_variance_groups(scores, group)
            if variant["dynamic_sampling"]
            else torch.ones_like(scores).bool()
        )
        # 4. Clipped policy epochs over minibatches (+ kl_coef * k3 KL to the reference).
        lr = self.updater.lr()  # the rate this iteration's updates start at (logged)
        with timer.phase("update"), packed_attention(self.policy, self.value_model):
            stats, norms, kl = self.group_epochs(traj, old_logp, ref_logp, advantages, kept)
        rmask = traj.response_mask.float()
        norm = divergence.worst(norms)
        metrics = {
            **{k: sum(s[i] for s in stats) / len(stats) for i, k in enumerate(GROUP_STATS)},
            "objective/scores": scores.mean().item(),
            "objective/scores_std": scores.std().item() if len(scores) > 1 else 0.0,
            "objective/kl": kl,
            "groups_kept": kept.float().mean().item(),
            "response_length": rmask.sum(1).mean().item(),
            "eos_fraction": traj.ended.float().mean().item(),
            "learning_rate": lr,
            "nonfinite_logits": float(traj.nonfinite),
            **({"loss_scale": self.updater.loss_scale} if self.updater.loss_scale else {}),
            **({} if norm is None else {"grad_norm": norm}),
            **timer.metrics(len(traj.ids)),
        }
        metrics = distributed.reduce_mean(metrics, self.world, self.device)
        metrics["samples_per_second"] *= self.world
        return metrics

    def group_epochs(
        self, traj, old_logp, ref_logp, advantages, kept
    ) -> tuple[list[tuple], list, float]:
        args, variant, accumulation = (
            self.ppo_args,
            self.variant,
            self.training_args.gradient_accumulation_steps,
        )
        rmask = traj.response_mask.float() * kept.float().unsqueeze(1).to(traj.response_mask.device)
        advantages = advantages.to(rmask.device)
        micro = self.mini_batch_size // accumulation
        generator = torch.Generator().manual_seed(self.training_args.seed * 1000 + self.step)
        stats, norms, kls = [], [], []
        self.policy.train()
        counts = rmask.sum(1).cpu()  # answer tokens of each row (dropped groups: none)
        tokens = variant["aggregation"] == "token_mean"  # the one mean taken over tokens
        for _ in range(args.ppo_epochs):
            order = torch.randperm(len(traj.ids), generator=generator)
            for start in range(0, len(traj.ids), self.mini_batch_size):
                mini = self.mini_tokens(counts[order[start : start + self.mini_batch_size]])
                for m_start in range(start, start + self.mini_batch_size, micro):
                    idx = order[m_start : m_start + micro].to(self.device)
                    mask = rmask[idx]
                    share = token_share(counts[idx.cpu()], mini, accumulation) if tokens else 1.0
                    with self.autocast:
                        logp, _ = token_logprobs_and_entropy(
                            self.policy, traj.select(idx), args.temperature, False
                        )
                    old = logp.detach() if old_logp is None else old_logp[idx]
                    pg_loss, clipfrac, approx_kl = group_math.clipped_policy_loss(
                        logp,
                        old,
                        advantages[idx],
                        mask,
                        self.eps_low,
                        self.eps_high,
                        variant["ratio_level"],
                        variant["aggregation"],
                        args.max_new_tokens,
                    )
                    loss, kl = pg_loss, torch.zeros(())
                    if ref_logp is not None:
                        per_token = group_math.kl_penalty(logp, ref_logp[idx])
                        loss = loss + args.kl_coef * group_math.aggregate(
                            per_token, mask, variant["aggregation"], args.max_new_tokens
                        )
                        kl = (per_token.detach() * mask).sum(1).mean()
                    self.updater.backward(loss * share)  # token means of the whole mini-batch
                    stats.append(tuple(v.item() for v in (loss, pg_loss, clipfrac, approx_kl)))
                    kls.append(kl.item())
                norms.append(self.updater.step())
        return stats, norms, sum(kls) / len(kls)


GROUP_STATS = ("loss", "loss/policy", "policy/clipfrac", "policy/approx_kl")
CLIPRANGE_DEFAULT = next(f.default for f in fields(PPOArguments) if f.name == "cliprange")


def rule_reward(name: str):
    """A trl reward function over the completions of a batch, from one of the project's rule
    rewards."""

    def reward(prompts, completions, reference, **_):
        return RULE_REWARDS[name]([c[-1]["content"] for c in completions], reference)

    reward.__name__ = name
    return reward


def build_trainer(policy, tokenizer, prompts, ppo_args, training_args, reward_model, rm_tokenizer):
    """trl's config classes repeat flags the shared dataclasses own, so they are built from the
    parsed values."""
    funcs = [reward_model if f == "model" else rule_reward(f) for f in ppo_args.reward_func_list]
    processors = [rm_tokenizer if f == "model" else None for f in ppo_args.reward_func_list]
    dataset = Dataset.from_list([{"prompt": p.messages, "reference": p.reference} for p in prompts])
    shared = {f.name: getattr(training_args, f.name) for f in fields(TrainingArguments) if f.init}
    shared["remove_unused_columns"] = False  # the rule rewards read the "reference" column
    common = dict(
        num_generations=ppo_args.num_generations,
        max_completion_length=ppo_args.max_new_tokens,
        temperature=ppo_args.temperature,
        top_p=ppo_args.top_p,
        beta=ppo_args.kl_coef,
        # NaN/inf logits of a diverging policy: sampled from, not a device assert; the guard then
        # stops the run
        generation_kwargs={
            "remove_invalid_values": True,
            # the rollouts sample softmax(logits / temperature), which the update scores: none of
            # the model's own reshaping settings (e.g. a repetition penalty)
            **neutral_sampling_kwargs(unwrap(policy).generation_config, "use --rl_engine own"),
        },
        **{trl_name: getattr(ppo_args, name) for name, trl_name in GROUP_RELATIVE_FLAGS.items()},
    )
    config_class, trainer_class = (
        (GRPOConfig, GRPOTrainer) if ppo_args.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    )
    try:
        config = config_class(**shared, **common)
    except ValueError as e:
        raise UserError(f"--algorithm {ppo_args.algorithm}: {first_line(e)}") from e
    return trainer_class(
        model=policy,
        reward_funcs=funcs,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_processing_classes=processors,
    )


ARGUMENTS = STAGE_ARGUMENTS["grpo"]


def parse(argv: list[str] | None = None):
    """The stage's flags, parsed and validated (no side effects)."""
    model_args, data_args, peft_args, ppo_args, training_args = parse_args(ARGUMENTS, argv)
    validate_group_relative(model_args, peft_args, ppo_args, training_args)
    check_rl_data_flags(data_args, training_args)
    if ppo_args.rl_engine == "own":  # trl's trainers implement the Trainer's flags themselves
        check_trainer_flags(
            training_args, given_flags(ARGUMENTS, argv), f"--algorithm {ppo_args.algorithm}"
        )
    elif {"every_n_layers", "offload"} & checkpointing_options(training_args).keys():
        # trl's trainers turn checkpointing back on with these handed to torch's checkpoint
        raise UserError(
            "--gradient_checkpointing_kwargs every_n_layers/offload: trl's trainers pass them "
            "to torch's checkpoint, which refuses them; use --rl_engine own (the default) or "
            "drop them."
        )
    return model_args, data_args, peft_args, ppo_args, training_args


def main(argv: list[str] | None = None):
    model_args, data_args, peft_args, ppo_args, training_args = parse(argv)
    if ppo_args.rl_engine == "own":
        return run(
            GroupRecipe,
            build_group_models,
            "grpo",
            model_args,
            data_args,
            peft_args,
            ppo_args,
            training_args,
        )
    setup_run(training_args)
    claim_output_dir(
        training_args,
        "grpo",
        model_args.model_name_or_path,
        data_args.train_source[0],
        peft_args.method,
    )
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(ppo_args.template_name, tokenizer, ppo_args.chat_template_kwargs)
    stop_ids = apply_template_to_tokenizer(tokenizer, template)
    prompts, eval_prompts = load_rl_prompts(data_args, ppo_args, template, tokenizer)
    policy = load_model(
        model_args,
        peft_args,
        tokenizer,
        head="lm",
        gradient_checkpointing=training_args.gradient_checkpointing,
        max_length=ppo_args.model_max_length,
        trainable_dtype=trainable_dtype(training_args),
    )
    set_generation_stops(policy, stop_ids, tokenizer.pad_token_id)
    reward_model = rm_tokenizer = None
    if "model" in ppo_args.reward_func_list:
        rm_path, rm_tokenizer = reward_folder(ppo_args, training_args, tokenizer, same_vocab=False)
        reward_model = frozen_reward_model(rm_path, unwrap(policy).dtype)
    trainer = build_trainer(
        policy, tokenizer, prompts, ppo_args, training_args, reward_model, rm_tokenizer
    )
    scorer = (
        RewardScorer(Separate(reward_model), rm_tokenizer) if reward_model is not None else None
    )
    ref_model = getattr(
        trainer, "ref_model", None
    )  # trl keeps a copy under full training with a KL term
    reference = (
        Separate(ref_model)
        if ref_model is not None
        else AdapterOff(trainer.model)
        if isinstance(trainer.model, PeftModel)
        else None
    )
    evaluator = Rollouts(
        trainer.model, reference, scorer, tokenizer, template, ppo_args, training_args
    )
    eval_prompts = (
        eval_prompts if training_args.do_eval else None
    )  # --do_eval False: no held-out evaluation
    before = evaluator.evaluate(eval_prompts) if eval_prompts else None
    if training_args.do_train:
        train_and_save(trainer, training_args)
        if training_args.should_save:
            unwrap(policy).generation_config.save_pretrained(Path(training_args.output_dir))
    if before:
        after = evaluator.evaluate(eval_prompts)
        results = {**after, **{f"{k}_before": v for k, v in before.items() if k != "eval_samples"}}
        trainer.log_metrics("eval", results)
        trainer.save_metrics("eval", results)
    return trainer


if __name__ == "__main__":
    run_cli(main)
