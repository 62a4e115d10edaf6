"""A diverged run is never saved as a model: one guard for every stage.

Each optimizer step's loss and gradient norm are checked. A non-finite one is logged as what it is
(never as 0: the Trainer's `logging_nan_inf_filter` is off), counted, and, where the optimizer
allows it, the step is skipped so the weights stay as they were. While non-finite steps follow each
other no checkpoint is written (those weights may hold NaN); after `--max_nonfinite_steps` of them
in a row the run stops with one sentence naming the step, the last finite loss and what to try,
exits non-zero and writes no final model; the checkpoints saved before stay resumable. Under fp16
loss scaling an overflowing gradient is the scaler's normal skipped step and is not counted (a
non-finite loss still is). A run that collapses to finite garbage (a gradient norm of exactly 0
under a non-zero loss, step after step) is stopped the same way.

`NonFiniteSteps` is the bookkeeping, shared by the Trainer stages (`DivergenceGuard`, a callback)
and the PPO loop (stages/ppo.py); `check_finite_weights` is the last check before any final model is
written.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from pipeline.errors import UserError
from pipeline.train.master_weights import MasterWeightsAdamW

logger = logging.getLogger(__name__)
ADVICE = (
    "start afresh (--overwrite_output_dir: a resumed run keeps its learning rate) with a lower "
    "--learning_rate, bf16 instead of fp16 (or float32), or gradient clipping (--max_grad_norm 1.0)"
)


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


class NonFiniteSteps:
    """Counts non-finite steps in a row; `record` raises the stopping UserError when there are too
    many."""

    def __init__(self, limit: int, what: str = "training", exact_norms: bool = True):
        self.limit, self.what, self.exact_norms = limit, what, exact_norms
        self.in_a_row = self.total = self.stalled = 0
        self.first_bad: int | None = None
        self.last_finite: tuple[int, float] | None = None  # (step, loss)

    def record(
        self, step: int, loss: float | None, grad_norm: float | None = None, note: str = ""
    ) -> bool:
        """Whether step `step` was finite (and could train). Raises UserError at the `limit`-th bad
        step in a row."""
        if finite(loss) and finite(grad_norm):
            self.in_a_row, self.first_bad = 0, None
            if loss is not None:
                self.last_finite = (step, loss)
            return self._stall(step, loss, grad_norm)
        self.in_a_row += 1
        self.total += 1
        self.first_bad = self.first_bad or step
        logger.warning(
            "step %d: %s loss %s, gradient norm %s: not finite "
            "(%d in a row; the run stops at %d)%s",
            step,
            self.what,
            _show(loss),
            _show(grad_norm),
            self.in_a_row,
            self.limit,
            note,
        )
        if self.in_a_row >= self.limit:
            raise UserError(self.sentence(step))
        return False

    def _stall(self, step: int, loss: float | None, grad_norm: float | None) -> bool:
        """A gradient of exactly zero under a loss that is not: the outputs no longer depend on the
        weights (a run that collapsed to finite garbage, or nothing trainable reaches the loss). Too
        many in a row stop the run. Only norms computed here count (exact_norms); DeepSpeed's may be
        a placeholder. False for such a step (its weights are not checkpointed either)."""
        if not (self.exact_norms and grad_norm == 0.0 and loss):
            self.stalled = 0
            return True
        self.stalled += 1
        logger.warning(
            "step %d: %s loss %.4g with a gradient norm of exactly 0 "
            "(%d in a row; the run stops at %d)",
            step,
            self.what,
            loss,
            self.stalled,
            self.limit,
        )
        if self.stalled >= self.limit:
            raise UserError(
                f"{self.what} cannot learn any more: the last {self.stalled} steps (to step "
                f"{step}) had a gradient norm of exactly 0 under a loss of {loss:.4g}, so the "
                "outputs no longer depend on the weights (a run that collapsed, or no trainable "
                f"weight reaches the loss); no model was saved; {ADVICE}."
            )
        return False

    def sentence(self, step: int) -> str:
        since = (
            f"steps {self.first_bad}-{step} were"
            if self.first_bad and self.first_bad != step
            else f"step {step} was"
        )
        last = (
            f"the last finite loss was {self.last_finite[1]:.4g} at step {self.last_finite[0]}"
            if self.last_finite
            else "no step had a finite loss"
        )
        return (
            f"{self.what} diverged: {since} not finite (loss or gradient norm NaN/inf; {last}), so "
            f"no model was saved and the checkpoints written before stay resumable; {ADVICE}, then "
            "rerun (with --resume_from_checkpoint auto to continue from the last checkpoint)."
        )


def worst(values: list[float | None]) -> float | None:
    """The largest of the known values, NaN when any is NaN (max() would depend on the order)."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    return math.nan if any(math.isnan(v) for v in known) else max(known)


def rank_max(values: list[float], device) -> list[float]:
    """Each value's largest over the ranks (every rank gets the same list)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def any_rank(flags: list[bool], device) -> list[bool]:
    """Each flag true on every rank when it is true on any rank (so all ranks stop, or skip a save,
    together)."""
    return [v > 0 for v in rank_max([float(f) for f in flags], device)]


def step_values(loss: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """A step as every rank must judge it, on the loss's device without a host read: [loss,
    gradient norm (0 when None), loss not finite, norm not finite, |loss| where finite], the last
    three the largest over the ranks."""
    loss = loss.detach().reshape(()).to(torch.float64)
    grad = loss.new_zeros(()) if grad is None else grad.detach().reshape(()).to(loss)
    finite_loss = torch.isfinite(loss)
    flags = torch.stack(
        [
            (~finite_loss).to(loss),
            (~torch.isfinite(grad)).to(loss),
            torch.where(finite_loss, loss.abs(), loss.new_zeros(())),
        ]
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return torch.cat([loss[None], grad[None], flags])


def judge(values: list[float], has_grad: bool) -> tuple[float, float | None]:
    """`step_values` read on the host: the step's loss and gradient norm, NaN where any rank's is
    not finite, and a rank whose own loss is exactly 0 takes the largest of the others' (the norm is
    global after the gradients' all-reduce, so "norm 0 under a non-zero loss" must not depend on
    which rank looks)."""
    loss, grad, bad_loss, bad_grad, size = values[:5]
    norm = grad if has_grad else None
    if bad_loss:
        loss = math.nan if math.isfinite(loss) else loss
    elif loss == 0.0:
        loss = size
    return loss, math.nan if bad_grad and finite(norm) else norm


def skips_on_device(optimizer) -> torch.optim.Optimizer | None:
    """The torch optimizer under `optimizer` (accelerate's wrapper, --master_weights' masters) that
    skips its whole update when its `found_inf` tensor is 1, on the GPU (fused Adam/AdamW, as
    under AMP's loss scaler), or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner = getattr(inner, "inner", inner) if isinstance(inner, MasterWeightsAdamW) else inner
    if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and all(
        group.get("fused") for group in inner.param_groups
    ):
        return inner
    return None


class Reading:
    """One step's `step_values`, copied to the host without waiting for the GPU to get there."""

    def __init__(self, step: int, values: torch.Tensor, has_grad: bool):
        self.step, self.has_grad = step, has_grad
        self.ready = None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = values

    def read(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()  # this step's values only, not the steps queued after it
        return self.host.tolist()


class DivergenceGuard(TrainerCallback):
    """The guard for a Trainer stage: per-step loss (from the Trainer's running sum) and gradient
    norm.

    Nothing here makes the host wait for the GPU at every step (a step that waits leaves the GPU
    idle while the host prepares the next one: the fixed cost of a small step): a fused AdamW skips
    a non-finite step itself on the GPU (its `found_inf`, as under AMP's loss scaler; other
    optimizers get their gradients dropped after a host read), and each step's loss and norm are
    read one step later, except where that step is saved, evaluated, stopped at or ends an epoch,
    where they are read before (a checkpoint is never of a non-finite step). So a run past
    --max_nonfinite_steps stops at most one step later than the step that reached it, which
    trained nothing (skipped) or left the weights finite."""

    def __init__(self, trainer, limit: int):
        self.trainer, self.steps = (
            trainer,
            NonFiniteSteps(limit, exact_norms=not trainer.is_deepspeed_enabled),
        )
        self._loss_before: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | float | None = None
        self._skipper: torch.optim.Optimizer | None = None
        self._pending: Reading | None = None
        self._last: tuple[int, bool] | None = None  # the step judged last, and whether it was fine
        self._trainable: tuple | None = None
        self._total_before = 0.0

    def _scaled(self) -> bool:
        """fp16 with a loss scaler: an overflowing gradient is its skipped step, not a
        divergence."""
        return bool(self.trainer.args.fp16)

    def _params(self) -> list[torch.Tensor]:
        """The trainable weights, listed once per model (not walked at every step)."""
        model = self.trainer.model
        if self._trainable is None or self._trainable[0] is not model:
            self._trainable = (model, [p for p in model.parameters() if p.requires_grad])
        return self._trainable[1]

    def on_step_begin(self, args, state, control, **kwargs):
        self._loss_before = self.trainer._tr_loss.detach().clone()
        self._grad_norm = None
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.is_deepspeed_enabled:  # the engine stepped already inside backward()
            norm = self.trainer.model_wrapped.get_global_grad_norm()
            self._grad_norm = None if norm is None else float(norm)
            return control
        params = self._params()
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return control
        norm = torch.nn.utils.get_total_norm(grads)
        self._skipper = None if self._scaled() else skips_on_device(self.trainer.optimizer)
        if self._skipper is not None:
            self._grad_norm = norm  # read with the step's loss, later
            self._skipper.found_inf = (~torch.isfinite(norm)).to(torch.float32)
            return control
        self._grad_norm = float(norm)
        if not finite(self._grad_norm) and not self._scaled():
            for p in params:  # the optimizer skips weights without a gradient: they stay finite
                p.grad = None
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._skipper is not None:
            self._skipper.__dict__.pop("found_inf", None)
            self._skipper = None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        loss = (self.trainer._tr_loss - self._loss_before).sum()
        norm = self._grad_norm
        if norm is not None and not torch.is_tensor(norm):
            norm = loss.new_full((), norm, dtype=torch.float64)
        shown = None if self._scaled() else norm
        values = step_values(loss, shown)
        own = torch.isfinite(norm).to(values)[None] if norm is not None else values.new_ones(1)
        reading = Reading(state.global_step, torch.cat([values, own]), shown is not None)
        previous, self._pending = self._pending, reading
        if previous is not None:
            self._check(previous)
        if control.should_save or control.should_training_stop or control.should_evaluate:
            # read now: a checkpoint of a non-finite step would hold what it did to the weights
            # (an evaluation may save, under save_strategy best, with no callback in between)
            self._check_pending()
            self._veto(state, control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self._check_pending()
        self._veto(state, control)
        return control

    def _veto(self, state, control) -> None:
        """No checkpoint of a step judged non-finite (or stalled), however its save was asked
        for (at its end, at the end of the epoch it ends, when training stops)."""
        if self._last == (state.global_step, False):
            control.should_save = False

    def was_skipped(self, step: int) -> bool:
        """Whether step `step` was judged non-finite (or stalled), so not checkpointed."""
        return self._last == (step, False)

    def on_train_end(self, args, state, control, **kwargs):
        self._check_pending()
        return control

    def _check_pending(self) -> None:
        """Judge the step not read yet, if any."""
        reading, self._pending = self._pending, None
        if reading is not None:
            self._check(reading)

    def _check(self, reading: Reading) -> None:
        values = reading.read()
        loss, grad = judge(values, reading.has_grad)
        self._last = (reading.step, False)  # stays so if record() stops the run
        ok = self.steps.record(reading.step, loss, grad, self._note(bool(values[5])))
        self._last = (reading.step, ok)

    def _note(self, own_norm_finite: bool) -> str:
        if self.trainer.is_deepspeed_enabled or own_norm_finite:
            return ""
        return (
            "; the loss scaler skipped this step"
            if self._scaled()
            else "; this optimizer step was skipped"
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        # the Trainer resets its running loss by subtracting it from itself, which leaves a NaN in
        # place: the window that held the non-finite step was logged as NaN, the next windows start
        # from 0 again
        if not torch.isfinite(self.trainer._tr_loss).all():
            self.trainer._tr_loss.zero_()
            self.trainer._total_loss_scalar = self._total_before
        self._total_before = self.trainer._total_loss_scalar
        return control


def nonfinite_weight(model, device=None) -> str | None:
    """The name of a trainable weight holding NaN/inf ("on another rank" when only another rank has
    one), or None; every rank takes part (ZeRO-3: each checks its shard)."""
    bad = None
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        data = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        if data.numel() and not torch.isfinite(data).all():
            bad = name
            break
    if any_rank([bad is not None], device or next(model.parameters()).device)[0]:
        return bad or "on another rank"
    return None


def check_finite_weights(model, device=None) -> None:
    """Refuse to write a model whose trainable weights hold NaN/inf."""
    bad = nonfinite_weight(model, device)
    if bad:
        raise UserError(
            f"the trained weights hold NaN/inf values ({bad}), so no model was saved; the run "
            f"diverged without a non-finite loss being seen; {ADVICE}."
        )
