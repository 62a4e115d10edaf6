"""Pairwise reward-model training: the Trainer and its evaluation metrics (the loss is in losses.py,
the pair collator in pipeline/data/collators.py).

trl's RewardTrainer would fit, but its config class repeats flags the shared ModelArguments own
(--trust_remote_code, --max_length), so the loss (a few lines) lives here on the plain Trainer.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Trainer

from pipeline.model.adapters import unwrap
from pipeline.model.compiled import compile_decoder_layers
from pipeline.model.patches import unpadded_scores
from pipeline.train.losses import pairwise_loss


class RewardModelTrainer(Trainer):
    def __init__(
        self, *args, center_rewards_coefficient: float = 0.0, packing: bool = False, **kwargs
    ):
        super().__init__(*args, compute_metrics=pair_metrics, **kwargs)
        self.center_rewards_coefficient = center_rewards_coefficient
        self.can_return_loss = True
        self.packing = packing
        if packing:  # the pairs' rows run end to end, padding-free (pipeline/model/unpadding.py)
            unpadded_scores(unwrap(self.model))
        if self.args.compile_layers:
            compile_decoder_layers(self.model)

    def _rewards(self, model, inputs):
        extra = {"unpad": True} if self.packing else {"use_cache": False}
        rewards = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **extra
        ).logits
        return torch.chunk(rewards.squeeze(-1).float(), 2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = self._rewards(model, inputs)
        loss = pairwise_loss(
            chosen, rejected, inputs["margin"].to(chosen.device), self.center_rewards_coefficient
        )
        return (loss, torch.stack([chosen, rejected], dim=-1)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, pairs = self.compute_loss(model, inputs, return_outputs=True)
        return (
            loss.detach(),
            (None if prediction_loss_only else pairs),
            (None if prediction_loss_only else pairs[:, 0]),
        )


def pair_metrics(eval_pred) -> dict[str, float]:
    pairs = np.asarray(eval_pred.predictions)
    diff = pairs[:, 0] - pairs[:, 1]
    return {
        "accuracy": float((diff > 0).mean()),
        "margin": float(diff.mean()),
        "reward_chosen": float(pairs[:, 0].mean()),
        "reward_rejected": float(pairs[:, 1].mean()),
    }
