"""Rollouts for the RL stages: a batch of prompts becomes a `Trajectory` (prompt + sampled answer tokens,
masks, decoded answers), which is scored and read by the policy, the reference and the value model.

`Rollouts.evaluate` is the held-out evaluation of PPO, GRPO and RLOO: greedy answers, mean reward,
exact match with the data, and the exact KL to the reference.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from peft import PeftModel
from torch.utils.checkpoint import checkpoint
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from pipeline.data.collators import pad
from pipeline.data.prompts import Prompt
from pipeline.infer.generation import generate, sampling_config
from pipeline.model.adapters import unwrap
from pipeline.rl import ppo_math
from pipeline.rl.rewards import RULE_REWARDS, RewardScorer, total_rewards


@dataclass
class Trajectory:
    """One rollout batch: ids = left-padded prompt + answer (query_len prompt columns), and its masks."""

    prompts: list[Prompt]
    ids: torch.Tensor
    mask: torch.Tensor
    query_len: int
    response_mask: torch.Tensor  # over the answer columns: 1 up to and including the stop token
    ended: torch.Tensor  # (batch,) whether a stop token came
    answers: list[str]
    nonfinite: bool = False  # the policy's logits held NaN/inf during generation (pipeline/infer/generation.py)

    @property
    def responses(self) -> torch.Tensor:
        return self.ids[:, self.query_len:]

    def select(self, idx: torch.Tensor) -> Trajectory:
        """The rows `idx` (a minibatch); prompts and answers are left out, the loss does not read them."""
        return Trajectory([], self.ids[idx], self.mask[idx], self.query_len, self.response_mask[idx], self.ended[idx], [])


LOGIT_CHUNK = 1024  # answer positions sent through the output head at a time


def response_hidden(model, traj: Trajectory) -> tuple[torch.Tensor, torch.nn.Module]:
    """(final hidden states at the positions that predict the answer tokens, the output head). The model
    computes one position's logits only (logits_to_keep=1); the head is applied by the caller, in chunks."""
    positions = (traj.mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=traj.ids, attention_mask=traj.mask, position_ids=positions, use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1][:, traj.query_len - 1 : -1], unwrap(model).get_output_embeddings()


def _chunk_logprobs(hidden, tokens, head, temperature):
    logits = head(hidden).float() / temperature
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def _chunk_entropy(hidden, head, temperature):
    logp = torch.log_softmax(head(hidden).float() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def chunked_logprobs(hidden: torch.Tensor, head, tokens: torch.Tensor, temperature: float,
                     with_entropy: bool = False, chunk: int = LOGIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token) (and, without gradient, the entropy) at every answer position, LOGIT_CHUNK positions
    through the head at a time; under autograd each chunk's logits are recomputed in the backward pass, so
    no [batch, answer, vocabulary] tensor is ever held. Equal to ppo_math.token_logprobs / entropy on the
    model's logits."""
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    logps, entropies = [], []
    check = "none" if is_deepspeed_zero3_enabled() else "default"  # the frozen head's shard: losses.causal_lm_loss_sum
    for start in range(0, len(targets), chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled():
            logps.append(checkpoint(_chunk_logprobs, flat[part], targets[part], head, temperature, use_reentrant=False,
                                     determinism_check=check))
        else:
            logps.append(_chunk_logprobs(flat[part], targets[part], head, temperature))
        if with_entropy:
            with torch.no_grad():
                entropies.append(_chunk_entropy(flat[part], head, temperature))
    logp = torch.cat(logps).view(tokens.shape)
    return logp, torch.cat(entropies).view(tokens.shape) if with_entropy else None


def chunked_full_kl(hidden, head, ref_hidden, ref_head, chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """ppo_math.full_kl at every answer position, from both models' hidden states, in chunks."""
    flat, ref_flat = hidden.reshape(-1, hidden.shape[-1]), ref_hidden.reshape(-1, ref_hidden.shape[-1])
    parts = [ppo_math.full_kl(head(flat[i : i + chunk]), ref_head(ref_flat[i : i + chunk]))
             for i in range(0, len(flat), chunk)]
    return torch.cat(parts).view(hidden.shape[:2])


def token_logprobs_and_entropy(model, traj: Trajectory, temperature: float,
                               with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropies) of the answer tokens under `model`, without full-vocabulary logits."""
    hidden, head = response_hidden(model, traj)
    return chunked_logprobs(hidden, head, traj.responses, temperature, with_entropy)


def values(value_model, traj: Trajectory) -> torch.Tensor:
    positions = (traj.mask.cumsum(1) - 1).clamp(min=0)
    return value_model(traj.ids, traj.mask, positions, keep_from=traj.query_len - 1)[:, :-1]


def autocast_for(training_args):
    device = training_args.device.type
    if training_args.bf16:
        return torch.autocast(device, dtype=torch.bfloat16)
    return torch.autocast(device, dtype=torch.float16) if training_args.fp16 else nullcontext()


class Rollouts:
    """Generation from the policy, reference log-probs, reward scores, and the held-out evaluation."""

    def __init__(self, policy, reference, scorer: RewardScorer | None, reward_context, tokenizer, template, ppo_args,
                 training_args):
        self.policy, self.reference = policy, reference
        self.scorer, self.reward_context = scorer, reward_context
        self.tokenizer, self.template, self.args = tokenizer, template, ppo_args
        self.device, self.autocast = training_args.device, autocast_for(training_args)
        self.rank, self.world = training_args.process_index, training_args.world_size
        self.batch_size = training_args.per_device_train_batch_size
        self.generation_context = nullcontext  # ZeRO-3: gathers the policy's weights for the rollout (engine.py)

    @property
    def has_reference(self) -> bool:
        return self.reference is not None or isinstance(self.policy, PeftModel)

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], sample: bool) -> Trajectory:
        static = getattr(self.args, "rollout_cache", "dynamic") == "static"  # a fixed-size cache, compiled decode
        longest = max(len(p.ids) for p in prompts)
        # static: every rollout has one shape (prompts padded to the prompt budget), so the decode step compiles once
        width = max(self.args.model_max_length - self.args.max_new_tokens, longest) if static else longest
        query, qmask = pad([p.ids for p in prompts], self.tokenizer.pad_token_id, side="left")
        if width > longest:
            query = torch.cat([torch.full((len(prompts), width - longest), self.tokenizer.pad_token_id), query], 1)
            qmask = torch.cat([torch.zeros((len(prompts), width - longest), dtype=qmask.dtype), qmask], 1)
        query, qmask = query.to(self.device), qmask.to(self.device)
        base = unwrap(self.policy).generation_config
        # sampling reads the full distribution (top_k 0), as the log-probs of the update do
        config = (sampling_config(base, self.args.max_new_tokens, self.args.temperature, self.args.top_p, top_k=0)
                  if sample else sampling_config(base, self.args.max_new_tokens))
        if static:
            config.cache_implementation = "static"
        with self.autocast, self.generation_context():
            out = generate(self.policy, query, qmask, config, allow_nonfinite=True)  # the loop counts such a step
        answers = [self.tokenizer.decode(r[: int(m.sum())], skip_special_tokens=True).strip()
                   for r, m in zip(out.responses, out.mask)]
        return Trajectory(prompts, torch.cat([query, out.responses], 1), torch.cat([qmask, out.mask], 1), query.shape[1],
                          out.mask, out.ended, answers, out.nonfinite)

    def reference_logprobs(self, traj: Trajectory, temperature: float) -> torch.Tensor:
        if self.reference is not None:
            return token_logprobs_and_entropy(self.reference, traj, temperature, with_entropy=False)[0]
        with self.policy.disable_adapter():  # the head too may carry an adapter (modules_to_save)
            return token_logprobs_and_entropy(self.policy, traj, temperature, with_entropy=False)[0]

    def scores(self, traj: Trajectory) -> torch.Tensor:
        with self.reward_context():
            return total_rewards(traj.prompts, traj.answers, self.args.reward_func_list, self.template, self.scorer,
                                 self.device)

    def held_out_kl(self, traj: Trajectory) -> torch.Tensor:
        hidden, head = response_hidden(self.policy, traj)
        if self.reference is not None:
            return chunked_full_kl(hidden, head, *response_hidden(self.reference, traj))
        with self.policy.disable_adapter():
            return chunked_full_kl(hidden, head, *response_hidden(self.policy, traj))

    @torch.no_grad()
    def evaluate(self, eval_prompts: list[Prompt]) -> dict[str, float]:
        self.policy.eval()
        mine = eval_prompts[self.rank :: self.world]
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # score, exact match, kl, length, count
        for start in range(0, len(mine), self.batch_size):
            traj = self.generate(mine[start : start + self.batch_size], sample=False)
            with self.autocast:
                scores = self.scores(traj)
                # exact KL over the vocabulary at each answer position (greedy answers are not samples of the policy)
                kl = (self.held_out_kl(traj) if self.has_reference
                      else torch.full_like(traj.response_mask, float("nan"), dtype=torch.float))
            matches = RULE_REWARDS["exact_match"](traj.answers, [p.reference for p in traj.prompts])
            sums += torch.tensor([scores.sum().item(), sum(matches), (kl * traj.response_mask).sum().item(),
                                  traj.response_mask.sum().item(), len(traj.prompts)], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(sums)
        n = max(sums[4].item(), 1)
        return {"eval_score": sums[0].item() / n, "eval_exact_match": sums[1].item() / n, "eval_kl": sums[2].item() / n,
                "eval_response_length": sums[3].item() / n, "eval_samples": int(sums[4].item())}
