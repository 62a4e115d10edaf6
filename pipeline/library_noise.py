"""Messages from the libraries underneath that read as errors but are known to be harmless here,
each silenced by one named filter (applied when `pipeline` is imported, before those libraries
load). Everything else they say still reaches the user.

  BNB_CPU_KERNEL   bitsandbytes, on a CPU with AVX512-BF16, asks the `kernels` package for a
                   hub-hosted 4-bit matmul when it is imported and warns when that fails (no
                   network, untrusted publisher); it then uses its own CPU kernel, so nothing is
                   lost. Any other bitsandbytes warning is kept.
  PEFT_CHECKPOINT  peft and trl call the model's `is_gradient_checkpointing`,
                   `gradient_checkpointing_enable` and `..._disable`, which transformers 5 renamed
                   to activation_checkpointing*; the FutureWarning names a library's internal call,
                   not anything the user typed. (The user's --gradient_checkpointing flag is read
                   under its new name in pipeline/args/training.py; the project's own calls use the
                   new names.)
"""

from __future__ import annotations

import logging
import warnings

BNB_CPU_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"
PEFT_CHECKPOINT = r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def silence() -> None:
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage(BNB_CPU_KERNEL))
    warnings.filterwarnings("ignore", message=PEFT_CHECKPOINT, category=FutureWarning)
