"""User-facing errors: one clear sentence, no traceback (unless asked for).

Stages raise `UserError` for anything a user can cause (bad data, bad flag, missing file), chained
to the exception that revealed it (`raise UserError(...) from e`), and wrap `main` with `run_cli`,
which prints the sentence and exits with status 2. With PIPELINE_DEBUG=1 it prints the full
traceback, causes included, instead.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix; the message says where and how."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for quoting a library's error inside one
    sentence."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def debug_enabled() -> bool:
    return os.environ.get("PIPELINE_DEBUG", "").lower() not in ("", "0", "false", "no")


def run_cli(main: Callable[[], object]) -> None:
    try:
        main()
    except UserError as e:
        if debug_enabled():
            traceback.print_exc()
        # a run stopped mid-training leaves its bar's line open: the sentence gets its own
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    # only after success: a failed rank exits at once, its peers may be mid-collective
    _close_process_group()


def _close_progress_bars() -> None:
    tqdm = sys.modules.get("tqdm")  # never imported here either
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def _close_process_group() -> None:
    """Tear down the torchrun process group a stage opened, so NCCL shuts down cleanly before exit.
    The stage's objects (a Trainer and its DDP or DeepSpeed wrapper, which keep the group's backend
    alive) are collected first, while the interpreter is whole: left to interpreter shutdown, a Gloo
    worker thread still holding work of the backend can abort the process after a finished run
    ("terminate called without an active exception")."""
    dist = sys.modules.get(
        "torch.distributed"
    )  # never imported here: tools without torch use run_cli too
    if dist is not None and dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
