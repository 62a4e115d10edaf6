"""The losses the project computes itself (the rest come from trl's trainers): the causal-LM loss
from hidden states without full-vocabulary logits (PT, SFT), the reward model's pairwise loss, and
the reference-free preference losses SimPO and ORPO with the log-probabilities they read."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.data.masking import IGNORE_INDEX


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, center_coef: float
) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin), plus center_coef * mean((r_c + r_r)^2) to keep rewards near
    zero."""
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def average_logps(model, batch) -> torch.Tensor:
    """Mean log-probability of the completion tokens of each row, through trl's fused LM head
    (installed on the model: per-token log-probabilities in chunks, never the full-vocabulary
    logits)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    token_logps = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        fused_lm_head=True,
        use_cache=False,
    ).log_probs
    return token_logps.sum(-1) / batch["completion_mask"][:, 1:].sum(-1).clamp(min=1)


def simpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """SimPO: -log sigmoid(beta * (avg logp_c - avg logp_r) - gamma), no reference model."""
    return -F.logsigmoid(beta * (chosen - rejected) - gamma).mean()


def _log1m(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from log p, kept finite where p rounds to 1."""
    return torch.log1p(-logp.exp().clamp(max=1 - 1e-6))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO: NLL of the chosen answer + beta * -log sigmoid(log odds(chosen) - log
    odds(rejected))."""
    log_odds = (chosen - rejected) - (_log1m(chosen) - _log1m(rejected))
    return (-chosen).mean() - beta * F.logsigmoid(log_odds).mean()


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def causal_lm_loss_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    chunk_size: int = 2048,
    fused: bool = False,
    compute_dtype: torch.dtype | None = None,
    sharded_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy, number of supervised tokens) from the final hidden states.

    Only positions whose next label is supervised go through the output head, `chunk_size` at a
    time, and each chunk's logits are recomputed in the backward pass instead of kept: the full
    [tokens, vocabulary] logits never exist. Equal in value and gradient to cross-entropy on the
    model's logits. `fused`: liger-kernel's fused linear cross-entropy instead (CUDA, a plain Linear
    head). `compute_dtype`: the mixed-precision dtype the head multiplies in (the hidden states
    reach the loss outside the model's autocast, converted to float32 by accelerate); None: as the
    head's weight and the hidden states are. `sharded_head`: DeepSpeed ZeRO-3 partitions the head's
    weights between its module calls (see below).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    device = hidden.device.type
    if fused:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        weight, bias = head.weight, head.bias
        dtype = (
            compute_dtype or weight.dtype
        )  # the kernel multiplies its operands as given: make them agree
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return LigerFusedLinearCrossEntropyLoss(reduction="sum")(
                weight, hidden, targets, bias
            ), keep.sum()
    # ZeRO-3: a chunk's recomputation runs in the backward pass before any module's backward hook
    # (the loss is outside the model), so DeepSpeed re-partitions the head right after it, and
    # checkpoint holds a frozen weight (LoRA's head) by reference: its shape check sees the empty
    # shard. The weight is gathered again by the head's own pre-backward hook before its gradient is
    # computed, so only the shape check is skipped.
    check = "none" if sharded_head else "default"
    total = hidden.new_zeros((), dtype=torch.float32)
    with torch.autocast(
        device, dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None
    ):
        for start in range(0, len(targets), chunk_size):
            part = slice(start, start + chunk_size)
            if torch.is_grad_enabled():
                total = total + checkpoint(
                    _chunk_loss,
                    hidden[part],
                    targets[part],
                    head,
                    use_reentrant=False,
                    determinism_check=check,
                )
            else:
                total = total + _chunk_loss(hidden[part], targets[part], head)
    return total, keep.sum()
