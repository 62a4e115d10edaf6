"""Checkpoints that are whole, and preemption that loses nothing.

A checkpoint counts as resumable only once it is complete: the Trainer stages mark `checkpoint-N` with
COMPLETE after the Trainer has written all of it (its on_save event comes after the save), the PPO loop
writes the mark before renaming its tmp folder. `--resume_from_checkpoint auto` takes the newest complete
checkpoint and says which incomplete ones it skipped (a save interrupted by a kill).

SIGTERM (how schedulers preempt jobs; torchrun forwards it to every rank) is turned into "save a checkpoint
at the end of this step, then stop": the ranks agree on it at each step end, the stage then exits with code
143 without writing a final model, so a pipeline does not mark the stage done, and a rerun with
`--resume_from_checkpoint auto` continues from that step. `Preemption` is that signal handling and agreement,
used by the Trainer stages through `CheckpointGuard` and by the PPO loop (stages/ppo.py) directly.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)
COMPLETE = "checkpoint_complete.json"
PREEMPTED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


def mark_complete(folder: Path, step: int) -> None:
    (folder / COMPLETE).write_text(json.dumps({"step": step}) + "\n")


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint-N; incomplete ones, and the PPO loop's unrenamed tmp-checkpoint-N
    folders (a save that was killed), are named in a warning."""
    for partial in sorted(output_dir.glob("tmp-checkpoint-*")):
        logger.warning("ignoring %s: a checkpoint save that did not finish (the next save of that step clears it)",
                       partial)
    for folder in checkpoints(output_dir):
        if is_complete(folder):
            return folder
        logger.warning("skipping %s: its save did not finish (no %s); resuming from an earlier checkpoint",
                       folder, COMPLETE)
    return None


class Preemption:
    """SIGTERM as a request to stop at the end of the current step, which every rank must agree on.

    While it is installed (from construction to `restore`, or as a `with` block) SIGTERM only sets a flag;
    the loop asks `agreed()` at each step end, one all-reduce, so all ranks stop after the same step even
    when the signal reaches them at different moments. Off the main thread (where Python cannot install
    handlers) SIGTERM keeps its handler and `agreed()` answers for the other ranks only.
    """

    def __init__(self):
        self.signalled = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def restore(self) -> None:
        """Give SIGTERM back its handler from before training (a later SIGTERM must end the process again)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> Preemption:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _on_sigterm(self, signum, frame) -> None:
        if not self.signalled:
            logger.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
        self.signalled = True

    def agreed(self, device) -> bool:
        """Whether any rank was signalled (every rank must save and stop at the same step)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signalled
        flag = torch.tensor([float(self.signalled)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def exit_preempted(step: int, main_process: bool = True) -> NoReturn:
    """End a stage stopped by SIGTERM whose checkpoint-{step} is saved, without a final model (so a pipeline
    does not mark the stage done); the main process says how to continue."""
    if main_process:
        logger.warning("stopped by SIGTERM after step %d (saved checkpoint-%d); rerun with "
                       "--resume_from_checkpoint auto to continue", step, step)
    raise SystemExit(PREEMPTED_EXIT)


class CheckpointGuard(TrainerCallback):
    """Marks complete checkpoints; on SIGTERM saves at the end of the current step and stops training."""

    def __init__(self):
        self.preempted = False
        self.sigterm = Preemption()

    def restore(self) -> None:
        self.sigterm.restore()

    def on_step_end(self, args, state, control, **kwargs):
        if self.sigterm.agreed(args.device):
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            mark_complete(folder, state.global_step)
        return control
