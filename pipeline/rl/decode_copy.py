"""A half-precision copy of a full-training policy for its rollouts.

Full training keeps float32 master weights and computes under bf16/fp16 autocast. Decoding from the
masters casts every weight to half precision at every generated token, and the compiled static-cache
decode does not take float32 weights under autocast (it wrote half-precision keys into a float32
cache on an H200). So rollouts decode from a copy whose parameters are the masters cast to the
autocast dtype (buffers such as the rotary frequencies stay as they are), refreshed in place before
each rollout: the copy keeps its memory addresses, so a decode step compiled once (a CUDA graph
reads fixed addresses) sees the updated weights. Cost: 2 bytes a parameter of GPU memory and one
cast of the weights per rollout.
"""

from __future__ import annotations

import copy

import torch


class HalfCopy:
    def __init__(self, master: torch.nn.Module, dtype: torch.dtype):
        # the parameters are copied cast (through deepcopy's memo); the rest of the module as
        # deepcopy does it
        memo = {
            id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
            for p in master.parameters()
        }
        self.model = copy.deepcopy(master, memo).eval()
        mine = dict(self.model.named_parameters())
        self.pairs = [(mine[name], p) for name, p in master.named_parameters()]

    @torch.no_grad()
    def refresh(self) -> torch.nn.Module:
        """The copy with the masters' current values (cast in place); returned for the rollout."""
        for half, master in self.pairs:
            half.copy_(master)
        return self.model
