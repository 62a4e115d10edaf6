"""The steps every stage script shares around its Trainer: logging, train, evaluate, save.

Output layout (seed README): model or adapter (safetensors), tokenizer, trainer_state.json,
train_results.json, eval_results.json, checkpoint-*/, and tensorboard events under logs/.
"""

from __future__ import annotations

import logging
import math
import sys

import datasets
import transformers
from transformers import Trainer

from pipeline.args import PipelineTrainingArguments, resolve_resume_checkpoint

logger = logging.getLogger("pipeline")


def setup_logging(training_args: PipelineTrainingArguments) -> None:
    """INFO on the main process, warnings only on the others (so torchrun output stays readable)."""
    level = logging.INFO if training_args.should_log else logging.WARNING
    root = logging.getLogger("pipeline")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    transformers.utils.logging.set_verbosity(level if level == logging.WARNING else logging.WARNING)
    datasets.utils.logging.set_verbosity(logging.WARNING)
    datasets.utils.logging.disable_progress_bar()


def log_dataset_summary(lines: list[str]) -> None:
    for line in lines:
        logger.info(line)


def train_and_save(trainer: Trainer, training_args: PipelineTrainingArguments) -> dict[str, float]:
    """Train (resuming when asked), save model + tokenizer + state + metrics; return train metrics."""
    checkpoint = resolve_resume_checkpoint(training_args)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.use_cache = True  # the saved config is for inference, which wants the cache back
    trainer.save_model()
    base.config.use_cache = False  # evaluation of packed blocks still needs it off
    metrics = dict(result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


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
