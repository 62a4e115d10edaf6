"""How the PPO loop updates its trainable pair (policy + value model): plain torch, or DeepSpeed
ZeRO-2/3.

`TorchUpdater`: one AdamW over both models' trainable weights, gradients averaged over the ranks
(distributed.py), clipped together, then the optimizer and scheduler step. Under --fp16 the trained
weights stay float32 and the loss is scaled by a GradScaler (float16 gradients underflow without
it); an overflowing step is the scaler's skipped step, as under the Trainer.

`DeepSpeedUpdater` (--deepspeed deepspeed_configs/zero2.json or zero3.json, the files every stage
uses): the pair is one DeepSpeed engine with the same AdamW as a client optimizer and the same
scheduler, so the update is the plain one, with ZeRO's sharding and bucketed reduction. The config's
optimizer/scheduler sections are not used (the loop's flags set them); its "auto" values are filled
from the loop's batch shape. Under ZeRO-3, generation gathers the policy's weights once per rollout
(not once per token), reference and reward copies are sharded inference engines, and saves gather
the full 16-bit weights.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import get_scheduler

from pipeline.errors import UserError
from pipeline.rl import distributed

logger = logging.getLogger(__name__)


def check_master_weights(pair: torch.nn.Module) -> None:
    """The plain loop's AdamW updates the trained weights themselves: they must be float32 (bfloat16
    under --bf16), never float16, which only a loss-scaled optimizer with float32 masters may update
    (args/checks.py check_precision refuses such flags; this guards the models as built)."""
    half = sorted(
        {
            name.split(".")[0].replace("_", " ")
            for name, p in pair.named_parameters()
            if p.requires_grad and p.dtype == torch.float16
        }
    )
    if half:
        raise UserError(
            f"the {' and '.join(half)} would train float16 weights without float32 masters; "
            "load them with --torch_dtype float32 (full training) or train adapters "
            "(--use_peft True) under --fp16 True."
        )


class PPOPair(torch.nn.Module):
    """Policy and value model under one module, so one optimizer (or one DeepSpeed engine) holds
    both."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model


def _adamw(params, t, fused: bool = False) -> torch.optim.AdamW:
    """fused: one kernel for the whole update of every weight on a CUDA device (the plain loop;
    DeepSpeed steps its own flat partitions with the default form)."""
    return torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        weight_decay=t.weight_decay,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        fused=fused or None,
    )


def _schedule(optimizer, t, updates: int):
    return get_scheduler(
        t.lr_scheduler_type,
        optimizer,
        num_warmup_steps=t.get_warmup_steps(updates),
        num_training_steps=updates,
        scheduler_specific_kwargs=t.lr_scheduler_kwargs or None,
    )


class TorchUpdater:
    sharded = False

    def __init__(self, pair: PPOPair, training_args, updates: int, accumulation: int):
        self.params = [p for p in pair.parameters() if p.requires_grad]
        check_master_weights(pair)
        self.optimizer = _adamw(
            self.params, training_args, fused=all(p.is_cuda for p in self.params)
        )
        self.scheduler = _schedule(self.optimizer, training_args, updates)
        self.scaler = (
            torch.amp.GradScaler(training_args.device.type) if training_args.fp16 else None
        )
        self.targs, self.accumulation, self.world = (
            training_args,
            accumulation,
            training_args.world_size,
        )
        self.skipped = 0  # steps the loss scaler skipped (overflow), for the log

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accumulation
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float | None:
        """After `accumulation` backward passes: average over ranks, unscale (fp16), clip, step,
        clear; return the gradient norm. A non-finite gradient is not applied (the weights stay
        finite; the loop counts the step); under fp16 that is the scaler's overflow skip, which
        lowers the scale and returns None (not a divergence)."""
        # averaged while still scaled (every rank has the same scale): all ranks then see the same
        # overflow
        distributed.average_gradients(self.params, self.world)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = (
            self.targs.max_grad_norm
            if self.targs.max_grad_norm and self.targs.max_grad_norm > 0
            else float("inf")
        )
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when the unscaled gradients hold inf/NaN
            self.scaler.update()
        elif math.isfinite(norm):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler and not math.isfinite(norm):
            self.skipped += 1
            logger.info(
                "fp16 loss scaler: gradient overflow, step skipped, scale now %g",
                self.scaler.get_scale(),
            )
            return None
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler else None

    def generation(self):
        return nullcontext()

    def state(self, folder: Path) -> dict:
        scaler = {"scaler": self.scaler.state_dict()} if self.scaler else {}
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **scaler,
        }

    def load(self, folder: Path, state: dict) -> None:
        if "optimizer" not in state:
            raise UserError(
                f"{folder} was saved under --deepspeed (its optimizer state is in "
                f"{folder}/deepspeed); resume it with the same --deepspeed config."
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if (
            self.scaler and "scaler" in state
        ):  # a checkpoint of an fp32/bf16 run starts the scale afresh
            self.scaler.load_state_dict(state["scaler"])

    def full_weights(self) -> dict | None:
        return None  # the modules hold their full weights

    def check_in_sync(self) -> None:
        distributed.check_in_sync(self.params, self.world)


def deepspeed_config(
    source, training_args, micro: int, accumulation: int, hidden_size: int
) -> dict:
    """The JSON config with its "auto" values set for the PPO loop (micro-batch, accumulation,
    clipping, bf16, bucket sizes); optimizer and scheduler sections dropped (the loop's AdamW and
    scheduler run)."""
    config = (
        json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else dict(source)
    )
    config = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
    config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro * accumulation * training_args.world_size,
        gradient_clipping=float(training_args.max_grad_norm or 0.0),
        zero_allow_untested_optimizer=True,
        zero_force_ds_cpu_optimizer=False,
    )
    config["bf16"] = {**config.get("bf16", {}), "enabled": bool(training_args.bf16)}
    config["fp16"] = {**config.get("fp16", {}), "enabled": False}
    zero = dict(config.get("zero_optimization", {}))
    sizes = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    config["zero_optimization"] = {
        k: (sizes[k] if v == "auto" and k in sizes else v) for k, v in zero.items()
    }
    left = [k for k, v in {**config, **config["zero_optimization"]}.items() if v == "auto"]
    if left:
        raise UserError(
            f"--deepspeed {source}: the PPO loop cannot fill the value(s) 'auto' of "
            f"{', '.join(left)}; give numbers there."
        )
    return config


class DeepSpeedUpdater:
    def __init__(
        self,
        pair: PPOPair,
        training_args,
        updates: int,
        micro: int,
        accumulation: int,
        hidden_size: int,
    ):
        import deepspeed

        self.config = deepspeed_config(
            training_args.deepspeed, training_args, micro, accumulation, hidden_size
        )
        self.sharded = self.config["zero_optimization"].get("stage", 0) == 3
        self.pair = pair
        optimizer = _adamw([p for p in pair.parameters() if p.requires_grad], training_args)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=pair,
            optimizer=optimizer,
            config=self.config,
            lr_scheduler=lambda opt: _schedule(opt, training_args, updates),
        )

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed scales by the accumulation and steps (clipped) at the accumulation boundary."""
        self.engine.backward(loss)
        self.engine.step()

    def step(self) -> float | None:
        """The step itself was taken by the engine at the boundary; its gradient norm (None when not
        known)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    loss_scale = None  # the PPO loop refuses --fp16 under --deepspeed (pipeline/args/rl_checks.py)

    @contextmanager
    def generation(self):
        """ZeRO-3: the policy's full weights gathered once for the whole rollout, the per-layer
        fetch hooks off."""
        if not self.sharded:
            yield
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(self.pair.policy.parameters())):
            remove_hooks(self.engine)
            try:
                yield
            finally:
                add_hooks(self.engine)

    def state(self, folder: Path) -> dict:
        """DeepSpeed's own checkpoint (weights, optimizer and scheduler, each rank its shard) in
        folder/deepspeed."""
        self.engine.save_checkpoint(str(folder), tag="deepspeed")
        return {}

    def load(self, folder: Path, state: dict) -> None:
        from pipeline.run.resume import universal_folder

        universal = universal_folder(
            folder / "deepspeed",
            self.engine.world_size,
            self.engine.train_batch_size(),
            self.engine.global_rank == 0,
        )
        if (
            universal is not None
        ):  # saved by another number of processes: DeepSpeed's any-count form
            self.engine._config.load_universal_checkpoint = True
        path, _ = self.engine.load_checkpoint(
            str(folder),
            tag=universal.name if universal else "deepspeed",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise UserError(
                f"{folder} holds no DeepSpeed checkpoint (folder deepspeed/); it was saved without "
                "--deepspeed: resume it without --deepspeed, or start a new run."
            )

    def full_weights(self) -> dict | None:
        """ZeRO-3: the full 16-bit state dict of the pair, gathered (every rank takes part; rank 0
        gets it)."""
        if not self.sharded:
            return None
        return self.engine._zero3_consolidated_16bit_state_dict()

    def check_in_sync(self) -> None:
        # DeepSpeed keeps one copy of the optimizer state per shard: the ranks cannot drift apart
        pass


def sharded_inference(model, config: dict):
    """A frozen model (reference, reward) as a ZeRO-3 inference engine: its weights stay sharded."""
    import deepspeed

    inference = {k: v for k, v in config.items() if k not in ("gradient_clipping",)}
    inference["zero_optimization"] = {
        **config["zero_optimization"],
        "offload_optimizer": {"device": "none"},
    }
    engine, *_ = deepspeed.initialize(model=model, config=inference)
    engine.module.eval()
    return engine.module
