"""Stage 4a, PPO: reinforcement learning from the trained reward model (and/or a rule reward).

--algorithm ppo runs the project's own loop below (one iteration = one step: rollout, then updates);
grpo and rloo run trl's GRPOTrainer / RLOOTrainer with the same prompts, rewards and evaluation.

Policy: --model_name_or_path (the SFT output), full / LoRA / QLoRA. Reference: with LoRA the same
weights with the adapter disabled, otherwise a frozen copy. Reward: --reward_model_name_or_path (a
merged RM folder or an RM adapter folder). Value model: initialized from the reward model (LoRA on it
when --use_peft, whose disabled-adapter form is then also the reward model: one copy of its weights).
Prompts: SFT-format data, every turn up to the last user turn, rendered with the SFT template.

    python stages/ppo.py --model_name_or_path outputs/sft-merged --reward_model_name_or_path outputs/rm-merged \
        --template_name qwen --train_file_dir data/sft --validation_file_dir data/sft_eval --output_dir outputs/ppo
    torchrun --nproc_per_node 8 stages/ppo.py ...      # or: bash run_ppo.sh ...
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments, get_scheduler, set_seed

from pipeline import rl
from pipeline.args import (DataArguments, ModelArguments, PeftArguments, PipelineTrainingArguments, parse_args,
                           resolve_resume_checkpoint, split_list, trainable_dtype)
from pipeline.chat_data import apply_template_to_tokenizer, resolve_template
from pipeline.conversations import FORMATS
from pipeline.errors import UserError, run_cli
from pipeline.merge import merge_adapter
from pipeline.models import load_model, load_tokenizer
from pipeline.prompts import RULE_REWARDS, Prompt, load_prompts, render_text
from pipeline.runtime import setup_logging

logger = logging.getLogger("pipeline.ppo")


@dataclass
class PPOArguments:
    algorithm: str = field(default="ppo", metadata={"help": "ppo (own loop), grpo or rloo (trl).", "choices": ("ppo", "grpo", "rloo")})
    reward_model_name_or_path: str | None = field(default=None, metadata={"help": "Merged RM folder or RM adapter folder."})
    reward_funcs: str | None = field(default=None, metadata={
        "help": "Comma list of rewards, summed: model (the reward model), exact_match (answer equals the data's). "
                "Default: model."})
    template_name: str = field(default="auto", metadata={"help": "Chat template (the one SFT used), or auto."})
    model_max_length: int = field(default=2048, metadata={"help": "Prompt + answer budget; longer prompts are dropped and counted."})
    data_format: str = field(default="auto", metadata={"help": "Force a data format.", "choices": FORMATS})
    skip_invalid_samples: bool = field(default=False, metadata={"help": "Skip (and count) invalid records instead of stopping."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest generated answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of rollouts."})
    ppo_epochs: int | None = field(default=None, metadata={
        "help": "Passes over each rollout batch (default 4; GRPO/RLOO: their num_iterations, default 1)."})
    mini_batch_size: int | None = field(default=None, metadata={
        "help": "Rollouts per optimizer step (default: --per_device_train_batch_size, one update per epoch)."})
    kl_coef: float = field(default=0.05, metadata={"help": "Per-token KL penalty against the reference (GRPO/RLOO: beta)."})
    target_kl: float | None = field(default=None, metadata={"help": "Adaptive KL: steer kl_coef so the KL tracks this."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL horizon (in rollouts)."})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 (log ratio) or k3 (never negative).", "choices": ("k1", "k3")})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the shaped per-token rewards."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of answers cut off without a stop token."})
    num_generations: int = field(default=4, metadata={"help": "GRPO/RLOO: answers sampled per prompt."})

    def __post_init__(self):
        if self.temperature <= 0:
            raise UserError(f"--temperature must be > 0 for sampled rollouts, got {self.temperature}.")
        if self.max_new_tokens < 1 or self.model_max_length <= self.max_new_tokens:
            raise UserError(f"--model_max_length ({self.model_max_length}) must exceed --max_new_tokens ({self.max_new_tokens}).")
        funcs = split_list(self.reward_funcs or "model")
        unknown = [f for f in funcs if f != "model" and f not in RULE_REWARDS]
        if unknown:
            raise UserError(f"--reward_funcs: unknown {unknown}; use model and/or {', '.join(RULE_REWARDS)}.")
        if "model" in funcs and not self.reward_model_name_or_path:
            raise UserError("--reward_funcs model needs --reward_model_name_or_path (the RM stage's output), "
                            f"or pass a rule reward such as --reward_funcs exact_match.")
        if self.algorithm == "ppo" and not self.reward_model_name_or_path:
            raise UserError("--algorithm ppo initializes its value model from the reward model: pass --reward_model_name_or_path.")
        self.reward_func_list = funcs
        if self.ppo_epochs is None:
            self.ppo_epochs = 4 if self.algorithm == "ppo" else 1
        if self.ppo_epochs < 1:
            raise UserError(f"--ppo_epochs must be at least 1, got {self.ppo_epochs}.")


# ---------------------------------------------------------------- models

class ValueModel(torch.nn.Module):
    """Per-token values from a sequence classifier: its backbone's hidden states through its score head."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        base = classifier.get_base_model() if isinstance(classifier, PeftModel) else classifier
        self.backbone, self.score = getattr(base, base.base_model_prefix), base.score

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return self.score(hidden).squeeze(-1).float()


def reward_model_folder(path: str, output_dir: str, is_main: bool) -> str:
    """A merged reward model folder: the path itself, or an RM adapter merged once into output_dir."""
    adapter_config = Path(path, "adapter_config.json")
    if not adapter_config.is_file():
        return path
    merged = Path(output_dir, "reward_model_merged")
    if is_main and not (merged / "config.json").is_file():
        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        logger.info("reward model %s is an adapter: merging it into %s once", path, base)
        merge_adapter(base, path, str(merged))
    if dist.is_initialized():
        dist.barrier()
    return str(merged)


def check_same_vocab(policy_tokenizer, reward_tokenizer) -> None:
    if policy_tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        raise UserError("the value model starts from the reward model and reads the policy's tokens, so both need the "
                        "same tokenizer; train the RM from this SFT model (or its merged output).")


def build_models(model_args, peft_args, ppo_args, training_args, tokenizer):
    """(policy, reference or None, value model, reward classifier or None, reward tokenizer or None)."""
    dtype = trainable_dtype(training_args)
    policy = load_model(model_args, peft_args, tokenizer, head="lm", gradient_checkpointing=training_args.gradient_checkpointing,
                        max_length=ppo_args.model_max_length, trainable_dtype=dtype)
    reference = None
    if not peft_args.use_peft:
        reference = load_model(model_args, peft_args, tokenizer, head="lm").eval().requires_grad_(False)
    rm_path = reward_model_folder(ppo_args.reward_model_name_or_path, training_args.output_dir, training_args.should_save)
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
    check_same_vocab(tokenizer, rm_tokenizer)
    rm_args = replace(model_args, model_name_or_path=rm_path, tokenizer_name_or_path=rm_path)
    value = load_model(rm_args, replace(peft_args, peft_path=None, modules_to_save=None), rm_tokenizer, head="reward",
                       gradient_checkpointing=training_args.gradient_checkpointing, trainable_dtype=dtype)
    reward = None  # with LoRA the value model's disabled-adapter form is the reward model
    if not peft_args.use_peft:
        reward = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=value.dtype).eval().requires_grad_(False)
    return policy, reference, value, reward, rm_tokenizer


# ---------------------------------------------------------------- one rollout

def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s), 1
    return ids.to(device), mask.to(device)


def response_mask(responses: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask: 1 up to and including the first stop token, ended: whether a stop token came)."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    ended = is_stop.any(1)
    first = torch.where(ended, is_stop.float().argmax(1), torch.full_like(ended, responses.shape[1], dtype=torch.long))
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions[None] <= first[:, None]).long(), ended


def response_logits(model, query_len: int, ids, mask) -> torch.Tensor:
    """Logits that predict the response tokens (positions after query_len)."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, query_len - 1 : -1]


def forward_tokens(model, query_len: int, ids, mask, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies) of the response tokens under `model`."""
    logits = response_logits(model, query_len, ids, mask)
    responses = ids[:, query_len:]
    return rl.token_logprobs(logits, responses, temperature), rl.entropy(logits, temperature)


def forward_values(value_model, query_len: int, ids, mask) -> torch.Tensor:
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return value_model(ids, mask, positions)[:, query_len - 1 : -1]


def answer_texts(tokenizer, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(r[: int(m.sum())], skip_special_tokens=True).strip() for r, m in zip(responses, mask)]


@torch.no_grad()
def score_answers(prompts: list[Prompt], answers: list[str], funcs: list[str], template, reward_model, reward_tokenizer,
                  device) -> torch.Tensor:
    """Summed rewards of each answer: the reward model reads the whole conversation as the template renders it."""
    total = torch.zeros(len(answers), device=device)
    if "model" in funcs:
        texts = [render_text(template, p.messages + [{"role": "assistant", "content": a}], p.tools) for p, a in zip(prompts, answers)]
        reward_tokenizer.padding_side = "right"
        batch = reward_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        total += reward_model(**batch).logits[:, 0].float()
    for name in funcs:
        if name != "model":
            total += torch.tensor(RULE_REWARDS[name](answers, [p.reference for p in prompts]), device=device)
    return total


# ---------------------------------------------------------------- rollouts and held-out evaluation

class Rollouts:
    """What PPO, GRPO and RLOO share: generation from the policy, reference log-probs, reward scores, and the
    held-out evaluation (greedy answers: mean reward, exact match with the data, KL to the reference)."""

    def __init__(self, policy, reference, reward_model, reward_context, tokenizer, rm_tokenizer, template, stop_ids,
                 ppo_args, training_args):
        self.policy, self.reference = policy, reference
        self.reward_model, self.reward_context = reward_model, reward_context
        self.tokenizer, self.rm_tokenizer, self.template, self.stop_ids = tokenizer, rm_tokenizer, template, stop_ids
        self.args, self.targs = ppo_args, training_args
        self.device = training_args.device
        self.rank, self.world = training_args.process_index, training_args.world_size
        self.batch_size = training_args.per_device_train_batch_size
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if training_args.bf16
                         else torch.autocast(self.device.type, dtype=torch.float16) if training_args.fp16 else nullcontext())

    @property
    def has_reference(self) -> bool:
        return self.reference is not None or isinstance(self.policy, PeftModel)

    def reference_logprobs(self, query_len, ids, mask, temperature):
        return rl.token_logprobs(self.reference_logits(query_len, ids, mask), ids[:, query_len:], temperature)

    def reference_logits(self, query_len, ids, mask):
        if self.reference is not None:
            return response_logits(self.reference, query_len, ids, mask)
        with self.policy.disable_adapter():
            return response_logits(self.policy, query_len, ids, mask)

    def scores(self, prompts, answers):
        with self.reward_context():
            return score_answers(prompts, answers, self.args.reward_func_list, self.template, self.reward_model,
                                 self.rm_tokenizer, self.device)

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], sample: bool):
        ids, mask = left_pad([p.ids for p in prompts], self.tokenizer.pad_token_id, self.device)
        kwargs = (dict(do_sample=True, temperature=self.args.temperature, top_p=self.args.top_p, top_k=0) if sample  # full distribution
                  else dict(do_sample=False))
        with self.autocast:
            out = self.policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.args.max_new_tokens,
                                       eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                                       **kwargs)
        responses = out[:, ids.shape[1]:]
        rmask, ended = response_mask(responses, self.stop_ids)
        responses = torch.where(rmask.bool(), responses, self.tokenizer.pad_token_id)
        return ids, mask, responses, rmask, ended

    @torch.no_grad()
    def evaluate(self, eval_prompts: list[Prompt]) -> dict[str, float]:
        self.policy.eval()
        mine = eval_prompts[self.rank :: self.world]
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # score, exact match, kl, length, count
        for start in range(0, len(mine), self.batch_size):
            prompts = mine[start : start + self.batch_size]
            query, qmask, responses, rmask, _ = self.generate(prompts, sample=False)
            ids, mask, qlen = torch.cat([query, responses], 1), torch.cat([qmask, rmask], 1), query.shape[1]
            answers = answer_texts(self.tokenizer, responses, rmask)
            with self.autocast:
                scores = self.scores(prompts, answers)
                # exact KL over the vocabulary at each answer position (greedy answers are not samples of the policy)
                kl = (rl.full_kl(response_logits(self.policy, qlen, ids, mask), self.reference_logits(qlen, ids, mask))
                      if self.has_reference else torch.full_like(rmask, float("nan"), dtype=torch.float))
            matches = RULE_REWARDS["exact_match"](answers, [p.reference for p in prompts])
            sums += torch.tensor([scores.sum().item(), sum(matches), (kl * rmask).sum().item(),
                                  rmask.sum().item(), len(prompts)], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(sums)
        n = max(sums[4].item(), 1)
        return {"eval_score": sums[0].item() / n, "eval_exact_match": sums[1].item() / n, "eval_kl": sums[2].item() / n,
                "eval_response_length": sums[3].item() / n, "eval_samples": int(sums[4].item())}


# ---------------------------------------------------------------- the PPO loop

class PPOLoop(Rollouts):
    def __init__(self, policy, reference, value_model, reward_model, tokenizer, rm_tokenizer, template, stop_ids,
                 prompts, eval_prompts, ppo_args, training_args):
        context = nullcontext if reward_model is not None else value_model.disable_adapter
        super().__init__(policy, reference, reward_model if reward_model is not None else value_model, context, tokenizer,
                         rm_tokenizer, template, stop_ids, ppo_args, training_args)
        self.value_model, self.value = value_model, ValueModel(value_model)
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.mini_batch_size = ppo_args.mini_batch_size or self.batch_size
        if self.batch_size % self.mini_batch_size or self.mini_batch_size % training_args.gradient_accumulation_steps:
            raise UserError(f"--per_device_train_batch_size ({self.batch_size}) must be a multiple of --mini_batch_size "
                            f"({self.mini_batch_size}), itself a multiple of --gradient_accumulation_steps.")
        if training_args.max_steps <= 0:
            raise UserError("--max_steps (PPO iterations) must be set for the PPO stage.")
        if len(prompts) < self.batch_size * self.world:
            raise UserError(f"{len(prompts)} training prompts cannot fill one step of {self.batch_size} x {self.world} "
                            "processes; lower --per_device_train_batch_size.")
        for model in (policy, value_model):
            for module in model.modules():  # the sampled and the trained distributions must agree
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
            if training_args.gradient_checkpointing:  # the Trainer does this in the other stages; this loop has none
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=training_args.learning_rate, weight_decay=training_args.weight_decay,
                                           betas=(training_args.adam_beta1, training_args.adam_beta2), eps=training_args.adam_epsilon)
        updates = training_args.max_steps * ppo_args.ppo_epochs * (self.batch_size // self.mini_batch_size)
        self.scheduler = get_scheduler(training_args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=training_args.get_warmup_steps(updates), num_training_steps=updates)
        self.kl = rl.AdaptiveKLController(ppo_args.kl_coef, ppo_args.target_kl, ppo_args.kl_horizon)
        self.step, self.log_history = 0, []
        self.writer = None
        if training_args.should_log and "tensorboard" in (training_args.report_to or []):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(training_args.output_dir) / "logs"))

    def batch_prompts(self, step: int) -> list[Prompt]:
        """This rank's prompts for a step: a fixed shuffled order per data epoch, so a resumed run sees the same."""
        size = self.batch_size * self.world
        start, out = step * size, []
        while len(out) < size:
            epoch, offset = divmod(start + len(out), len(self.prompts))
            order = list(range(len(self.prompts)))
            random.Random(self.targs.seed + epoch).shuffle(order)
            out += order[offset : offset + size - len(out)]
        return [self.prompts[i] for i in out[self.rank :: self.world]]

    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def check_in_sync(self) -> None:
        """Every process must end with the same weights; compare a checksum of the trained parameters."""
        if self.world == 1:
            return
        checksum = torch.stack([p.detach().double().sum() for p in self.params]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        if len({round(g.item(), 6) for g in gathered}) != 1:
            raise RuntimeError(f"PPO processes diverged: parameter checksums {[g.item() for g in gathered]}")
        logger.info("trained weights identical on all %d processes (checksum %.6f)", self.world, checksum.item())

    def sync_gradients(self) -> None:
        """Average the gradients over processes (every rank trains on its own rollouts)."""
        if self.world == 1:
            return
        for p in self.params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    # --- one iteration

    def train_step(self) -> dict[str, float]:
        args = self.args
        torch.manual_seed(self.targs.seed + 1000 * self.rank + self.step)  # each rank samples its own; resumable
        self.policy.eval(), self.value_model.eval()  # generation with its cache; dropout is off in both modes
        # 1. Sample this rank's prompts and generate answers (sampling: temperature, top_p).
        prompts = self.batch_prompts(self.step)
        query, qmask, responses, rmask, ended = self.generate(prompts, sample=True)
        ids, mask, qlen = torch.cat([query, responses], 1), torch.cat([qmask, rmask], 1), query.shape[1]
        with torch.no_grad(), self.autocast:
            # 2. Score the answers with the reward model (and rule rewards); penalize answers without a stop token.
            answers = answer_texts(self.tokenizer, responses, rmask)
            scores = self.scores(prompts, answers)
            if args.missing_eos_penalty is not None:
                scores = scores - args.missing_eos_penalty * (~ended).float()
            # 3. Log-probs of the sampled tokens under the policy (old) and the reference; values of each state.
            old_logp, entropy = forward_tokens(self.policy, qlen, ids, mask, args.temperature)
            ref_logp = self.reference_logprobs(qlen, ids, mask, args.temperature)
            old_values = forward_values(self.value, qlen, ids, mask)
        rmask = rmask.float()
        # 4. Per-token rewards: -kl_coef * KL(policy || reference) on every token, the score on the last one.
        kl = rl.kl_estimate(old_logp, ref_logp, args.kl_estimator) * rmask
        rewards = rl.shaped_rewards(scores, kl, rmask, self.kl.value)
        if args.whiten_rewards:
            rewards = rl.whiten(rewards, rmask, shift_mean=False)
        # 5. Advantages and returns by GAE; advantages whitened over the batch.
        advantages, returns = rl.gae(rewards, old_values, rmask, args.gamma, args.lam)
        advantages = rl.whiten(advantages, rmask)
        # 6. PPO epochs over shuffled minibatches: clipped policy loss + vf_coef * clipped value loss.
        stats = {k: [] for k in ("loss", "loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl", "value/clipfrac")}
        micro = self.mini_batch_size // self.targs.gradient_accumulation_steps
        generator = torch.Generator().manual_seed(self.targs.seed * 1000 + self.step)
        self.policy.train(), self.value_model.train()  # training mode: gradient checkpointing acts only there
        for _ in range(args.ppo_epochs):
            order = torch.randperm(len(prompts), generator=generator)
            for start in range(0, len(prompts), self.mini_batch_size):
                self.optimizer.zero_grad(set_to_none=True)
                for m_start in range(start, start + self.mini_batch_size, micro):
                    idx = order[m_start : m_start + micro].to(self.device)
                    with self.autocast:
                        logp, _ = forward_tokens(self.policy, qlen, ids[idx], mask[idx], args.temperature)
                        values = forward_values(self.value, qlen, ids[idx], mask[idx])
                    pg_loss, clipfrac, approx_kl = rl.policy_loss(logp, old_logp[idx], advantages[idx], rmask[idx], args.cliprange)
                    vf_loss, vf_clipfrac = rl.value_loss(values, old_values[idx], returns[idx], rmask[idx], args.cliprange_value)
                    loss = pg_loss + args.vf_coef * vf_loss
                    (loss / self.targs.gradient_accumulation_steps).backward()
                    for key, v in zip(stats, (loss, pg_loss, vf_loss, clipfrac, approx_kl, vf_clipfrac)):
                        stats[key].append(v.item())
                self.sync_gradients()
                if self.targs.max_grad_norm and self.targs.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.targs.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
        # 7. Adapt the KL coefficient (if a target is set) and report this iteration.
        seq_kl = kl.sum(1)
        metrics = {key: sum(v) / len(v) for key, v in stats.items()}
        metrics.update({
            "objective/scores": scores.mean().item(), "objective/scores_std": scores.std().item() if len(scores) > 1 else 0.0,
            "objective/kl": seq_kl.mean().item(), "objective/entropy": (entropy * rmask).sum(1).mean().item(),
            "objective/non_score_reward": (-self.kl.value * seq_kl).mean().item(),
            "response_length": rmask.sum(1).mean().item(), "eos_fraction": ended.float().mean().item(),
            "value/mean": rl.masked_mean(old_values, rmask).item(), "kl_coef": self.kl.value,
            "learning_rate": self.scheduler.get_last_lr()[0],
        })
        metrics = self.reduce_mean(metrics)
        self.kl.update(metrics["objective/kl"], self.batch_size * self.world)
        return metrics

    # --- saving and resuming

    def save(self, folder: Path, final: bool = False) -> None:
        """The policy (adapter or full) with tokenizer, template and stop tokens; checkpoints also hold the value
        model and the optimizer, scheduler and KL state. Rollout sampling is seeded by step, so no RNG state."""
        if self.targs.should_save:
            final_folder = folder
            if not final:  # written beside, renamed when whole: an interrupted save never looks resumable
                folder = folder.with_name(f"tmp-{folder.name}")
                shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            base = self.policy.get_base_model() if isinstance(self.policy, PeftModel) else self.policy
            base.config.use_cache = True  # the saved config is for inference
            self.policy.save_pretrained(folder)
            base.config.use_cache = False
            base.generation_config.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            self.write_state(folder)
            if not final:
                self.value_model.save_pretrained(folder / "value_model")
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "kl_coef": self.kl.value, "step": self.step}, folder / "ppo_state.pt")
                shutil.rmtree(final_folder, ignore_errors=True)
                folder.rename(final_folder)
                self.rotate_checkpoints()
        if dist.is_initialized():
            dist.barrier()

    def write_state(self, folder: Path) -> None:
        state = {"global_step": self.step, "max_steps": self.targs.max_steps, "log_history": self.log_history}
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))

    def rotate_checkpoints(self) -> None:
        limit = self.targs.save_total_limit
        if not limit or not self.targs.should_save:
            return
        folders = sorted(Path(self.targs.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        for old in folders[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, folder: str) -> None:
        folder = Path(folder)
        load_trainable(self.policy, folder)
        load_trainable(self.value_model, folder / "value_model")
        state = torch.load(folder / "ppo_state.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl.value, self.step = state["kl_coef"], state["step"]
        self.log_history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        logger.info("resumed from %s at step %d", folder, self.step)

    # --- driver

    def log(self, metrics: dict[str, float]) -> None:
        entry = {"step": self.step, **{k: round(v, 6) for k, v in metrics.items()}}
        self.log_history.append(entry)
        if self.targs.should_log:
            logger.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                              if k in ("objective/scores", "objective/kl", "loss", "eval_score", "eval_exact_match")))
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(key if key.startswith("eval") else f"train/{key}", value, self.step)
            self.writer.flush()

    def train(self, checkpoint: str | None) -> dict[str, float]:
        out = Path(self.targs.output_dir)
        if checkpoint:
            self.resume(checkpoint)
            before = next((h for h in self.log_history if "eval_score" in h and h["step"] == 0), None)
        else:
            before = self.evaluate(self.eval_prompts) if self.eval_prompts else None
            if before:
                self.log(before)
        if before:
            logger.info("before training: held-out reward %.3f, exact match %.3f", before["eval_score"], before["eval_exact_match"])
        while self.step < self.targs.max_steps:
            metrics = self.train_step()
            self.step += 1
            if self.step % max(int(self.targs.logging_steps), 1) == 0 or self.step == 1:
                self.log(metrics)
            if (self.eval_prompts and self.targs.eval_strategy == "steps" and self.step < self.targs.max_steps
                    and self.step % int(self.targs.eval_steps or self.targs.logging_steps) == 0):
                self.log(self.evaluate(self.eval_prompts))
            if self.targs.save_strategy == "steps" and self.step % int(self.targs.save_steps) == 0 and self.step < self.targs.max_steps:
                self.save(out / f"checkpoint-{self.step}")
        self.check_in_sync()
        self.save(out, final=True)
        results = {}
        if self.eval_prompts:
            after = self.evaluate(self.eval_prompts)
            self.log(after)
            results = {**after, **({f"{k}_before": v for k, v in before.items() if k != "eval_samples"} if before else {})}
            if self.targs.should_save:
                (out / "eval_results.json").write_text(json.dumps(results, indent=2))
        if self.targs.should_save:
            self.write_state(out)
            train = {k: v for k, v in self.log_history[-1].items() if not k.startswith("eval")} if self.log_history else {}
            (out / "train_results.json").write_text(json.dumps({"global_step": self.step, **train}, indent=2))
        if self.writer:
            self.writer.close()
        return results


def load_trainable(model, folder: Path) -> None:
    """Put a checkpoint's trained weights (adapter or full model) back into a live model; every weight of a full
    model must come back (tied weights, saved once, count as loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"checkpoint {folder} holds no safetensors weights; it cannot be resumed.")
    loaded, unexpected = set(), []
    for path in files:
        weights = load_file(str(path))
        if isinstance(model, PeftModel):
            result = set_peft_model_state_dict(model, weights)
            unexpected += result.unexpected_keys
        else:
            unexpected += model.load_state_dict(weights, strict=False).unexpected_keys
            loaded |= set(weights)
    if not isinstance(model, PeftModel):
        tensors = model.state_dict()
        loaded_ptrs = {tensors[k].data_ptr() for k in loaded if k in tensors}
        missing = [k for k, t in tensors.items() if k not in loaded and t.data_ptr() not in loaded_ptrs]
        if missing:
            raise UserError(f"checkpoint {folder} lacks {len(missing)} weights of this model (e.g. {missing[0]}); "
                            "it was saved from another model.")
    if unexpected:
        raise UserError(f"checkpoint {folder} holds {len(unexpected)} weights this model has not (e.g. {unexpected[0]}); "
                        "it was saved from another model.")


def check_loop_flags(training_args) -> None:
    """Trainer flags the own PPO loop does not implement are refused, not ignored."""
    optim = getattr(training_args.optim, "value", training_args.optim)
    if not str(optim).startswith("adamw_torch"):
        raise UserError(f"--optim {optim}: the PPO loop trains with torch AdamW (--optim adamw_torch); "
                        "other optimizers are for the Trainer-based stages and --algorithm grpo/rloo.")
    if training_args.fp16:
        raise UserError("--fp16 needs loss scaling, which the PPO loop does not do: use --bf16 True, float32, or "
                        "--algorithm grpo/rloo.")


# ---------------------------------------------------------------- GRPO / RLOO (trl)

# PPO flags trl's GRPO/RLOO take under their own names; the other PPO-only flags have no counterpart there.
GROUP_RELATIVE_FLAGS = {"ppo_epochs": "num_iterations", "cliprange": "epsilon"}
PPO_ONLY_FLAGS = ("mini_batch_size", "target_kl", "kl_horizon", "kl_estimator", "gamma", "lam", "cliprange_value",
                  "vf_coef", "whiten_rewards", "missing_eos_penalty")


def check_group_relative_flags(ppo_args: PPOArguments) -> None:
    defaults = {f.name: f.default for f in fields(PPOArguments)}
    given = [f"--{name}" for name in PPO_ONLY_FLAGS if getattr(ppo_args, name) != defaults[name]]
    if given:
        raise UserError(f"{', '.join(given)} belong to --algorithm ppo (value model, GAE, adaptive KL); "
                        f"--algorithm {ppo_args.algorithm} has no such setting: drop them.")


def train_group_relative(policy, tokenizer, template, prompts, ppo_args, training_args, reward_model, rm_tokenizer):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    def make_reward(name):
        def rule(prompts, completions, reference, **_):
            return RULE_REWARDS[name]([c[-1]["content"] for c in completions], reference)

        rule.__name__ = name
        return rule

    funcs = [reward_model if f == "model" else make_reward(f) for f in ppo_args.reward_func_list]
    processors = [rm_tokenizer if f == "model" else None for f in ppo_args.reward_func_list]
    dataset = Dataset.from_list([{"prompt": p.messages, "reference": p.reference} for p in prompts])
    shared = {f.name: getattr(training_args, f.name) for f in fields(TrainingArguments) if f.init}
    shared["remove_unused_columns"] = False  # the rule rewards read the "reference" column
    common = dict(num_generations=ppo_args.num_generations, max_completion_length=ppo_args.max_new_tokens,
                  temperature=ppo_args.temperature, top_p=ppo_args.top_p, beta=ppo_args.kl_coef,
                  **{trl_name: getattr(ppo_args, name) for name, trl_name in GROUP_RELATIVE_FLAGS.items()})
    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if ppo_args.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    try:
        config = config_class(**shared, **common)
    except ValueError as e:
        raise UserError(f"--algorithm {ppo_args.algorithm}: {str(e).splitlines()[0]}") from None
    return trainer_class(model=policy, reward_funcs=funcs, args=config, train_dataset=dataset, processing_class=tokenizer,
                         reward_processing_classes=processors)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None):
    model_args, data_args, peft_args, ppo_args, training_args = parse_args(
        (ModelArguments, DataArguments, PeftArguments, PPOArguments, PipelineTrainingArguments), argv
    )
    if peft_args.use_peft and peft_args.peft_type != "lora":
        raise UserError(f"--peft_type {peft_args.peft_type} is for SFT; the RL stages train LoRA/QLoRA adapters or the full model.")
    if training_args.deepspeed:
        raise UserError("the PPO stage runs its own loop with plain data parallelism; drop --deepspeed (use LoRA/QLoRA "
                        "for large models).")
    if ppo_args.algorithm == "ppo":
        check_loop_flags(training_args)
    else:
        check_group_relative_flags(ppo_args)
    setup_logging(training_args)
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(ppo_args.template_name, tokenizer)
    stop_ids = apply_template_to_tokenizer(tokenizer, template)
    budget = ppo_args.model_max_length - ppo_args.max_new_tokens
    prompts, _ = load_prompts(data_args.train_file_dir, "--train_file_dir", template, tokenizer, budget,
                              ppo_args.data_format, ppo_args.skip_invalid_samples)
    eval_prompts = []
    if data_args.validation_file_dir:
        eval_prompts, _ = load_prompts(data_args.validation_file_dir, "--validation_file_dir", template, tokenizer, budget,
                                       ppo_args.data_format, ppo_args.skip_invalid_samples)
    if data_args.max_train_samples:
        prompts = prompts[: data_args.max_train_samples]
    if data_args.max_eval_samples:
        eval_prompts = eval_prompts[: data_args.max_eval_samples]
    if ppo_args.algorithm != "ppo":
        return main_group_relative(model_args, peft_args, ppo_args, training_args, tokenizer, template, stop_ids, prompts, eval_prompts)

    policy, reference, value, reward, rm_tokenizer = build_models(model_args, peft_args, ppo_args, training_args, tokenizer)
    policy_base = policy.get_base_model() if isinstance(policy, PeftModel) else policy
    policy_base.generation_config.eos_token_id = stop_ids
    policy_base.generation_config.pad_token_id = tokenizer.pad_token_id
    device = training_args.device
    for model in (policy, reference, value, reward):
        if model is not None and not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
            model.to(device)
    loop = PPOLoop(policy, reference, value, reward, tokenizer, rm_tokenizer, template, stop_ids, prompts, eval_prompts,
                          ppo_args, training_args)
    checkpoint = resolve_resume_checkpoint(training_args)
    if training_args.do_train:
        loop.train(checkpoint)
    return loop


def main_group_relative(model_args, peft_args, ppo_args, training_args, tokenizer, template, stop_ids, prompts, eval_prompts):
    """GRPO / RLOO on trl, then the same held-out evaluation as PPO."""
    policy = load_model(model_args, peft_args, tokenizer, head="lm", gradient_checkpointing=training_args.gradient_checkpointing,
                        max_length=ppo_args.model_max_length, trainable_dtype=trainable_dtype(training_args))
    base = policy.get_base_model() if isinstance(policy, PeftModel) else policy
    base.generation_config.eos_token_id = stop_ids
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    reward_model = rm_tokenizer = None
    if "model" in ppo_args.reward_func_list:
        rm_path = reward_model_folder(ppo_args.reward_model_name_or_path, training_args.output_dir, training_args.should_save)
        rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
        reward_model = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=base.dtype).eval()
    trainer = train_group_relative(policy, tokenizer, template, prompts, ppo_args, training_args, reward_model, rm_tokenizer)
    evaluator = Rollouts(trainer.model, getattr(trainer, "ref_model", None), reward_model, nullcontext, tokenizer,
                         rm_tokenizer, template, stop_ids, ppo_args, training_args)
    before = evaluator.evaluate(eval_prompts) if eval_prompts else None
    if training_args.do_train:
        from pipeline.runtime import train_and_save

        train_and_save(trainer, training_args)
        if training_args.should_save:
            base.generation_config.save_pretrained(Path(training_args.output_dir))
    if before:
        after = evaluator.evaluate(eval_prompts)
        results = {**after, **{f"{k}_before": v for k, v in before.items() if k != "eval_samples"}}
        trainer.log_metrics("eval", results)
        trainer.save_metrics("eval", results)
    return trainer


if __name__ == "__main__":
    run_cli(main)
