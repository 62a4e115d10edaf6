"""The arithmetic of PPO for language models (KL, GAE, whitening, the clipped losses), kept apart
from the loop in stages/ppo.py so each piece is unit-tested against hand-computed values.

Shapes: (batch, response_length) tensors over the generated tokens, with a 0/1 `mask` marking real
response tokens (1 up to and including the stop token, 0 on padding after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Scale the masked entries to unit variance (and zero mean unless shift_mean=False); padding
    stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature); logits (b, t, vocab), tokens (b, t)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(policy || reference) = sum_v p(v) (log p(v) - log q(v)), over the whole
    vocabulary: never negative, and it needs no sampled tokens (held-out evaluation scores greedy
    answers)."""
    logp, ref_logp = (
        torch.log_softmax(logits.float(), -1),
        torch.log_softmax(ref_logits.float(), -1),
    )
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy.
    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, never
    negative)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind}")


def shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL on every response token, plus the sequence score on the last
    one."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, backwards over the response; the value after the last real
    token is 0 (the episode ends). Returns (advantages, returns = advantages + values)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: mean of max(-A r, -A clip(r, 1-e, 1+e)). Returns (loss, clip
    fraction, approximate KL between the old and new policy)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean of max((v - R)^2, (clip(v, v_old +- e) - R)^2). Returns (loss,
    clip fraction)."""
    clipped_values = old_values + torch.clamp(
        values - old_values, -cliprange_value, cliprange_value
    )
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask)
    return loss, masked_mean((clipped > plain).float(), mask)


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so the measured KL tracks a target,
    coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon. With target None it stays
    fixed."""

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


@dataclass
class PPOStats:
    """The losses and diagnostics of one PPO minibatch update (means over its answer tokens)."""

    loss: float
    policy_loss: float
    value_loss: float
    policy_clipfrac: float
    approx_kl: float
    value_clipfrac: float

    @staticmethod
    def mean(stats: list[PPOStats]) -> dict[str, float]:
        """The metrics of an iteration, under the names logged to tensorboard."""
        names = {
            "loss": "loss",
            "policy_loss": "loss/policy",
            "value_loss": "loss/value",
            "policy_clipfrac": "policy/clipfrac",
            "approx_kl": "policy/approx_kl",
            "value_clipfrac": "value/clipfrac",
        }
        return {
            logged: sum(getattr(s, name) for s in stats) / len(stats)
            for name, logged in names.items()
        }


def rollout_metrics(
    scores, kl, entropy, rmask, ended, old_values, kl_coef: float
) -> dict[str, float]:
    """What an iteration's rollouts looked like, under the names logged to tensorboard (this rank's
    means)."""
    seq_kl = kl.sum(1)
    return {
        "objective/scores": scores.mean().item(),
        "objective/scores_std": scores.std().item() if len(scores) > 1 else 0.0,
        "objective/kl": seq_kl.mean().item(),
        "objective/entropy": (entropy * rmask).sum(1).mean().item(),
        "objective/non_score_reward": (-kl_coef * seq_kl).mean().item(),
        "response_length": rmask.sum(1).mean().item(),
        "eos_fraction": ended.float().mean().item(),
        "value/mean": masked_mean(old_values, rmask).item(),
        "kl_coef": kl_coef,
    }
