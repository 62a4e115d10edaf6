"""One run per output folder: a folder holding another run's results is not silently mixed with a
new one.

A stage records which run owns its --output_dir (RUN_FILE: the stage, its start model and its
training data). Starting afresh in a folder that holds checkpoints or a trained model is refused
unless --overwrite_output_dir, which removes what an earlier run wrote there once training starts;
resuming (--resume_from_checkpoint) is refused when the recorded run is another one (other stage,
start model or data), since its checkpoints are not this run's.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch.distributed as dist

from pipeline.errors import UserError
from pipeline.run.checkpoints import last_complete_checkpoint

logger = logging.getLogger(__name__)
RUN_FILE = "pipeline_run.json"
# What the stages write into an output folder: removed by --overwrite_output_dir (nothing else is
# touched).
RUN_OUTPUTS = (
    "checkpoint-*",
    "logs",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "config.json",
    "adapter_config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.*",
    "merges.txt",
    "*_results.json",
    "trainer_state.json",
    "README.md",
    "base_model_fingerprint.json",
    "exact_match_results.json",
    "pipeline_stage_done",
    RUN_FILE,
)


def previous_run(out: Path) -> str | None:
    """What of an earlier run the folder holds (checkpoints, a trained model or its results), or
    None."""
    if not out.is_dir():
        return None
    found = []
    n = sum(1 for p in out.glob("checkpoint-*") if p.is_dir())
    if n:
        found.append(f"{n} checkpoint{'s' if n > 1 else ''}")
    if (out / "config.json").is_file() or (out / "adapter_config.json").is_file():
        found.append("a trained model")
    elif (out / "train_results.json").is_file() or (out / "trainer_state.json").is_file():
        found.append("training results")
    return " and ".join(found) or None


# Settings a checkpoint's optimizer and scheduler state carry back (the optimizer's kind, its
# learning rate and weight decay; the scheduler's base rate): a resumed run continues with the
# checkpoint's, so another value given now would not act (refused, not ignored). The schedule's
# shape (--lr_scheduler_type, warmup, --max_steps) is rebuilt from the flags and does act.
RESTORED = ("learning_rate", "weight_decay", "optim")
SAME_OPTIMIZER = {"adamw_torch_fused": "adamw_torch"}  # one state; the default differs by torch


def run_identity(training_args, stage: str, model: str, data, method: str) -> dict:
    """What makes a checkpoint this run's: stage, start model, data, training method (full, or the
    adapter's shape) and the settings its optimizer and schedule restore."""
    return {
        "stage": stage,
        "model_name_or_path": _normal(model),
        "train_file_dir": _normal(data),
        "method": method,
        **{k: _setting(training_args, k) for k in RESTORED},
    }


def _setting(training_args, name: str):
    value = getattr(getattr(training_args, name), "value", getattr(training_args, name))
    return SAME_OPTIMIZER.get(value, value) if name == "optim" else value


def other_run(recorded: dict | None, identity: dict) -> str | None:
    """How a recorded run differs from this one, in words (None: the same run). Keys an older
    record lacks are not compared."""
    if recorded is None:
        return None
    diff = next((k for k in identity if k in recorded and recorded[k] != identity[k]), None)
    if diff is None:
        return None
    said = f"another {diff.replace('_', ' ')} ({recorded[diff]}, not {identity[diff]})"
    if diff in RESTORED:
        said += (
            f"; a resumed run continues with its optimizer and schedule, so --{diff} "
            f"{identity[diff]} would not act (give {recorded[diff]} to resume it)"
        )
    return said


def claim_output_dir(
    training_args, stage: str, model: str, data: str | list[str] | None, method: str = "full"
) -> None:
    """Check, before any work, that --output_dir is free for this run (or is this run's, when
    resuming).

    Reads only: a run that then fails on its data leaves the folder as it was. `take_output_dir`,
    called when training starts, removes an overwritten run's outputs and records this run."""
    out = Path(training_args.output_dir)
    identity = run_identity(training_args, stage, model, data, method)
    training_args.pipeline_identity = identity
    held = previous_run(out)
    resuming = str(training_args.resume_from_checkpoint or "").lower() not in (
        "",
        "no",
        "false",
        "none",
    )
    overwrite = getattr(training_args, "overwrite_output_dir", False)
    if held and not overwrite:
        recorded = recorded_run(out)
        if not resuming:
            raise UserError(
                f"--output_dir {out} holds another run ({held}); resume it with "
                "--resume_from_checkpoint auto, choose a new folder, or pass "
                "--overwrite_output_dir to start afresh there "
                "(its checkpoints and results are removed)."
            )
        if (out / "train_results.json").is_file() and last_complete_checkpoint(out) is None:
            raise UserError(
                f"--output_dir {out} holds a finished run and no checkpoint to resume from; "
                "its model is there already. To train again, pass --overwrite_output_dir or "
                "choose a new folder."
            )
        differs = other_run(recorded, identity)
        if differs:
            raise UserError(
                f"--output_dir {out} holds a run of {differs}, so its checkpoints are not this "
                "run's; choose a new folder, or pass --overwrite_output_dir to start afresh there."
            )
    training_args.pipeline_run = {"identity": identity, "overwrite": bool(held and overwrite)}


def take_output_dir(training_args) -> None:
    """At the start of training: remove the overwritten run's outputs (main process, after every
    rank has checked) and record this run in the folder. A no-op for a stage that did not claim its
    folder."""
    claim = getattr(training_args, "pipeline_run", None)
    if claim is None:
        return
    out = Path(training_args.output_dir)
    _barrier()
    if training_args.should_save:
        if claim["overwrite"]:
            removed = remove_run_outputs(out)
            logger.warning(
                "--overwrite_output_dir: removed %d entries of the earlier run in %s", removed, out
            )
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(claim["identity"], ensure_ascii=False) + "\n")
    _barrier()
    training_args.pipeline_run = None


def remove_run_outputs(out: Path) -> int:
    removed = 0
    for pattern in RUN_OUTPUTS:
        for path in out.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed += 1
    return removed


def _normal(path: str | list[str] | None) -> str:
    """A local path as an absolute one (the same folder spelled two ways is the same run); hub ids
    unchanged; a list of files (--train_file) as their paths joined by spaces."""
    if isinstance(path, list):
        return " ".join(_normal(p) for p in path)
    return str(Path(path).resolve()) if path and Path(path).exists() else str(path)


def recorded_run(out: Path) -> dict | None:
    try:
        return json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
