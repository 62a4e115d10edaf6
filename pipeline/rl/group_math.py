"""The arithmetic of group-relative RL (GRPO and its variants: Dr. GRPO, DAPO, GSPO, RLOO), kept
apart from the training loop so each piece is unit-tested against hand-computed values.

Shapes: `logp`, `old_logp`, `ref_logp` and `mask` are (batch, response_length) tensors over the
generated answer tokens, with a 0/1 `mask` marking real answer tokens (1 up to and including the
stop token, 0 on padding after it). `rewards` and `advantages` are (batch,): one number per answer,
the G answers of one prompt in consecutive rows (rows 0..G-1 are prompt 0's group, rows G..2G-1
prompt 1's, ...); an advantage is broadcast over its answer's tokens.
"""

from __future__ import annotations

import torch

from pipeline.rl.ppo_math import masked_mean

AGGREGATIONS = ("sequence_mean", "token_mean", "constant")

# One entry per algorithm; the keys are the same for all. eps_low None = use --cliprange; eps_high
# None = eps_low.
VARIANTS: dict[str, dict] = {
    # Shao et al. 2024, "DeepSeekMath" (GRPO): group mean / group std, per-answer token mean.
    "grpo": dict(
        scale="std",
        leave_one_out=False,
        ratio_level="token",
        aggregation="sequence_mean",
        dynamic_sampling=False,
        eps_low=None,
        eps_high=None,
    ),
    # Yu et al. 2025, "DAPO": clip-higher (eps_low 0.2, eps_high 0.28), token-level mean, dynamic
    # sampling.
    "dapo": dict(
        scale="std",
        leave_one_out=False,
        ratio_level="token",
        aggregation="token_mean",
        dynamic_sampling=True,
        eps_low=None,
        eps_high=0.28,
    ),
    # Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO): no std division,
    # sum / (batch * budget).
    "dr_grpo": dict(
        scale="none",
        leave_one_out=False,
        ratio_level="token",
        aggregation="constant",
        dynamic_sampling=False,
        eps_low=None,
        eps_high=None,
    ),
    # Zheng et al. 2025, "Group Sequence Policy Optimization" (GSPO): length-normalized sequence
    # ratio, eps 3e-4 / 4e-4.
    "gspo": dict(
        scale="std",
        leave_one_out=False,
        ratio_level="sequence",
        aggregation="sequence_mean",
        dynamic_sampling=False,
        eps_low=3e-4,
        eps_high=4e-4,
    ),
    # Ahmadian et al. 2024, "Back to Basics" (RLOO): leave-one-out baseline, no std division. trl's
    # RLOOTrainer clips the full-sequence ratio exp(sum_t log r_t) and sums token terms per answer
    # (mean over answers); of the aggregations here "token_mean" is the one that, like it, weights
    # every token of every answer equally.
    "rloo": dict(
        scale="none",
        leave_one_out=True,
        ratio_level="token",
        aggregation="token_mean",
        dynamic_sampling=False,
        eps_low=None,
        eps_high=None,
    ),
}


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(batch,) -> (batch / G, G), checking that the batch is whole groups."""
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    if x.dim() != 1 or len(x) % group_size != 0:
        raise ValueError(
            f"rewards of shape {tuple(x.shape)} do not split into groups of {group_size}"
        )
    return x.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "std",
    leave_one_out: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:
    """A_i = (r_i - b_i) / (std_group + eps) with scale="std", or r_i - b_i with scale="none"
    (Dr. GRPO, RLOO). The baseline b_i is the group mean, or with leave_one_out the mean of the
    other G-1 answers of the group, (sum_group - r_i) / (G - 1) (RLOO). The std is the unbiased one
    (divides by G - 1), as trl's GRPOTrainer (its nanstd applies Bessel's correction); a group of
    one answer has std 0."""
    if scale not in ("std", "none"):
        raise ValueError(f"unknown advantage scale {scale!r}; use 'std' or 'none'")
    grouped = _groups(rewards if rewards.is_floating_point() else rewards.float(), group_size)
    if leave_one_out:
        if group_size < 2:
            raise ValueError("the leave-one-out baseline needs group_size >= 2")
        baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    else:
        baseline = grouped.mean(1, keepdim=True)
    advantages = grouped - baseline
    if scale == "std":
        std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(baseline)
        advantages = advantages / (std + eps)
    return advantages.reshape(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(batch,) bool, True on every row of a group whose G rewards are all equal: their advantages
    are all 0, so they carry no learning signal (DAPO's dynamic sampling drops them and samples
    more)."""
    grouped = _groups(rewards, group_size)
    same = grouped.max(1).values == grouped.min(1).values
    return same.repeat_interleave(group_size)


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, max_tokens: int | None = None
) -> torch.Tensor:
    """Reduce a (batch, length) per-token loss to a scalar over the masked tokens.
    "sequence_mean" (GRPO): mean_i (sum_t x_it / n_i), every answer weighs the same, so a long
    answer's tokens weigh less; "token_mean" (DAPO): sum_it x_it / sum_i n_i, every token weighs the
    same; "constant" (Dr. GRPO): sum_it x_it / (batch * max_tokens), with max_tokens the generation
    budget."""
    if aggregation == "sequence_mean":
        return masked_mean(per_token, mask, dim=1).mean()
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    if aggregation == "constant":
        if max_tokens is None or max_tokens < 1:
            raise ValueError(
                f"aggregation 'constant' needs max_tokens (the generation budget), got {max_tokens}"
            )
        return (per_token * mask).sum() / (per_token.shape[0] * max_tokens)
    raise ValueError(f"unknown aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    ratio_level: str = "token",
    aggregation: str = "sequence_mean",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) per token, reduced by
    `aggregate`.
    ratio_level "token": r_t = exp(logp_t - old_logp_t) (eps_high > eps_low is DAPO's clip-higher).
    ratio_level "sequence" (GSPO): s_i = exp(mean_t (logp_t - old_logp_t)) over the answer's real
    tokens, clipped at the sequence level, used in GSPO's token form
    r_t = sg[s_i] * exp(logp_t - sg[logp_t]): its value is s_i on every token and
    d r_t / d logp_t = s_i, so with "sequence_mean" the loss and its gradient are the sequence
    objective's (grad = -A s_i / n_i per token, divided by the batch) and a clipped answer gets no
    gradient.
    Returns (loss, clip fraction: of tokens, or of answers for "sequence"; approx KL
    0.5 * mean (logp - old_logp)^2)."""
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"unknown ratio_level {ratio_level!r}; use 'token' or 'sequence'")
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}"
        )
    log_ratio = logp - old_logp
    adv = advantages.unsqueeze(1)
    if ratio_level == "token":
        ratio = torch.exp(log_ratio)
    else:
        seq_ratio = torch.exp(masked_mean(log_ratio, mask, dim=1)).unsqueeze(1)
        ratio = seq_ratio.detach() * torch.exp(logp - logp.detach())
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_tokens)
    if ratio_level == "token":
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    else:
        seq_clipped = (
            -adv * torch.clamp(seq_ratio, 1 - eps_low, 1 + eps_high) > -adv * seq_ratio
        ).squeeze(1)
        answered = (mask.sum(1) > 0).float()
        clipfrac = (seq_clipped.float() * answered).sum() / answered.sum().clamp(min=1)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference), exp(ref - logp) - (ref - logp) - 1: never
    negative, 0 where the two agree (what trl's GRPOTrainer adds to the per-token loss times beta;
    reduce it with `aggregate`)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1
