"""Data parallelism of the PPO loop (plain torch.distributed; a single process skips all of it):
which prompts each rank rolls out, gradient and statistics averaging, and the end-of-run weight
check."""

from __future__ import annotations

import logging
import random

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def step_prompts(prompts: list, step: int, per_rank: int, rank: int, world: int, seed: int) -> list:
    """This rank's prompts for a step: a fixed shuffled order per data epoch, so a resumed run sees
    the same."""
    size = per_rank * world
    start, order_out = step * size, []
    while len(order_out) < size:
        epoch, offset = divmod(start + len(order_out), len(prompts))
        order = list(range(len(prompts)))
        random.Random(seed + epoch).shuffle(order)
        order_out += order[offset : offset + size - len(order_out)]
    return [prompts[i] for i in order_out[rank::world]]


def reduce_mean(values: dict[str, float], world: int, device) -> dict[str, float]:
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist()))


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Average the gradients over processes (every rank trains on its own rollouts)."""
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def check_in_sync(params: list[torch.Tensor], world: int) -> None:
    """Every process must end with the same weights; compare a checksum of the trained
    parameters."""
    if world == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if len({round(g.item(), 6) for g in gathered}) != 1:
        raise RuntimeError(
            f"PPO processes diverged: parameter checksums {[g.item() for g in gathered]}"
        )
    logger.info(
        "trained weights identical on all %d processes (checksum %.6f)", world, checksum.item()
    )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
