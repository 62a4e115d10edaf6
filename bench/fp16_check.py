"""fp16 on every stage, on one CUDA GPU: each stage trains a few steps with --fp16 True (float16
autocast and a loss scaler; LoRA over float16 weights loaded with --torch_dtype float16, or full
training on float32 masters), in its own process; the check records exit code, first/last loss
(finite?), steps/s, the dtype of the saved trained weights and, for PPO, the loss scale. One run
writes fp16-check.json, fp16-check.md and the stages' log tails (logs.txt) under --out. Not a test:
CI has no GPU (tests/test_fp16.py holds the CPU side).

    python -m bench.fp16_check --out results/  # on the GPU machine (about 5 minutes on one H200)
    python -m bench.fp16_check --out r/ --only ppo_lora_fp16,sft_lora_fp16
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
LORA16 = ["--use_peft", "True", "--torch_dtype", "float16", "--fp16", "True"]
FULL16 = ["--use_peft", "False", "--fp16", "True"]  # float32 master weights under float16 autocast


def runs(model: Path, work: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (stage, flags): the RM run comes before the PPO runs that read it."""
    common = [
        "--model_name_or_path",
        str(model),
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--seed",
        "0",
        "--logging_steps",
        "1",
        "--validation_split_percentage",
        "0",
        "--do_eval",
        "False",
    ]
    chat = [*common, "--template_name", "qwen", "--model_max_length", "256"]
    pairs = [
        *chat,
        "--train_file_dir",
        str(DATA / "reward"),
        "--per_device_train_batch_size",
        "8",
        "--max_steps",
        "20",
        "--learning_rate",
        "1e-4",
    ]
    sft = [
        *chat,
        "--train_file_dir",
        str(DATA / "sft"),
        "--per_device_train_batch_size",
        "8",
        "--max_steps",
        "20",
        "--learning_rate",
        "2e-4",
    ]
    rl = [
        *chat,
        "--train_file_dir",
        str(DATA / "sft"),
        "--max_new_tokens",
        "16",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-5",
    ]
    ppo = [*rl, "--reward_model_name_or_path", str(work / "rm_lora_fp16"), "--max_steps", "8"]
    group = [
        *rl,
        "--reward_funcs",
        "model,exact_match",
        "--reward_model_name_or_path",
        str(work / "rm_lora_fp16"),
        "--num_generations",
        "4",
        "--max_steps",
        "5",
    ]
    return {
        "rm_lora_fp16": ("rm", [*pairs, *LORA16]),
        "ppo_lora_fp16": ("ppo", [*ppo, *LORA16]),
        "sft_lora_fp16": ("sft", [*sft, *LORA16]),
        "dpo_lora_fp16": ("dpo", [*pairs, *LORA16]),
        "sft_full_fp16": ("sft", [*sft, *FULL16]),
        "dpo_full_fp16": ("dpo", [*pairs, *FULL16, "--max_steps", "10"]),
        "ppo_full_fp16": ("ppo", [*ppo, *FULL16, "--max_steps", "5"]),
        "grpo_lora_fp16": ("grpo", [*group, *LORA16, "--algorithm", "grpo"]),
        "rloo_lora_fp16": ("grpo", [*group, *LORA16, "--algorithm", "rloo"]),
        "kto_lora_fp16": ("dpo", [*pairs, *LORA16, "--loss_type", "kto", "--max_steps", "10"]),
        "simpo_lora_fp16": (
            "dpo",
            [*pairs, *LORA16, "--loss_type", "simpo", "--beta", "2.0", "--max_steps", "10"],
        ),
        "orpo_lora_fp16": ("dpo", [*pairs, *LORA16, "--loss_type", "orpo", "--max_steps", "10"]),
        "pt_lora_fp16": (
            "pt",
            [
                *common,
                "--train_file_dir",
                str(DATA / "pt"),
                "--block_size",
                "256",
                "--per_device_train_batch_size",
                "8",
                "--max_steps",
                "10",
                *LORA16,
            ],
        ),
        # the set-up of the seed's run_ppo.sh before the fix: float16 weights without --fp16
        # (refused now, at parse)
        "ppo_lora_float16_no_fp16": (
            "ppo",
            [*ppo, "--use_peft", "True", "--torch_dtype", "float16"],
        ),
    }


def history(out: Path) -> list[dict]:
    state = out / "trainer_state.json"
    return json.loads(state.read_text()).get("log_history", []) if state.is_file() else []


def trained_dtypes(out: Path) -> list[str]:
    """dtypes of the saved trained tensors (adapter, or the full model's)."""
    from safetensors import safe_open

    files = sorted(out.glob("adapter_model.safetensors")) or sorted(out.glob("model*.safetensors"))
    found = set()
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in list(f.keys())[:200]:
                found.add(str(f.get_slice(key).get_dtype()))
    return sorted(found)


def summarize(name: str, stage: str, out: Path, code: int, wall: float, log: str) -> dict:
    logs = history(out)
    losses = [h["loss"] for h in logs if "loss" in h]
    row = {
        "run": name,
        "stage": stage,
        "exit": code,
        "wall_s": round(wall, 1),
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "all_finite": bool(losses) and all(math.isfinite(v) for v in losses),
    }
    results = out / "train_results.json"
    metrics = json.loads(results.read_text()) if results.is_file() else {}
    if (
        "train_steps_per_second" in metrics
    ):  # Trainer stages: the whole train() call, first step included
        row["steps_per_s"] = metrics["train_steps_per_second"]
        row["peak_gpu_gib"] = metrics.get("peak_gpu_memory_gib")
    step_times = [h["time/step"] for h in logs if "time/step" in h][
        1:
    ]  # PPO: steps after the first (warm-up)
    if step_times:
        row["steps_per_s"] = round(len(step_times) / sum(step_times), 3)
        row["loss_scale"] = [h.get("loss_scale") for h in logs if "loss" in h]
    if code == 0:
        row["saved_dtypes"] = trained_dtypes(out)
    else:
        row["error"] = next(
            (line.strip() for line in reversed(log.splitlines()) if line.strip()), ""
        )[:300]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Folder for fp16-check.json/.md and logs.txt.")
    parser.add_argument("--work", default="/tmp/fp16-check", help="Models and stage outputs.")
    parser.add_argument(
        "--hidden_size", type=int, default=1024, help="Random-init Llama shape (tiny tokenizer)."
    )
    parser.add_argument("--num_layers", type=int, default=8)
    parser.add_argument("--only", default=None, help="Comma list of run names.")
    parser.add_argument("--timeout", type=int, default=150, help="Seconds per run.")
    args = parser.parse_args(argv)
    import torch

    from pipeline.model.tiny_model import build

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    model = work / f"llama-h{args.hidden_size}-l{args.num_layers}"
    if not (model / "config.json").is_file():
        build(model, hidden_size=args.hidden_size, num_layers=args.num_layers)
    info = json.loads((model / "tiny_model_info.json").read_text())
    header = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": f"random-init Llama, hidden {args.hidden_size}, {args.num_layers} "
        f"layers, {info['params']:,} parameters, vocab {info['vocab_size']}",
    }
    rows, wanted = [], set(args.only.split(",")) if args.only else None
    with open(out / "logs.txt", "w") as logs:
        for name, (stage, flags) in runs(model, work).items():
            if wanted and name not in wanted:
                continue
            target = work / name
            cmd = [
                sys.executable,
                f"stages/{stage}.py",
                *flags,
                "--output_dir",
                str(target),
                "--overwrite_output_dir",
                "True",
            ]
            start = time.perf_counter()
            try:
                done = subprocess.run(
                    cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout
                )
                code, log = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as e:
                code, log = 124, f"{e.stdout or ''}{e.stderr or ''}timed out"
            row = summarize(
                name,
                stage,
                target,
                code,
                time.perf_counter() - start,
                log if isinstance(log, str) else "",
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            logs.write(
                f"===== {name}: {' '.join(cmd)}\n{log[-6000:] if isinstance(log, str) else ''}\n"
            )
            logs.flush()
            (out / "fp16-check.json").write_text(json.dumps({**header, "runs": rows}, indent=2))
    table = [
        "| run | exit | steps | first loss | last loss | finite | steps/s | saved dtypes | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        note = r.get("error", "") or (
            f"loss scale {r['loss_scale'][0]:g} -> {r['loss_scale'][-1]:g}"
            if r.get("loss_scale") and r["loss_scale"][0]
            else ""
        )
        table.append(
            f"| {r['run']} | {r['exit']} | {r['steps']} | {r['first_loss']} | {r['last_loss']} | "
            f"{r['all_finite']} | {r.get('steps_per_s', '')} | "
            f"{', '.join(r.get('saved_dtypes', []))} | {note} |"
        )
    (out / "fp16-check.md").write_text(
        f"{header['date']}, {header['gpu']}, torch {header['torch']}, {header['model']}\n\n"
        + "\n".join(table)
        + "\n"
    )
    print("\n".join(table))


if __name__ == "__main__":
    main()
