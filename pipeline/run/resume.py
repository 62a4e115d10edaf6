"""Resuming: --resume_from_checkpoint resolved to a whole checkpoint folder
(resolve_resume_checkpoint), and a DeepSpeed ZeRO checkpoint resumed on another number of processes
(e.g. saved on 2 GPUs, resumed on 1).

ZeRO-2/3 split the optimizer state (and ZeRO-3 the weights) into one shard per data-parallel rank,
and DeepSpeed refuses to load such a checkpoint on a different rank count. DeepSpeed's own answer is
its "universal" checkpoint format, which any rank count can load. When a resumed checkpoint was
saved by another number of processes, the main process converts it once
(deepspeed.checkpoint.ds_to_universal, written beside the original as <tag>_universal, marked when
whole) and the engine is told to load that form. The data order continues exactly when an optimizer
step takes as many samples (per-device batch x accumulation x processes) as when the checkpoint was
saved; otherwise a warning names both counts. Measured on CPU (tests/test_zero_resume.py): ZeRO-2
and ZeRO-3 runs saved by 2 processes and resumed on 1 end on the uninterrupted run's weights to
float rounding.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.errors import UserError
from pipeline.model.integrity import check_folder_whole
from pipeline.model.patches import separate_zero3_step_counts
from pipeline.run.checkpoints import COMPLETE, is_complete, last_complete_checkpoint
from pipeline.run.output_dir import other_run, recorded_run

logger = logging.getLogger(__name__)
CONVERTED = "universal_complete"


def resolve_resume_checkpoint(training_args) -> str | None:
    """Turn --resume_from_checkpoint (path, step number, yes/last, auto) into a folder or None; the
    folder's files are checked whole (a checkpoint cut short by a full disk is named, not
    loaded)."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "no", "false", "none"):
        return None
    out = Path(training_args.output_dir)
    last = last_complete_checkpoint(out) if out.is_dir() else None
    if str(value).lower() in ("auto", "yes", "true", "last"):
        if last is None and str(value).lower() != "auto":
            raise UserError(
                f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in {out}."
            )
        path = last
    else:
        path = Path(out, f"checkpoint-{value}") if str(value).isdigit() else Path(value)
        if not path.is_dir():
            raise UserError(f"--resume_from_checkpoint {value}: {path} does not exist.")
        if not is_complete(path):
            raise UserError(
                f"--resume_from_checkpoint {value}: {path} is incomplete (no {COMPLETE}: its save "
                "was interrupted, or an older version wrote it); pick an earlier checkpoint or "
                "delete this one."
            )
    if path is not None:
        check_folder_whole(path, "--resume_from_checkpoint")
        _check_same_run(path, training_args)
    return None if path is None else str(path)


def _check_same_run(checkpoint: Path, training_args) -> None:
    """A checkpoint of another folder (an explicit path) is refused when the run recorded there
    differs from this one: another stage's weights and optimizer would continue silently as this
    stage's, another method's would fail to load."""
    identity = getattr(training_args, "pipeline_identity", None)
    if identity is None or checkpoint.parent.resolve() == Path(training_args.output_dir).resolve():
        return  # the output folder's own run was compared when the stage claimed the folder
    differs = other_run(recorded_run(checkpoint.parent), identity)
    if differs:
        raise UserError(
            f"--resume_from_checkpoint {checkpoint} is a checkpoint of {differs}, not of this run; "
            "resume it with its own settings, or start this run from a model instead "
            "(--model_name_or_path)."
        )


def saved_layout(ds_folder: Path) -> tuple[int, int] | None:
    """(data-parallel ranks, global batch) a DeepSpeed checkpoint folder (global_stepN, PPO's
    deepspeed) was saved with; None when it holds no DeepSpeed model states."""
    files = sorted(ds_folder.glob("*model_states.pt"))
    if not files:
        return None
    state = torch.load(
        files[0], map_location="cpu", mmap=True, weights_only=False
    )  # mmap: the weights stay on disk
    return int(state["dp_world_size"]), int(state["ds_config"].get("train_batch_size", 0))


def universal_folder(
    ds_folder: Path, world_size: int, global_batch: int, main_process: bool
) -> Path | None:
    """None when `ds_folder` was saved by `world_size` processes (DeepSpeed loads it as it is);
    otherwise its universal form, converted by the main process unless already there (every rank
    waits for it)."""
    layout = saved_layout(ds_folder)
    if layout is None or layout[0] == world_size:
        return None
    saved_world, saved_batch = layout
    universal = ds_folder.with_name(ds_folder.name + "_universal")
    if main_process:
        logger.warning(
            "%s was saved by %d processes and this run has %d: resuming through DeepSpeed's "
            "universal checkpoint %s",
            ds_folder.parent,
            saved_world,
            world_size,
            universal,
        )
        if saved_batch and global_batch != saved_batch:
            logger.warning(
                "one optimizer step took %d samples and now takes %d: the run continues with "
                "another step size and data order; keep per-device batch x gradient accumulation x "
                "processes at %d to continue the same run",
                saved_batch,
                global_batch,
                saved_batch,
            )
        if not (universal / CONVERTED).is_file():
            convert(ds_folder, universal)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    separate_zero3_step_counts()  # pipeline/model/patches.py
    return universal


def convert(ds_folder: Path, universal: Path) -> None:
    """ds_to_universal into `universal` (cleared first: an earlier conversion may have been cut
    short)."""
    shutil.rmtree(universal, ignore_errors=True)
    logger.info(
        "converting %s to a universal checkpoint (once; about the size of the original)", ds_folder
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ds_folder),
            "--output_folder",
            str(universal),
            "--inject_missing_state",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        reason = next(
            (line for line in reversed(proc.stderr.splitlines()) if line.strip()), "no message"
        )
        raise UserError(
            f"{ds_folder} was saved by another number of processes and could not be converted to "
            f"DeepSpeed's universal checkpoint ({reason[:300]}); resume it with the process count "
            "it was saved with."
        )
    (universal / CONVERTED).write_text("")


def ds_folder_of(checkpoint: Path) -> Path | None:
    """The Trainer's DeepSpeed folder in checkpoint-N (global_stepN), or None."""
    found = sorted(
        p
        for p in checkpoint.glob("global_step*")
        if p.is_dir() and not p.name.endswith("_universal")
    )
    return found[-1] if found else None


def prepare_trainer_resume(trainer, checkpoint: str | None) -> None:
    """Before trainer.train(resume_from_checkpoint=...): a DeepSpeed checkpoint of another process
    count is loaded in universal form (ds_to_universal also points checkpoint-N/latest_universal at
    it)."""
    args = trainer.args
    ds_folder = ds_folder_of(Path(checkpoint)) if checkpoint and args.deepspeed else None
    if ds_folder is None:
        return
    global_batch = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    )
    if universal_folder(ds_folder, args.world_size, global_batch, args.should_log) is not None:
        # the dict the engine is built from at train(); HF's config object and accelerate's plugin
        # share it
        args.hf_deepspeed_config.config["checkpoint"] = {"load_universal": True}
