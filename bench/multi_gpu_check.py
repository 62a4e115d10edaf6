"""Checks of bench/multi_gpu.py on a finished run's output folder: it loads with from_pretrained
with no missing weight and no empty tensor, a LoRA output merges with merge_peft_adapter.py (and the
merge loads the same way), and two runs' weights are compared as a share of how far training moved
them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bench.sft import REPO


def load_complete(folder: Path, reward: bool) -> str:
    """'ok', or what is wrong with the saved model in `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model, info = cls.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    if info["missing_keys"]:
        return f"missing {len(info['missing_keys'])} weights, e.g. {info['missing_keys'][0]}"
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        return f"{len(empty)} empty tensors, e.g. {empty[0]}"
    return "ok"


def check_output(stage: str, mode: str, out: Path, base: Path, log: Path) -> dict:
    """The saved output of one matrix run: loads (full) or merges and loads (LoRA). `ok` says all is
    well."""
    reward = stage == "rm"
    if mode == "full":
        loads = load_complete(out, reward)
        return {"loads": loads, "ok": loads == "ok"}
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter_model.safetensors"))
    if not adapter or any(t.numel() == 0 for t in adapter.values()):
        return {"loads": "adapter has empty tensors", "ok": False}
    merged = out.with_name(out.name + "-merged")
    shutil.rmtree(merged, ignore_errors=True)
    proc = subprocess.run(
        [
            sys.executable,
            "merge_peft_adapter.py",
            "--base_model",
            str(base),
            "--lora_model",
            str(out),
            "--output_dir",
            str(merged),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"merged": f"merge failed ({proc.returncode})", "ok": False}
    loads = load_complete(merged, reward)
    if reward and loads == "ok":
        loads = (
            "ok, score head" if "score.weight" in "".join(merged_keys(merged)) else "no score head"
        )
    shutil.rmtree(merged, ignore_errors=True)
    return {"merged": loads, "ok": loads.startswith("ok")}


def merged_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys += list(f.keys())
    return keys


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(str(path)))
    return found


def weight_difference(a: Path, b: Path, start: Path) -> dict:
    """Largest |a - b| over all weights, and that as a share of the largest |b - start| (training's
    move)."""
    wa, wb, w0 = weights(a), weights(b), weights(start)
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wb)
    moved = max((wb[k].float() - w0[k].float()).abs().max().item() for k in wb if k in w0)
    share = diff / moved if moved else float("inf")
    return {
        "max_abs_diff": float(f"{diff:.3g}"),
        "share_of_update": float(f"{share:.3g}"),
        "ok": share < 0.05,
    }
