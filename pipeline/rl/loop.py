"""The own RL loop of PPO (and, through stages/grpo.py's subclass, GRPO and its relatives).

One iteration = one step: roll out answers, score them, shape rewards with the KL to the reference,
GAE advantages, then PPO epochs of clipped policy + value updates. The models (policy, reference,
value model from the RM, reward model) are built in models.py; the recipe holds the parts a step
uses: the rollouts (rollout.py: generation, reference log-probs, reward scores, held-out
evaluation), the updater (engine.py: plain torch or a DeepSpeed ZeRO-2/3 engine, --deepspeed) and
the KL controller; the arithmetic is in ppo_math.py (group_math.py for GRPO), checkpoints in
saving.py, phase timing in timing.py.

SIGTERM: the ranks finish the step, save checkpoint-N, exit 143 (no final model); `auto` resume
continues.
NaN/inf logits, loss or gradient norm: the step is logged and not saved; too many in a row stop the
run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.args.checks import checkpointing_options
from pipeline.data.prompts import load_rl_prompts
from pipeline.data.templates import apply_template_to_tokenizer, resolve_template
from pipeline.errors import UserError
from pipeline.model.adapters import unwrap
from pipeline.model.loading import load_tokenizer
from pipeline.model.stops import set_generation_stops
from pipeline.rl import distributed, ppo_math, saving
from pipeline.rl.engine import DeepSpeedUpdater, PPOPair, TorchUpdater, sharded_inference
from pipeline.rl.frozen import Separate, own_weights
from pipeline.rl.models import PPOModels, ValueModel, prepare_for_rl
from pipeline.rl.rewards import RewardScorer
from pipeline.rl.rollout import (
    Rollouts,
    autocast_for,
    packed_attention,
    token_logprobs_and_entropy,
    values,
)
from pipeline.rl.timing import PhaseTimer
from pipeline.run.checkpoints import Preemption, exit_preempted, storage_errors
from pipeline.run.output_dir import claim_output_dir, take_output_dir
from pipeline.run.resume import resolve_resume_checkpoint
from pipeline.run.setup import setup_run, tensorboard_writer
from pipeline.train import divergence
from pipeline.train.trainer_steps import record_adapter_base

logger = logging.getLogger("pipeline.ppo")


def _kept(value: float) -> float:
    """A logged figure as trainer_state.json keeps it: 7 significant digits (a learning rate of
    5e-7 is not 0), whole counts as they are."""
    return value if isinstance(value, int) else float(f"{value:.7g}")


STEP_LOG_KEYS = (
    "objective/scores",
    "objective/kl",
    "loss",
    "eval_score",
    "eval_exact_match",
    "time/generate",
    "time/score",
    "time/logprobs",
    "time/update",
    "samples_per_second",
)


def token_share(micro_counts: torch.Tensor, mini_tokens: float, accumulation: int) -> float:
    """The factor that makes a micro-batch's token mean its share of the token mean over its whole
    mini-batch (every micro-batch of every rank): the updater divides each micro-batch's loss by
    the accumulation steps and averages the ranks' gradients, which would weigh a micro-batch of
    few answer tokens like one of many. `mini_tokens`: the mini-batch's tokens averaged over the
    ranks (mini_tokens)."""
    return float(micro_counts.sum()) * accumulation / mini_tokens if mini_tokens else 1.0


class PPORecipe:
    """setup (__init__) -> train: for each step, rollout -> score -> advantages -> PPO epochs ->
    save."""

    def __init__(
        self, models: PPOModels, tokenizer, template, prompts, eval_prompts, ppo_args, training_args
    ):
        self.ppo_args, self.training_args, self.tokenizer = ppo_args, training_args, tokenizer
        self.policy = models.policy
        self.value_model = models.value_model  # None: GRPO and its relatives (stages/grpo.py)
        self.value = None if self.value_model is None else ValueModel(self.value_model)
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.device, self.autocast = training_args.device, autocast_for(training_args)
        self.rank, self.world = training_args.process_index, training_args.world_size
        self.batch_size = training_args.per_device_train_batch_size
        self.mini_batch_size = ppo_args.mini_batch_size or self.batch_size
        if len(prompts) < self.prompts_per_rank() * self.world:
            raise UserError(
                f"{len(prompts)} usable training prompts cannot fill one step of "
                f"{self.prompts_per_rank()} per process x {self.world} processes; add prompts or "
                "lower --per_device_train_batch_size."
            )
        for model in (self.policy, self.value_model):
            if model is not None:
                prepare_for_rl(
                    model,
                    training_args.gradient_checkpointing,
                    checkpointing_options(training_args),
                )
        # the update: plain torch, or one DeepSpeed ZeRO-2/3 engine over policy + value model
        # (pipeline/rl/engine.py)
        pair, accumulation = (
            PPOPair(self.policy, self.value_model),
            training_args.gradient_accumulation_steps,
        )
        updates = (
            training_args.max_steps
            * ppo_args.ppo_epochs
            * (self.batch_size // self.mini_batch_size)
        )
        self.updater = (
            DeepSpeedUpdater(
                pair,
                training_args,
                updates,
                self.mini_batch_size // accumulation,
                accumulation,
                unwrap(self.policy).config.hidden_size,
            )
            if training_args.deepspeed
            else TorchUpdater(pair, training_args, updates, accumulation)
        )
        reference, reward = models.reference, models.reward
        if getattr(
            self.updater, "sharded", False
        ):  # ZeRO-3: frozen copies of their own stay sharded too
            reference, reward = (
                Separate(sharded_inference(f.model, self.updater.config))
                if isinstance(f, Separate)
                else f
                for f in (reference, reward)
            )
        scorer = None if reward is None else RewardScorer(reward, models.reward_tokenizer)
        self.rollouts = Rollouts(
            self.policy, reference, scorer, tokenizer, template, ppo_args, training_args
        )
        self.rollouts.generation_context = (
            self.updater.generation
        )  # ZeRO-3 gathers the policy for a rollout
        self.kl = ppo_math.AdaptiveKLController(
            ppo_args.kl_coef, ppo_args.target_kl, ppo_args.kl_horizon
        )
        self.step, self.log_history = 0, []
        self.writer = tensorboard_writer(training_args)
        self.nonfinite = divergence.NonFiniteSteps(
            training_args.max_nonfinite_steps, "PPO", not training_args.deepspeed
        )
        self.stopped_finite = True  # whether the step a SIGTERM stopped at was finite (saved)

    def prompts_per_rank(self) -> int:
        return self.batch_size

    # --- one iteration

    def train_step(self) -> dict[str, float]:
        args = self.ppo_args
        torch.manual_seed(
            self.training_args.seed + 1000 * self.rank + self.step
        )  # each rank samples its own; resumable
        (
            self.policy.eval(),
            self.value_model.eval(),
        )  # generation with its cache; dropout is off in both modes
        # 1. Sample this rank's prompts and generate answers (sampling: temperature, top_p).
        prompts = distributed.step_prompts(
            self.prompts, self.step, self.batch_size, self.rank, self.world, self.training_args.seed
        )
        timer = PhaseTimer(self.device)
        with timer.phase("generate"):
            traj = self.rollouts.generate(prompts, sample=True)
        with torch.no_grad(), self.autocast:
            # 2. Score the answers with the reward model (and rule rewards); penalize answers
            # without a stop token.
            with timer.phase("score"):
                scores = self.rollouts.scores(traj)
                if args.missing_eos_penalty is not None:
                    scores = scores - args.missing_eos_penalty * (~traj.ended).float()
            # 3. Log-probs of the sampled tokens under the policy (old) and the reference; values of
            # each state.
            with (
                timer.phase("logprobs"),
                packed_attention(
                    self.policy, own_weights(self.rollouts.reference), self.value_model
                ),
            ):
                old_logp, entropy = token_logprobs_and_entropy(self.policy, traj, args.temperature)
                ref_logp = self.rollouts.reference_logprobs(traj, args.temperature)
                old_values = values(self.value, traj)
        rmask = traj.response_mask.float()
        # 4. Per-token rewards: -kl_coef * KL(policy || reference) on every token, the score on the
        # last one.
        kl = ppo_math.kl_estimate(old_logp, ref_logp, args.kl_estimator) * rmask
        rewards = ppo_math.shaped_rewards(scores, kl, rmask, self.kl.value)
        if args.whiten_rewards:
            rewards = ppo_math.whiten(rewards, rmask, shift_mean=False)
        # 5. Advantages and returns by GAE; advantages whitened over the batch.
        advantages, returns = ppo_math.gae(rewards, old_values, rmask, args.gamma, args.lam)
        advantages = ppo_math.whiten(advantages, rmask)
        # 6. PPO epochs over shuffled minibatches: clipped policy loss + vf_coef * clipped value
        # loss.
        lr = self.updater.lr()  # the rate this iteration's updates start at (logged)
        with timer.phase("update"), packed_attention(self.policy, self.value_model):
            stats, norms = self.ppo_epochs(traj, old_logp, old_values, advantages, returns)
        # 7. Report this iteration and adapt the KL coefficient (if a target is set).
        norm = divergence.worst(norms)
        metrics = {
            **ppo_math.PPOStats.mean(stats),
            **ppo_math.rollout_metrics(
                scores, kl, entropy, rmask, traj.ended, old_values, self.kl.value
            ),
            "learning_rate": lr,
            "nonfinite_logits": float(traj.nonfinite),
            **({"loss_scale": self.updater.loss_scale} if self.updater.loss_scale else {}),  # fp16
            **({} if norm is None else {"grad_norm": norm}),
            **timer.metrics(len(prompts)),
        }
        metrics = distributed.reduce_mean(metrics, self.world, self.device)
        metrics["samples_per_second"] *= (
            self.world
        )  # every rank's rollouts, in the mean rank's time
        self.kl.update(metrics["objective/kl"], self.batch_size * self.world)
        return metrics

    def ppo_epochs(
        self, traj, old_logp, old_values, advantages, returns
    ) -> tuple[list[ppo_math.PPOStats], list]:
        args, accumulation = self.ppo_args, self.training_args.gradient_accumulation_steps
        rmask, stats, norms = traj.response_mask.float(), [], []
        micro = self.mini_batch_size // accumulation
        generator = torch.Generator().manual_seed(self.training_args.seed * 1000 + self.step)
        (
            self.policy.train(),
            self.value_model.train(),
        )  # training mode: gradient checkpointing acts only there
        counts = rmask.sum(1).cpu()  # answer tokens of each row
        for _ in range(args.ppo_epochs):
            order = torch.randperm(len(traj.ids), generator=generator)
            for start in range(0, len(traj.ids), self.mini_batch_size):
                mini = self.mini_tokens(counts[order[start : start + self.mini_batch_size]])
                for m_start in range(start, start + self.mini_batch_size, micro):
                    idx = order[m_start : m_start + micro].to(self.device)
                    part = traj.select(idx)
                    share = token_share(counts[idx.cpu()], mini, accumulation)
                    with self.autocast:
                        logp, _ = token_logprobs_and_entropy(
                            self.policy, part, args.temperature, with_entropy=False
                        )
                        new_values = values(self.value, part)
                    pg_loss, clipfrac, approx_kl = ppo_math.policy_loss(
                        logp, old_logp[idx], advantages[idx], rmask[idx], args.cliprange
                    )
                    vf_loss, vf_clipfrac = ppo_math.value_loss(
                        new_values, old_values[idx], returns[idx], rmask[idx], args.cliprange_value
                    )
                    loss = pg_loss + args.vf_coef * vf_loss
                    self.updater.backward(loss * share)  # token means of the whole mini-batch
                    parts = (loss, pg_loss, vf_loss, clipfrac, approx_kl, vf_clipfrac)
                    stats.append(ppo_math.PPOStats(*(v.item() for v in parts)))
                norms.append(self.updater.step())
        return stats, norms

    def mini_tokens(self, counts: torch.Tensor) -> float:
        """A mini-batch's answer tokens, averaged over the ranks (each rank has its own)."""
        return distributed.reduce_mean({"tokens": float(counts.sum())}, self.world, self.device)[
            "tokens"
        ]

    def log(self, metrics: dict[str, float]) -> None:
        self.log_history.append({"step": self.step, **{k: _kept(v) for k, v in metrics.items()}})
        if self.training_args.should_log:
            logger.info(
                "step %d: %s",
                self.step,
                ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in STEP_LOG_KEYS),
            )
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(
                    key if key.startswith("eval") else f"train/{key}", value, self.step
                )
            self.writer.flush()

    def due(self, every: int | float | None) -> bool:
        """Whether a periodic action (evaluate, save) is due after this step; never on the last
        step."""
        return (
            bool(every) and self.step % int(every) == 0 and self.step < self.training_args.max_steps
        )

    def save_due(self) -> bool:
        """checkpoint-N every --save_steps and after the last step (so a rerun of a finished run
        trains nothing)."""
        every, last = self.training_args.save_steps, self.step == self.training_args.max_steps
        return self.training_args.save_strategy == "steps" and (self.due(every) or last)

    def save_checkpoint(self) -> None:
        """checkpoint-N, written whole beside its name then renamed (saving.py); under DeepSpeed
        every rank writes its shard of the engine's state first."""
        folder = Path(self.training_args.output_dir) / f"checkpoint-{self.step}"
        partial = saving.prepare_partial(folder) if self.training_args.should_save else None
        distributed.barrier()
        state = {
            **self.updater.state(saving.partial_of(folder)),
            "kl_coef": self.kl.value,
            "step": self.step,
        }
        weights = self.updater.full_weights()
        if partial:
            saving.save_checkpoint(
                folder,
                self.policy,
                self.value_model,
                self.tokenizer,
                state,
                self.log_history,
                self.training_args.max_steps,
                self.training_args.save_total_limit,
                weights,
            )
        distributed.barrier()

    def resume(self, folder: str) -> dict | None:
        from_engine = isinstance(
            self.updater, DeepSpeedUpdater
        )  # the engine's checkpoint holds the weights
        state, self.log_history = saving.load_checkpoint(
            Path(folder), self.policy, self.value_model, not from_engine
        )
        self.updater.load(Path(folder), state)
        self.kl.value, self.step = state["kl_coef"], state["step"]
        logger.info("resumed from %s at step %d", folder, self.step)
        return next((h for h in self.log_history if "eval_score" in h and h["step"] == 0), None)

    def train(self, resume_from: str | None) -> dict[str, float]:
        # SIGTERM (preemption) from here to the end of the loop: finish the step, save it, stop with
        # exit code 143
        with Preemption() as sigterm, storage_errors(self.training_args.output_dir):
            before = self.start(resume_from)
            preempted = self.loop(sigterm)
        if (
            preempted
        ):  # checkpoint-N of this step is saved (unless it was not finite); no final model
            if self.writer:
                self.writer.close()
            exit_preempted(self.step, self.training_args.should_log, saved=self.stopped_finite)
        self.updater.check_in_sync()
        with storage_errors(self.training_args.output_dir):
            return self.finish(before)

    def start(self, resume_from: str | None) -> dict | None:
        """Resume, or evaluate the untrained policy; return the held-out figures before training (if
        any)."""
        if resume_from:
            before = self.resume(resume_from)
        else:
            before = self.rollouts.evaluate(self.eval_prompts) if self.eval_prompts else None
        if before:
            if not resume_from:
                self.log(before)
            logger.info(
                "before training: held-out reward %.3f, exact match %s",
                before["eval_score"],
                f"{before['eval_exact_match']:.3f}" if "eval_exact_match" in before else "n/a",
            )
        if self.step >= self.training_args.max_steps:
            logger.info(
                "the checkpoint is at step %d of --max_steps %d: nothing left to train",
                self.step,
                self.training_args.max_steps,
            )
        return before

    def loop(self, sigterm: Preemption) -> bool:
        """The steps from the start (or the resumed step) to --max_steps; True when stopped by
        SIGTERM."""
        training_args = self.training_args
        eval_every = (
            (training_args.eval_steps or training_args.logging_steps)
            if training_args.eval_strategy == "steps"
            else None
        )
        bar = tqdm(
            total=self.training_args.max_steps,
            initial=self.step,
            desc=self.ppo_args.algorithm.upper(),
            unit="step",
            disable=self.rank != 0 or self.training_args.disable_tqdm,
        )
        try:
            while self.step < self.training_args.max_steps:
                metrics = self.train_step()
                self.step += 1
                bar.update(1)
                bar.set_postfix(
                    score=f"{metrics['objective/scores']:.3g}", kl=f"{metrics['objective/kl']:.3g}"
                )
                # NaN logits, loss or gradient norm (ranks' means, so all agree): logged, counted,
                # stop after too many
                loss, norm = (
                    math.nan if metrics["nonfinite_logits"] else metrics["loss"],
                    metrics.get("grad_norm"),
                )
                finite = divergence.finite(loss) and divergence.finite(norm)
                if (
                    self.step % max(int(self.training_args.logging_steps), 1) == 0
                    or self.step == 1
                    or not finite
                ):
                    self.log(metrics)
                finite = self.nonfinite.record(
                    self.step, loss, norm
                )  # False for a collapsed step too
                if self.eval_prompts and self.due(eval_every):
                    self.log(self.rollouts.evaluate(self.eval_prompts))
                saved = (
                    finite and self.save_due()
                )  # a non-finite step's weights are not checkpointed
                if saved:
                    self.save_checkpoint()
                # asked after the save, so that a SIGTERM that came during it stops here, not a step
                # later
                if sigterm.agreed(self.device):
                    if not saved and finite:
                        self.save_checkpoint()
                    self.stopped_finite = finite
                    return True
            return False
        finally:
            bar.close()

    def finish(self, before: dict | None) -> dict[str, float]:
        """The final policy, held-out results (after, with the before figures), state and train
        results."""
        out = Path(self.training_args.output_dir)
        divergence.check_finite_weights(self.policy, self.device)  # never write a NaN model
        weights = self.updater.full_weights()  # ZeRO-3: gathered from every rank
        if self.training_args.should_save:
            saving.save_policy(self.policy, self.tokenizer, out, saving.part(weights, "policy"))
        record_adapter_base(
            self.policy, self.training_args
        )  # a LoRA policy: which base merge_peft_adapter.py must use
        distributed.barrier()
        results = {}
        if self.eval_prompts:
            after = self.rollouts.evaluate(self.eval_prompts)
            self.log(after)
            results = {
                **after,
                **(
                    {f"{k}_before": v for k, v in before.items() if k != "eval_samples"}
                    if before
                    else {}
                ),
            }
        if self.training_args.should_save:
            saving.write_results(
                out, results, self.step, self.training_args.max_steps, self.log_history
            )
        if self.writer:
            self.writer.close()
        return results


def run(recipe_class, build, stage: str, model_args, data_args, peft_args, ppo_args, training_args):
    """Load the tokenizer, template, prompts and models (`build`), then train a `recipe_class` loop;
    also the own-loop GRPO and its relatives (stages/grpo.py)."""
    setup_run(training_args)
    claim_output_dir(
        training_args,
        stage,
        model_args.model_name_or_path,
        data_args.train_source[0],
        peft_args.method,
    )
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(ppo_args.template_name, tokenizer, ppo_args.chat_template_kwargs)
    stop_ids = apply_template_to_tokenizer(tokenizer, template)
    prompts, eval_prompts = load_rl_prompts(data_args, ppo_args, template, tokenizer)
    models = build(model_args, peft_args, ppo_args, training_args, tokenizer)
    set_generation_stops(models.policy, stop_ids, tokenizer.pad_token_id)
    eval_prompts = (
        eval_prompts if training_args.do_eval else None
    )  # --do_eval False: no held-out evaluation
    recipe = recipe_class(
        models, tokenizer, template, prompts, eval_prompts, ppo_args, training_args
    )
    if training_args.do_train:
        take_output_dir(training_args)  # an overwritten run's checkpoints go before one is resumed
        recipe.train(resolve_resume_checkpoint(training_args))
    return recipe
