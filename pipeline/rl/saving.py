"""Saving and resuming the PPO loop.

A checkpoint holds the policy (adapter or full), the value model, and the optimizer, scheduler and
KL state; it is written beside its final name and renamed when whole, so an interrupted save never
looks resumable, and a checkpoint being removed loses its COMPLETE mark first. Rollout sampling is
seeded by step, so no RNG state is needed for an exact resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from pipeline.errors import UserError
from pipeline.model.adapters import unwrap
from pipeline.run.checkpoints import COMPLETE, mark_complete


def part(weights: dict | None, prefix: str) -> dict | None:
    """The `prefix.` entries of a gathered PPOPair state dict (engine.py), without the prefix."""
    if weights is None:
        return None
    return {k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")}


def save_policy(policy, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """The policy with tokenizer, template and stop tokens: loadable by from_pretrained, mergeable.
    `state_dict`: its full weights when the live ones are sharded (ZeRO-3)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = unwrap(policy)
    base.config.use_cache = True  # the saved config is for inference
    policy.save_pretrained(folder, **({"state_dict": state_dict} if state_dict is not None else {}))
    base.config.use_cache = False
    base.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_state(folder: Path, step: int, max_steps: int, log_history: list[dict]) -> None:
    state = {"global_step": step, "max_steps": max_steps, "log_history": log_history}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))


def write_results(
    out: Path, results: dict, step: int, max_steps: int, log_history: list[dict]
) -> None:
    """The final folder's eval_results.json (if evaluated), trainer_state.json and
    train_results.json."""
    if results:
        (out / "eval_results.json").write_text(json.dumps(results, indent=2))
    write_state(out, step, max_steps, log_history)
    train = (
        {k: v for k, v in log_history[-1].items() if not k.startswith("eval")}
        if log_history
        else {}
    )
    (out / "train_results.json").write_text(json.dumps({"global_step": step, **train}, indent=2))


def partial_of(folder: Path) -> Path:
    return folder.with_name(f"tmp-{folder.name}")


def prepare_partial(folder: Path) -> Path:
    """An empty tmp-checkpoint-N beside checkpoint-N (what an interrupted save left is cleared)."""
    partial = partial_of(folder)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def save_checkpoint(
    folder: Path,
    policy,
    value_model,
    tokenizer,
    loop_state: dict,
    log_history: list[dict],
    max_steps: int,
    save_total_limit: int | None,
    weights: dict | None = None,
) -> None:
    """checkpoint-N: written into tmp-checkpoint-N (prepare_partial; DeepSpeed's shards may already
    be there), then renamed; older ones beyond save_total_limit removed. `weights`: gathered ZeRO-3
    weights."""
    partial = partial_of(folder)
    save_policy(policy, tokenizer, partial, part(weights, "policy"))
    write_state(partial, loop_state["step"], max_steps, log_history)
    if value_model is not None:  # PPO; the group-relative algorithms have none
        value_weights = part(weights, "value_model")
        value_model.save_pretrained(
            partial / "value_model", **({"state_dict": value_weights} if weights else {})
        )
    torch.save(loop_state, partial / "ppo_state.pt")
    mark_complete(partial, loop_state["step"])
    remove_checkpoint(folder)  # one of the same step, left by an earlier run
    partial.rename(folder)
    if save_total_limit:
        folders = sorted(
            folder.parent.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
        )
        for old in folders[:-save_total_limit]:
            remove_checkpoint(old)


def remove_checkpoint(folder: Path) -> None:
    """Unmark, then delete: a kill during the deletion leaves an incomplete checkpoint, never one
    that looks whole."""
    (folder / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(
    folder: Path, policy, value_model, weights: bool = True
) -> tuple[dict, list[dict]]:
    """Put the trained weights back (unless DeepSpeed's checkpoint does); return (loop state:
    optimizer, scheduler, kl_coef, step; log history)."""
    if weights:
        load_trainable(policy, folder)
        if value_model is not None:
            load_trainable(value_model, folder / "value_model")
    # read onto the CPU: the optimizer's load_state_dict moves its state to each parameter's device
    # (a rank's device under torchrun on CPU is "cpu:0", which torch.load cannot map to)
    state = torch.load(folder / "ppo_state.pt", map_location="cpu", weights_only=False)
    return state, json.loads((folder / "trainer_state.json").read_text())["log_history"]


def load_trainable(model, folder: Path) -> None:
    """Put a checkpoint's trained weights (adapter or full model) back into a live model; every
    weight of a full model must come back (tied weights, saved once, count as loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"checkpoint {folder} holds no safetensors weights; it cannot be resumed.")
    loaded, unexpected = set(), []
    for path in files:
        weights = load_file(str(path))
        if isinstance(model, PeftModel):
            unexpected += set_peft_model_state_dict(model, weights).unexpected_keys
        else:
            unexpected += model.load_state_dict(weights, strict=False).unexpected_keys
            loaded |= set(weights)
    if not isinstance(model, PeftModel):
        tensors = model.state_dict()
        loaded_ptrs = {tensors[k].data_ptr() for k in loaded if k in tensors}
        missing = [
            k for k, t in tensors.items() if k not in loaded and t.data_ptr() not in loaded_ptrs
        ]
        if missing:
            raise UserError(
                f"checkpoint {folder} lacks {len(missing)} weights of this model (e.g. "
                f"{missing[0]}); it was saved from another model."
            )
    if unexpected:
        raise UserError(
            f"checkpoint {folder} holds {len(unexpected)} weights this model has not (e.g. "
            f"{unexpected[0]}); it was saved from another model."
        )
