"""The steps every Trainer-based stage shares after pipeline/run/setup.py: train (with resume),
save, evaluate.

Output layout (seed README): model or adapter (safetensors), tokenizer, trainer_state.json,
train_results.json, eval_results.json, checkpoint-*/, and tensorboard events under logs/.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import Trainer, TrainerCallback

from pipeline.args import PipelineTrainingArguments
from pipeline.errors import UserError
from pipeline.model.adapters import unwrap
from pipeline.model.merge import record_base
from pipeline.run.checkpoints import CheckpointGuard, exit_preempted, storage_errors
from pipeline.run.output_dir import take_output_dir
from pipeline.run.resume import prepare_trainer_resume, resolve_resume_checkpoint
from pipeline.train.divergence import DivergenceGuard, check_finite_weights

logger = logging.getLogger("pipeline")


class _AlreadyFinished(Exception):
    """Raised at the start of training when the resumed checkpoint already reached the run's last
    step."""


class StopIfFinished(TrainerCallback):
    """Resuming at the last step must train nothing; the Trainer would run one more step before it
    checks."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise _AlreadyFinished(state.global_step, state.max_steps)


def train_and_save(trainer: Trainer, training_args: PipelineTrainingArguments) -> dict[str, float]:
    """Train (resuming when asked), save model + tokenizer + state + metrics; return train
    metrics."""
    take_output_dir(training_args)  # an overwritten run's checkpoints go first, so none is resumed
    checkpoint = resolve_resume_checkpoint(training_args)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    prepare_trainer_resume(
        trainer, checkpoint
    )  # a ZeRO checkpoint saved by another number of processes
    guard = CheckpointGuard()
    trainer.add_callback(guard)
    trainer.add_callback(StopIfFinished())
    # added after the checkpoint guard: it may veto that guard's save
    divergence = DivergenceGuard(trainer, training_args.max_nonfinite_steps)
    trainer.add_callback(divergence)
    try:
        with storage_errors(training_args.output_dir):
            result = trainer.train(resume_from_checkpoint=checkpoint)
    except _AlreadyFinished as finished:
        # the checkpoint is the end of the run (a rerun of a finished or requeued job): its weights,
        # restored by train(), become the final model again; no step is trained and the earlier
        # metrics stay
        logger.info(
            "%s is already at step %d of %d: nothing more to train", checkpoint, *finished.args
        )
        result = None
    finally:
        guard.restore()
    if (
        guard.preempted
    ):  # a checkpoint of this step was saved (unless it was not finite); no final model
        step = trainer.state.global_step
        exit_preempted(step, training_args.should_log, saved=not divergence.was_skipped(step))
    if trainer.state.global_step == 0:
        raise UserError(
            "training ran 0 steps, so the output would be the untrained model; check --max_steps, "
            "--num_train_epochs and the data size."
        )
    check_finite_weights(trainer.model, training_args.device)  # never write a NaN model
    base = unwrap(trainer.model)
    base.config.use_cache = True  # the saved config is for inference, which wants the cache back
    with storage_errors(training_args.output_dir):
        trainer.save_model()
    base.config.use_cache = False  # evaluation of packed blocks still needs it off
    record_adapter_base(trainer.model, training_args)
    if result is None:
        trainer.save_state()
        return {}
    metrics = dict(result.metrics)
    if torch.cuda.is_available():  # this process's peak, for comparing memory across runs and tools
        metrics["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def record_adapter_base(model, training_args: PipelineTrainingArguments) -> None:
    """An adapter's folder records which base it was trained on, so merging it into another is
    refused."""
    config = getattr(model, "peft_config", {}).get("default")
    if training_args.should_save and config is not None and config.base_model_name_or_path:
        record_base(training_args.output_dir, config.base_model_name_or_path)


def evaluate_and_save(trainer: Trainer, with_perplexity: bool = False) -> dict[str, float]:
    metrics = trainer.evaluate()
    if with_perplexity:
        try:
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
        except OverflowError:
            metrics["perplexity"] = float("inf")
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics
