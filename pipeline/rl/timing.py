"""Wall time of the phases of an RL step (generate, score, old/reference log-probs, update),
synchronized with the GPU so each phase is charged its own kernels; logged as time/<phase> with the
step's metrics."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self, samples: int) -> dict[str, float]:
        """time/<phase> seconds, time/step, and samples/s of this step on this rank."""
        total = sum(self.seconds.values())
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        return {**out, "time/step": total, "samples_per_second": samples / total if total else 0.0}
