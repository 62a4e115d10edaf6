"""Checkpoints that are whole, and preemption that loses nothing.

A checkpoint counts as resumable only once it is complete: the Trainer stages mark `checkpoint-N`
with COMPLETE after the Trainer has written all of it (its on_save event comes after the save), the
PPO loop writes the mark before renaming its tmp folder. `--resume_from_checkpoint auto` takes the
newest complete checkpoint and says which incomplete ones it skipped (a save interrupted by a kill).

SIGTERM (how schedulers preempt jobs; torchrun forwards it to every rank) is turned into "save a
checkpoint at the end of this step, then stop": the ranks agree on it at each step end, the stage
then exits with code 143 without writing a final model, so a pipeline does not mark the stage done,
and a rerun with `--resume_from_checkpoint auto` continues from that step. `Preemption` is that
signal handling and agreement, used by the Trainer stages through `CheckpointGuard` and by the PPO
loop (stages/ppo.py) directly.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from pipeline.errors import UserError

logger = logging.getLogger(__name__)
COMPLETE = "checkpoint_complete.json"
PREEMPTED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


def mark_complete(folder: Path, step: int) -> None:
    (folder / COMPLETE).write_text(json.dumps({"step": step}) + "\n")


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    found = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint-N; incomplete ones, and the PPO loop's unrenamed
    tmp-checkpoint-N folders (a save that was killed), are named in a warning."""
    for partial in sorted(output_dir.glob("tmp-checkpoint-*")):
        logger.warning(
            "ignoring %s: a checkpoint save that did not finish (the next save of that step clears "
            "it)",
            partial,
        )
    for folder in checkpoints(output_dir):
        if is_complete(folder):
            return folder
        logger.warning(
            "skipping %s: its save did not finish (no %s); resuming from an earlier checkpoint",
            folder,
            COMPLETE,
        )
    return None


_STORAGE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the filesystem is read-only",
}
_STORAGE_TEXT = {
    "no space left on device": "no space left on device",
    "os error 28": "no space left on device",
    "storagefull": "no space left on device",
    "disk quota exceeded": "disk quota exceeded",
    "read-only file system": "the filesystem is read-only",
}


# torch.save's zip writer reports a full disk only as a failed stream
# ("unexpected pos", "iostream error")
_WRITER_TEXT = ("inline_container", "iostream error", "pytorchstreamwriter", "unexpected pos")
_LOW_SPACE = 256 * 2**20


def storage_problem(error: BaseException, folder: str | None = None) -> str | None:
    """What ran out while writing, if `error` (or an error it was raised from) is a full or
    read-only disk. The libraries report it differently: OSError errno, safetensors' "os error 28",
    torch.save's failed stream (then the free space of `folder` decides)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _STORAGE:
            return _STORAGE[error.errno]
        text = str(error).lower()
        found = next((what for key, what in _STORAGE_TEXT.items() if key in text), None)
        if found:
            return found
        if folder and any(key in text for key in _WRITER_TEXT) and _free_bytes(folder) < _LOW_SPACE:
            return f"no space left on device ({_free_bytes(folder) // 2**20} MiB free)"
        error = error.__cause__ or error.__context__
    return None


def _free_bytes(folder: str) -> int:
    path = Path(folder).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(existing).free


@contextmanager
def storage_errors(output_dir: str):
    """A full (or read-only) disk while saving ends in one sentence naming the folder; the
    checkpoint being written is not marked complete, so the last complete one stays the resume
    point."""
    try:
        yield
    except Exception as e:
        problem = storage_problem(e, output_dir)
        if problem is None:
            raise
        last = last_complete_checkpoint(Path(output_dir)) if Path(output_dir).is_dir() else None
        resume = (
            f"{last.name} stays the resume point"
            if last
            else "no complete checkpoint was written yet"
        )
        raise UserError(
            f"{problem} while writing in {output_dir}; {resume}. Free space there (or pass another "
            "--output_dir), then rerun with --resume_from_checkpoint auto."
        ) from e


class Preemption:
    """SIGTERM as a request to stop at the end of the current step, which every rank must agree on.

    While it is installed (from construction to `restore`, or as a `with` block) SIGTERM only sets a
    flag; the loop asks `agreed()` at each step end, one all-reduce, so all ranks stop after the
    same step even when the signal reaches them at different moments. Off the main thread (where
    Python cannot install handlers) SIGTERM keeps its handler and `agreed()` answers for the other
    ranks only.
    """

    def __init__(self):
        self.signalled = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def restore(self) -> None:
        """Give SIGTERM back its handler from before training (a later SIGTERM must end the process
        again)."""
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


def exit_preempted(step: int, main_process: bool = True, saved: bool = True) -> NoReturn:
    """End a stage stopped by SIGTERM whose checkpoint-{step} is saved (or, `saved` False, was not:
    the step was not finite), without a final model (so a pipeline does not mark the stage done);
    the main process says how to continue."""
    if main_process:
        what = (
            f"saved checkpoint-{step}"
            if saved
            else "not checkpointed: that step was not finite; the last checkpoint before it is "
            "where a rerun continues"
        )
        logger.warning(
            "stopped by SIGTERM after step %d (%s); rerun with "
            "--resume_from_checkpoint auto to continue",
            step,
            what,
        )
    raise SystemExit(PREEMPTED_EXIT)


class CheckpointGuard(TrainerCallback):
    """Marks complete checkpoints; on SIGTERM saves at the end of the current step and stops
    training."""

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
