"""The one place a stage touches its process, right after its flags are parsed and checked: it dies
with its launcher, takes the output-folder lock (rank 0), logs on the main process, seeds, points
tensorboard at output_dir/logs and, for DeepSpeed on a CPU, adopts the process group."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import datasets
import torch
import transformers
from transformers import set_seed

from pipeline.args.checks import deepspeed_without_launcher
from pipeline.seed_flags import say_notes

# A TENSORBOARD_LOGGING_DIR set by the user before start wins; otherwise each run logs to
# output_dir/logs.
_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")


def setup_run(training_args) -> None:
    """The one place a stage touches the process: logging, seed, tensorboard folder, process group.

    Called right after the arguments are parsed and validated; parsing itself has no side effects.
    """
    from pipeline.run.process import die_with_launcher, lock_output_dir

    die_with_launcher()  # a worker must not outlive its launcher (it runs in a session of its own)
    deepspeed_without_launcher(
        training_args
    )  # before anything asks DeepSpeed for the process group
    setup_logging(training_args)
    if (
        training_args.process_index == 0
    ):  # global rank 0 speaks for the run: no second trainer in output_dir
        lock_output_dir(training_args.output_dir)
    set_seed(training_args.seed)
    # Tensorboard events go to output_dir/logs (the seed README's layout); transformers reads this
    # variable.
    os.environ["TENSORBOARD_LOGGING_DIR"] = _USER_TENSORBOARD_DIR or str(
        Path(training_args.output_dir) / "logs"
    )
    if training_args.deepspeed and not torch.cuda.is_available():
        # On CPU accelerate sets up a plain gloo group; DeepSpeed must adopt it, or it counts one
        # process.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def setup_logging(training_args) -> None:
    """INFO on the main process, warnings only on the others (so torchrun output stays readable)."""
    level = logging.INFO if training_args.should_log else logging.WARNING
    root = logging.getLogger("pipeline")
    if not root.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
    root.setLevel(level)
    transformers.utils.logging.set_verbosity(level if level == logging.WARNING else logging.WARNING)
    datasets.utils.logging.set_verbosity(logging.WARNING)
    datasets.utils.logging.disable_progress_bar()
    say_notes()  # what the parser read differently (seed documents' flags and configs)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is now (a stage run twice in one process, e.g. a notebook or a
    test that captures output, must not log into the stream of the first run)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def tensorboard_writer(training_args):
    """A SummaryWriter on output_dir/logs for loops without a Trainer (PPO), on the main process,
    when --report_to includes tensorboard; else None."""
    if not (training_args.should_log and "tensorboard" in (training_args.report_to or [])):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(
        os.environ.get("TENSORBOARD_LOGGING_DIR") or str(Path(training_args.output_dir) / "logs")
    )
