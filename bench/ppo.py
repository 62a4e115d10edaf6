"""RL throughput and memory: this project's loop (PPO LoRA/full/ZeRO-3; GRPO, DAPO, Dr. GRPO, \
GSPO, RLOO) against
trl's GRPOTrainer (stages/grpo.py --rl_engine trl), same policy shape, prompts, answers per step
and answer length, one process each, in one run.

    python -m bench.ppo --model_shape 1b --out bench/results      # on a GPU, the tiny tokenizer
    python -m bench.ppo --model_shape 1b --tokenizer llama3 --out bench/results \
                                                                  # Llama-3's tokenizer and template
    python -m bench.ppo --smoke                                   # tiny shape on the CPU

The policy and the reward model are built from a config with random weights and the real vocabulary
size; the prompts are the questions of the SFT bench's chat mix (kept when prompt + answer fit
--model_max_length). --tokenizer llama3: Llama-3's tokenizer.json
(bench/cache/llama3_tokenizer.json.gz, see bench/nan_guard.py), pad <|reserved_special_token_0|>,
the official Llama-3.x template (--template_name auto). Each row reports samples/s (answers
generated and trained per second, after the first step, which compiles), peak GPU memory, the median
seconds of each phase of a step from trainer_state.json, the final score and whether every step was
finite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.sft import REPO, SHAPES, build_model, make_chats

PHASES = ("generate", "score", "logprobs", "update")


def build_reward_model(policy: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(policy)
    config.num_labels = 1
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config).to(
        torch.bfloat16 if torch.cuda.is_available() else torch.float32
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return out


def rows(smoke: bool) -> list[tuple[str, str, list[str]]]:
    gpu = [] if smoke else ["--bf16", "True"]
    zero3 = ["--deepspeed", "deepspeed_configs/zero3.json"]

    def group(algorithm: str, engine: str = "own") -> list[str]:
        return [
            "--algorithm",
            algorithm,
            "--rl_engine",
            engine,
            "--reward_funcs",
            "model",
            "--use_peft",
            "True",
            "--num_generations",
            "4",
            *gpu,
        ]

    return [
        ("this project, PPO LoRA r=8", "ppo", ["--use_peft", "True", *gpu]),  # 0
        ("this project, PPO full", "ppo", ["--use_peft", "False", *gpu]),  # 1
        (
            "this project, PPO full, DeepSpeed ZeRO-3",
            "ppo",
            ["--use_peft", "False", *gpu, *zero3],
        ),  # 2
        ("trl GRPOTrainer, LoRA r=8, 4 answers a prompt", "grpo", group("grpo", "trl")),  # 3
        ("this project, GRPO LoRA r=8, 4 answers a prompt", "grpo", group("grpo")),  # 4
        ("this project, DAPO LoRA r=8", "grpo", group("dapo")),  # 5
        ("this project, Dr. GRPO LoRA r=8", "grpo", group("dr_grpo")),  # 6
        ("this project, GSPO LoRA r=8", "grpo", group("gspo")),  # 7
        ("this project, RLOO LoRA r=8", "grpo", group("rloo")),  # 8
        ("trl RLOOTrainer, LoRA r=8", "grpo", group("rloo", "trl")),
    ]  # 9


def build_llama3(shape: str, work: Path) -> tuple[Path, Path]:
    """The policy with Llama-3's tokenizer and official template, and a same-shape reward model
    (fresh score head)."""
    policy = build_model(shape, work / f"policy-{shape}-llama3", "llama3")
    reward = work / f"reward-{shape}-llama3"
    if not (reward / "config.json").is_file():
        build_reward_model(policy, reward)
    return policy, reward


def one(stage: str, flags: list[str]) -> dict:
    """Run one stage in this process; its figures as a dict."""
    import importlib

    import torch

    module = importlib.import_module(f"stages.{stage}")
    start = time.monotonic()
    module.main(flags)
    wall = time.monotonic() - start
    out = Path(flags[flags.index("--output_dir") + 1])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "time/step" in h or "step_time" in h]
    later = steps[1:] or steps  # the first step compiles kernels and warms the caches
    row = {
        "steps": len(steps),
        "wall_s": round(wall, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)
        if torch.cuda.is_available()
        else None,
        "all_finite": all(
            math.isfinite(h.get("loss", 0.0)) and math.isfinite(h.get("grad_norm", 0.0))
            for h in steps
        ),
    }
    if "time/step" in steps[0]:  # the project's loop
        per_step = statistics.median(h["time/step"] for h in later)
        row.update(
            {f"{p}_s": round(statistics.median(h[f"time/{p}"] for h in later), 2) for p in PHASES}
        )
        row["final_score"] = round(steps[-1]["objective/scores"], 4)
    else:
        per_step = statistics.median(h["step_time"] for h in later)
        row["final_score"] = round(steps[-1]["reward"], 4)
    batch = int(flags[flags.index("--per_device_train_batch_size") + 1])
    row.update(step_s=round(per_step, 2), samples_per_s=round(batch / per_step, 2))
    loadable = (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
    row["saved_loadable"] = loadable
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument(
        "--batch_size", type=int, default=16, help="answers generated and trained per step"
    )
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument(
        "--tokenizer",
        default="tiny",
        choices=("tiny", "llama3"),
        help="the bench's tiny BPE tokenizer (qwen template) or Llama-3's with its official "
        "template",
    )
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (default all)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shape, 2 steps of 4 short answers, on the CPU"
    )
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1:])))
        return
    if args.smoke:
        args.model_shape, args.batch_size, args.max_new_tokens, args.max_steps = "tiny", 4, 8, 2
    results = Path(args.out)
    work = results / "work-ppo"
    if args.tokenizer == "llama3":
        policy, reward = build_llama3(args.model_shape, work)
    else:
        policy = build_model(args.model_shape, work / f"policy-{args.model_shape}")
        reward = build_reward_model(policy, work / f"reward-{args.model_shape}")
    make_chats(64 if args.smoke else 400, 60 if args.smoke else 534, 3600, work / "data")
    max_length = 256 if args.smoke else 1024
    table = [
        "| run | samples/s | s/step | "
        + " | ".join(f"{p} s" for p in PHASES)
        + " | peak GPU GiB | final score | "
        "all finite | saved |",
        "| --- | --- | --- | " + " | ".join("---" for _ in PHASES) + " | --- | --- | --- | --- |",
    ]
    out_rows = []
    suite = rows(args.smoke)
    for i in [int(r) for r in args.rows.split(",")] if args.rows else range(len(suite)):
        name, stage, extra = suite[i]
        flags = [
            "--model_name_or_path",
            str(policy),
            "--reward_model_name_or_path",
            str(reward),
            "--train_file_dir",
            str(work / "data"),
            "--output_dir",
            str(work / f"out{i}"),
            "--template_name",
            "auto" if args.tokenizer == "llama3" else "qwen",
            "--model_max_length",
            str(max_length),
            "--max_new_tokens",
            str(args.max_new_tokens),
            "--per_device_train_batch_size",
            str(args.batch_size),
            "--max_steps",
            str(args.max_steps),
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--learning_rate",
            "1e-6",
            "--seed",
            "0",
            *extra,
        ]
        env = {**os.environ, "NPROC_PER_NODE": "1"}
        command = (
            ["bash", "scripts/torchrun.sh", "-m", "bench.ppo", "--one", stage, *flags]
            if "--deepspeed" in extra
            else [sys.executable, "-m", "bench.ppo", "--one", stage, *flags]
        )
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
        (results / f"ppo-run{i}.log").write_text(
            " ".join(command) + "\n" + proc.stdout[-20000:] + proc.stderr[-40000:]
        )
        last = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
        row = {
            "run": name,
            "flags": extra,
            **(json.loads(last[0]) if last else {"error": proc.stderr[-300:]}),
        }
        out_rows.append(row)
        table.append(
            f"| {name} | {row.get('samples_per_s', row.get('error', '')[:80])} | "
            f"{row.get('step_s', '—')} | "
            + " | ".join(str(row.get(f"{p}_s", "—")) for p in PHASES)
            + f" | {row.get('peak_gib', '—')} | {row.get('final_score', '—')} | "
            f"{row.get('all_finite', '—')} | {row.get('saved_loadable', '—')} |"
        )
    summary = {
        "shape": args.model_shape,
        "tokenizer": args.tokenizer,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "max_length": max_length,
        "rows": out_rows,
    }
    name = "results-ppo" + ("-llama3" if args.tokenizer == "llama3" else "")
    (results / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
