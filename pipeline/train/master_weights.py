"""--master_weights: where the float32 copy of the weights lives in full training under bf16.

`model` keeps float32 weights in the model and computes under bf16 autocast: every forward (and
every recomputation under gradient checkpointing) casts each weight to bf16, and each backward adds
bf16 weight gradients into float32 ones (on an H200, 1B full SFT: ~11% of a step, bench/results).
With `optimizer` the model holds bf16 weights, so the matmuls read them directly and the gradients
stay bf16; `MasterWeightsAdamW` keeps a float32 copy of each weight, steps AdamW on it (the gradient
cast to float32, a chunk of weights at a time) and writes it back to the bf16 weight. The update
itself is the float32 one; what differs from `model` is that the forward sees the bf16-rounded
weights, which autocast also computes with (norm weights excepted), and that gradients summed over
micro-batches are summed in bf16. The masters are part of the optimizer's state, so checkpoints
resume them exactly.

The default, auto, takes `optimizer` wherever it applies with one micro-batch a step in one process
(no bf16 gradient summed over micro-batches or all-reduced between processes; measured side
by side on an H200, 1B full SFT: 1.21x the tokens/s at the same loss,
bench/results/h200-2026-12-05-sft) and `model` otherwise. A checkpoint saved under `model` resumes
under `optimizer` exactly (its float32 weights become the masters, its moments the inner AdamW's);
the other way is refused (its masters would be dropped).
"""

from __future__ import annotations

import os

import torch

from pipeline.errors import UserError

HYPER = ("lr", "weight_decay", "betas", "eps", "amsgrad", "maximize")


class MasterWeightsAdamW(torch.optim.Optimizer):
    """AdamW over float32 masters of half-precision weights. Its param_groups hold the model's
    weights (what the Trainer clips, zeroes and schedules); the masters and the moments live in an
    inner torch AdamW."""

    def __init__(self, param_groups: list[dict], defaults: dict):
        super().__init__(param_groups, defaults)
        master_groups = []
        for group in self.param_groups:
            masters = [p.detach().to(torch.float32).requires_grad_(True) for p in group["params"]]
            master_groups.append({**{k: group[k] for k in HYPER if k in group}, "params": masters})
        fused = all(p.is_cuda for g in master_groups for p in g["params"]) or None
        self.inner = torch.optim.AdamW(master_groups, fused=fused)

    @classmethod
    def replacing(cls, optimizer: torch.optim.Optimizer) -> MasterWeightsAdamW:
        """The same groups and hyperparameters as `optimizer` (a torch AdamW the Trainer built),
        with masters."""
        if not isinstance(optimizer, torch.optim.AdamW):
            raise UserError(
                f"--master_weights optimizer steps AdamW on float32 masters; --optim chose "
                f"{type(optimizer).__name__}: use --optim adamw_torch_fused (or adamw_torch)."
            )
        groups = [
            {k: v for k, v in g.items() if k in (*HYPER, "params")} for g in optimizer.param_groups
        ]
        return cls(groups, {k: optimizer.defaults[k] for k in HYPER if k in optimizer.defaults})

    # float32 gradient elements alive at once during a step (besides one weight larger than that):
    # casting every gradient first would hold a float32 copy of all of them (4.6 GiB on a 1B model,
    # measured as +3.5 GiB of peak on an H200) on top of the bf16 ones
    CHUNK_ELEMENTS = 2**26

    def _chunks(self):
        """Runs of (weight, master) pairs of at most CHUNK_ELEMENTS elements (one weight may be
        larger), with their inner group, group by group, in order."""
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            run: list[tuple[torch.Tensor, torch.Tensor]] = []
            size = 0
            for weight, master in zip(group["params"], inner["params"]):
                if weight.grad is None:
                    continue
                if run and size + weight.numel() > self.CHUNK_ELEMENTS:
                    yield run, inner
                    run, size = [], 0
                run.append((weight, master))
                size += weight.numel()
            if run:
                yield run, inner

    @torch.no_grad()
    def step(self, closure=None):
        """AdamW on the masters, a chunk of weights at a time: each chunk's gradients cast to
        float32, the inner AdamW stepped on that chunk alone (its groups narrowed to it for the
        call: AdamW's update of one weight never reads another's), the result rounded into the
        weights, the float32 gradients freed."""
        if closure is not None:
            raise UserError("--master_weights optimizer: closures are not supported.")
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update(
                {k: group[k] for k in HYPER if k in group}
            )  # the scheduler sets the outer groups' lr
        groups = self.inner.param_groups
        try:
            for run, inner in self._chunks():
                for weight, master in run:
                    master.grad = weight.grad.to(torch.float32)
                self.inner.param_groups = [{**inner, "params": [m for _, m in run]}]
                self.inner.step()
                for weight, master in run:
                    weight.copy_(master)  # rounded to the weight's dtype
                    master.grad = None
        finally:
            self.inner.param_groups = groups

    def masters(self) -> list[torch.Tensor]:
        return [m for g in self.inner.param_groups for m in g["params"]]

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "inner": self.inner.state_dict(),
            "masters": [m.detach() for m in self.masters()],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Our own state, or a plain AdamW's (a checkpoint saved under --master_weights model):
        its moments become the inner AdamW's, and the masters stay what they were made from, the
        float32 weights the Trainer loaded from that checkpoint before building the optimizer."""
        state_dict = dict(state_dict)
        inner, masters = state_dict.pop("inner", None), state_dict.pop("masters", None)
        if inner is None or masters is None:
            self.inner.load_state_dict(state_dict)
            super().load_state_dict({**state_dict, "state": {}})
            return
        super().load_state_dict(state_dict)
        self.inner.load_state_dict(inner)
        with torch.no_grad():
            for mine, saved in zip(self.masters(), masters):
                mine.copy_(saved)


def check_master_weights(model_args, peft_args, training_args) -> None:
    """--master_weights optimizer: full training under --bf16 without DeepSpeed, the weights loaded
    as bf16; refused elsewhere. auto (the default) becomes optimizer where it applies and a step is
    one micro-batch in one process (so no gradient is ever summed in bf16: the update equals the
    float32 one given the same forward), model otherwise."""
    mode = getattr(training_args, "master_weights", "model")
    if mode == "model":
        return
    problem = (
        "trains adapters (--use_peft True), whose frozen base is bf16 already"
        if peft_args.use_peft
        else "needs --bf16 True"
        if not training_args.bf16
        else "is DeepSpeed's own way (it keeps float32 masters under --deepspeed); drop one"
        if training_args.deepspeed
        else "loads the weights as bf16; drop --torch_dtype"
        if model_args.torch_dtype not in ("auto", "bfloat16")
        else "does not take quantized weights"
        if model_args.quantized
        else "keeps the float32 masters of the last step, not of the best checkpoint: drop "
        "--load_best_model_at_end"
        if training_args.load_best_model_at_end
        else None
    )
    if mode == "auto":
        # one micro-batch a step in one process: no bf16 gradient is summed (several micro-batches
        # would add into the bf16 .grad, several processes would all-reduce bf16 gradients)
        single = (
            training_args.gradient_accumulation_steps == 1
            and int(os.environ.get("WORLD_SIZE", "1")) == 1
        )
        training_args.master_weights = "optimizer" if problem is None and single else "model"
    elif problem:
        raise UserError(f"--master_weights optimizer {problem}.")
