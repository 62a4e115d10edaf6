"""Trainers for the DPO stage's loss families, all fed the project's pre-tokenized preference data.

- DPO and relatives (sigmoid, ipo, hinge, robust): trl's DPOTrainer, told not to re-tokenize.
- KTO (unpaired desirable/undesirable answers): trl's KTOTrainer, likewise.
- SimPO and ORPO (reference-free): trl has them only in its experimental package with its own text
  tokenization, so their losses (a few lines each) run here on the plain Trainer.

Every one reads log-probabilities through trl's fused LM head (chunked, no full-vocabulary logits)
and, with packing on (the default), runs each step's chosen and rejected sequences end to end
without padding (pipeline/model/unpadding.py), policy and reference alike.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer
from trl import DPOTrainer, KTOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from pipeline.model.adapters import reference_adapter_is_base, unwrap
from pipeline.model.patches import (
    adapters_off_for_reference,
    keep_checkpointing_choices,
    unpadded_log_probs,
)
from pipeline.train.losses import average_logps, orpo_loss, simpo_loss


def base_as_reference(trainer) -> None:
    """trl gives a LoRA policy without a separate reference a frozen copy of its adapter ("ref") to
    compute the reference with. A new adapter changes nothing yet (its B weights are zero), so its
    copy is the base model itself: the copy is dropped and the reference runs with the adapter
    switched off (no LoRA work in the reference forward, no adapter switch at each step). An
    adapter that was already trained keeps its copy."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(trainer, "ref_model", None) is None and reference_adapter_is_base(model):
        model.delete_adapter("ref")
    adapters_off_for_reference()


def unpad_models(trainer, packing: bool) -> None:
    """With packing, the policy (under its PEFT wrapper) and any separate reference run
    padding-free."""
    if packing:
        for model in (unwrap(trainer.model), getattr(trainer, "ref_model", None)):
            if model is not None:
                unpadded_log_probs(model)


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer that takes prompt_ids/chosen_ids/rejected_ids as they are (no re-tokenization, no
    EOS added)."""

    def __init__(self, *args, packing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        unpad_models(self, packing)
        keep_checkpointing_choices()
        base_as_reference(self)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class PretokenizedKTOTrainer(KTOTrainer):
    """KTOTrainer on prompt_ids/completion_ids/label; only adds the mismatched pairs its KL estimate
    needs."""

    def __init__(self, *args, packing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        unpad_models(self, packing)
        keep_checkpointing_choices()
        base_as_reference(self)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self.calculate_KL:  # rotate completions by one within each batch, as trl does

            def add_kl(examples):
                examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples[
                    "completion_ids"
                ][:-1]
                return examples

            dataset = dataset.map(add_kl, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset


REFERENCE_FREE_METRICS = ("logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/margins")


class ReferenceFreeTrainer(Trainer):
    def __init__(
        self,
        *args,
        loss_type: str,
        beta: float,
        gamma: float = 0.0,
        pad_token_id: int,
        packing: bool = False,
        **kwargs,
    ):
        super().__init__(
            *args, data_collator=DataCollatorForPreference(pad_token_id=pad_token_id), **kwargs
        )
        self.args.remove_unused_columns = False  # the preference collator needs the id columns
        add_fused_lm_head(unwrap(self.model))
        unpad_models(self, packing)
        self.loss_type, self.beta, self.gamma = loss_type, beta, gamma
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.can_return_loss = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = average_logps(model, inputs).chunk(2)
        loss = (
            simpo_loss(chosen, rejected, self.beta, self.gamma)
            if self.loss_type == "simpo"
            else orpo_loss(chosen, rejected, self.beta)
        )
        metrics = self._metrics["train" if model.training else "eval"]
        c, r = chosen.detach(), rejected.detach()
        values = torch.stack([c.mean(), r.mean(), (c > r).float().mean(), (c - r).mean()])
        for name, value in zip(REFERENCE_FREE_METRICS, values.tolist()):  # one host sync, not four
            metrics[name].append(value)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v})
        self._metrics[mode].clear()
        super().log(logs, start_time)
