"""The steps every stage script shares around its Trainer: run setup, train, evaluate, save.

Output layout (seed README): model or adapter (safetensors), tokenizer, trainer_state.json,
train_results.json, eval_results.json, checkpoint-*/, and tensorboard events under logs/.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import datasets
import torch
import transformers
from transformers import Trainer, TrainerCallback, set_seed

from pipeline.args import PipelineTrainingArguments, resolve_resume_checkpoint
from pipeline.args.checks import deepspeed_without_launcher
from pipeline.errors import UserError
from pipeline.model.adapters import unwrap
from pipeline.model.merge import record_base
from pipeline.seed_flags import say_notes
from pipeline.train.checkpoints import CheckpointGuard, exit_preempted, storage_errors
from pipeline.train.divergence import DivergenceGuard, check_finite_weights
from pipeline.train.output_dir import take_output_dir
from pipeline.train.zero_resume import prepare_trainer_resume

logger = logging.getLogger("pipeline")
# A TENSORBOARD_LOGGING_DIR set by the user before start wins; otherwise each run logs to output_dir/logs.
_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")


def setup_run(training_args: PipelineTrainingArguments) -> None:
    """The one place a stage touches the process: logging, seed, tensorboard folder, process group.

    Called right after the arguments are parsed and validated; parsing itself has no side effects.
    """
    from pipeline.train.process import die_with_launcher, lock_output_dir

    die_with_launcher()  # a worker must not outlive its launcher (it runs in a session of its own)
    deepspeed_without_launcher(training_args)  # before anything asks DeepSpeed for the process group
    setup_logging(training_args)
    if training_args.process_index == 0:  # global rank 0 speaks for the run: no second trainer in output_dir
        lock_output_dir(training_args.output_dir)
    set_seed(training_args.seed)
    # Tensorboard events go to output_dir/logs (the seed README's layout); transformers reads this variable.
    os.environ["TENSORBOARD_LOGGING_DIR"] = _USER_TENSORBOARD_DIR or str(Path(training_args.output_dir) / "logs")
    if training_args.deepspeed and not torch.cuda.is_available():
        # On CPU accelerate sets up a plain gloo group; DeepSpeed must adopt it, or it counts one process.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def setup_logging(training_args: PipelineTrainingArguments) -> None:
    """INFO on the main process, warnings only on the others (so torchrun output stays readable)."""
    level = logging.INFO if training_args.should_log else logging.WARNING
    root = logging.getLogger("pipeline")
    if not root.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    transformers.utils.logging.set_verbosity(level if level == logging.WARNING else logging.WARNING)
    datasets.utils.logging.set_verbosity(logging.WARNING)
    datasets.utils.logging.disable_progress_bar()
    say_notes()  # what the parser read differently (seed documents' flags and configs)


class _AlreadyFinished(Exception):
    """Raised at the start of training when the resumed checkpoint already reached the run's last step."""


class StopIfFinished(TrainerCallback):
    """Resuming at the last step must train nothing; the Trainer would run one more step before it checks."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise _AlreadyFinished(state.global_step, state.max_steps)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is now (a stage run twice in one process, e.g. a notebook or a test
    that captures output, must not log into the stream of the first run)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def train_and_save(trainer: Trainer, training_args: PipelineTrainingArguments) -> dict[str, float]:
    """Train (resuming when asked), save model + tokenizer + state + metrics; return train metrics."""
    take_output_dir(training_args)  # an overwritten run's checkpoints go first, so none is resumed
    checkpoint = resolve_resume_checkpoint(training_args)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    prepare_trainer_resume(trainer, checkpoint)  # a ZeRO checkpoint saved by another number of processes
    guard = CheckpointGuard()
    trainer.add_callback(guard)
    trainer.add_callback(StopIfFinished())
    # added after the checkpoint guard: it may veto that guard's save
    trainer.add_callback(DivergenceGuard(trainer, training_args.max_nonfinite_steps))
    try:
        with storage_errors(training_args.output_dir):
            result = trainer.train(resume_from_checkpoint=checkpoint)
    except _AlreadyFinished as finished:
        # the checkpoint is the end of the run (a rerun of a finished or requeued job): its weights, restored
        # by train(), become the final model again; no step is trained and the earlier metrics stay
        logger.info("%s is already at step %d of %d: nothing more to train", checkpoint, *finished.args)
        result = None
    finally:
        guard.restore()
    if guard.preempted:  # a checkpoint of this step was saved; no final model, so the stage is not done
        exit_preempted(trainer.state.global_step, training_args.should_log)
    if trainer.state.global_step == 0:
        raise UserError("training ran 0 steps, so the output would be the untrained model; check --max_steps, "
                        "--num_train_epochs and the data size.")
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
    """An adapter's folder records which base it was trained on, so merging it into another is refused."""
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


def tensorboard_writer(training_args: PipelineTrainingArguments):
    """A SummaryWriter on output_dir/logs for loops without a Trainer (PPO), on the main process, when
    --report_to includes tensorboard; else None."""
    if not (training_args.should_log and "tensorboard" in (training_args.report_to or [])):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.environ.get("TENSORBOARD_LOGGING_DIR") or str(Path(training_args.output_dir) / "logs"))
