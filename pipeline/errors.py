"""User-facing errors: one clear sentence, no traceback.

Stages raise `UserError` for anything a user can cause (bad data, bad flag, missing file) and wrap
`main` with `run_cli`, which prints the sentence and exits with status 2.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix; the message says where and how."""


def run_cli(main: Callable[[], object]) -> None:
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    _close_process_group()  # only after success: a failed rank exits at once, its peers may be mid-collective


def _close_process_group() -> None:
    """Tear down the torchrun process group a stage opened, so NCCL shuts down cleanly before exit."""
    dist = sys.modules.get("torch.distributed")  # never imported here: tools without torch use run_cli too
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
