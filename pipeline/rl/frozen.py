"""The frozen models an RL step reads from (the reference for the KL, the reward model for the
scores), in the two forms they take. `use()` gives the model to call, ready to be read:

    Separate(model)    weights of its own: full training's frozen copy of the start model, a merged
                       reward model
    AdapterOff(model)  a trained LoRA model read with its adapter switched off, so its base weights
                       serve twice with one copy in memory: the policy as its own reference, the
                       value model as the reward model it started from

A role the run does not have is None (no reference: a group algorithm without a KL term; no reward
model: rule rewards only); there is no other meaning of None.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pipeline.model.adapters import adapters_off


@dataclass
class Separate:
    model: torch.nn.Module

    @contextmanager
    def use(self) -> Iterator[torch.nn.Module]:
        yield self.model


@dataclass
class AdapterOff:
    model: torch.nn.Module  # a peft model

    @contextmanager
    def use(self) -> Iterator[torch.nn.Module]:
        # every adapter layer, the head's too (modules_to_save); plain LoRA read under no_grad
        # without peft's walk over the whole model (pipeline/model/adapters.py)
        with adapters_off(self.model):
            yield self.model


Frozen = Separate | AdapterOff


def own_weights(frozen: Frozen | None) -> torch.nn.Module | None:
    """The model a frozen role adds to the run (None when it reads weights another role already
    holds)."""
    return frozen.model if isinstance(frozen, Separate) else None
