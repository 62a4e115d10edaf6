"""SFT throughput and memory: this project's stage against TRL's SFTTrainer, same model shape, data
and global batch, one process each, in one run.

    python -m bench.sft --model_shape 1b --suite full \
        --out bench/results      # on a GPU: full SFT rows
    python -m bench.sft --model_shape 8b --suite lora \
        --batch_size 4 --max_length 2048   # LoRA, QLoRA
    python -m bench.sft --model_shape 1b --suite dpo \
        --batch_size 4 --max_length 2048    # DPO with LoRA
    python -m bench.sft --smoke [--suite ...] \
        # tiny shape on the CPU

The model is built from a config with random weights (no download) with the real vocabulary size
(the logits dominate memory); the tokenizer is the tiny BPE one (ids only), or with --tokenizer
llama3 Llama-3's own (bench/cache/llama3_tokenizer.json.gz, see bench/nan_guard.py) with its
official template, so that the token counts and lengths are those users see (figures on the two have
differed by 25%). The data is a chat mix with a long-tailed length distribution (median ~530 tokens,
up to ~3.6k), and preference pairs drawn the same way. Writes results-SUITE.json and
results-SUITE.md, and each run's log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B shapes, and a tiny one for the CPU smoke run
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=3000,
        tie_word_embeddings=False,
    ),
}


def build_model(shape: str, out: Path, tokenizer_kind: str = "tiny") -> Path:
    """A random-init Llama of `shape` with the tiny BPE tokenizer (qwen template) or Llama-3's
    (official template), saved to `out` (reused when already there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    if tokenizer_kind == "llama3":
        from bench.nan_guard import llama3_tokenizer

        tokenizer = llama3_tokenizer()
    else:
        from pipeline.data.templates import chat_template_jinja
        from pipeline.model.tiny_model import REPO_DATA, corpus, train_tokenizer

        tokenizer = train_tokenizer(corpus(REPO_DATA), 3000)
        tokenizer.chat_template = chat_template_jinja("qwen")  # both tools train the same format
    vocab = len(tokenizer) if tokenizer_kind == "llama3" else SHAPES[shape]["vocab_size"]
    config = LlamaConfig(
        **{**SHAPES[shape], "vocab_size": vocab},
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(
            torch.bfloat16 if torch.cuda.is_available() else torch.float32
        )
    model.save_pretrained(out)
    tokenizer.model_max_length = 8192
    tokenizer.save_pretrained(out)
    return out


def _text(rng: random.Random, words: list[str], tokens: int) -> str:  # about two tokens a word
    return " ".join(rng.choice(words) for _ in range(max(tokens // 2, 1)))


def make_chats(n: int, median: int, cap: int, out: Path, seed: int = 0) -> list[int]:
    """ShareGPT chats whose token lengths follow a log-normal mix; returns the approximate
    lengths."""
    from pipeline.model.tiny_model import REPO_DATA, corpus

    words = " ".join(corpus(REPO_DATA)).split()
    rng = random.Random(seed)
    lengths = []
    out.mkdir(parents=True, exist_ok=True)
    with (out / "chats.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(n):
            total = min(cap, max(16, int(rng.lognormvariate(math.log(median), 0.7))))
            q = max(4, int(total * rng.uniform(0.2, 0.6)))
            f.write(
                json.dumps(
                    {
                        "conversations": [
                            {"from": "human", "value": _text(rng, words, q)},
                            {"from": "gpt", "value": _text(rng, words, total - q)},
                        ]
                    }
                )
                + "\n"
            )
            lengths.append(total)
    return lengths


def make_pairs(n: int, median: int, cap: int, out: Path, seed: int = 0) -> None:
    """Preference pairs (question, chosen, rejected) with long-tailed lengths; each sequence <= cap
    tokens."""
    from pipeline.model.tiny_model import REPO_DATA, corpus

    words = " ".join(corpus(REPO_DATA)).split()
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(n):
            q = min(cap // 2, max(8, int(rng.lognormvariate(math.log(median * 0.4), 0.7))))
            answers = [
                min(cap - q - 32, max(4, int(rng.lognormvariate(math.log(median * 0.6), 0.7))))
                for _ in "cr"
            ]
            f.write(
                json.dumps(
                    {
                        "question": _text(rng, words, q),
                        "response_chosen": _text(rng, words, answers[0]),
                        "response_rejected": _text(rng, words, answers[1]),
                    }
                )
                + "\n"
            )


# (row name, tool, extra flags); rows of a suite run in this order, one process each. Rows with a
# GPU_ONLY flag are left out of the CPU smoke run: liger-kernel's Triton kernels, master weights
# (they need --bf16), compiled layers (they run on the CPU, tests/test_compiled_layers.py, but
# take minutes to compile there) and the checkpointing options (offload needs a GPU; both are
# tested in tests/test_checkpointing_options.py)
HALF_RECOMPUTED = '{"every_n_layers": 2}'
OFFLOADED = '{"offload": true}'
GPU_ONLY = (
    "--use_liger_kernel",
    "--master_weights",
    "--compile_layers",
    "--gradient_checkpointing_kwargs",
)
LIGER = ["--use_liger_kernel", "True"]
FULL = ["--use_peft", "False"]
LORA = ["--use_peft", "True", "--lora_rank", "8"]
LEAN = ["--gradient_checkpointing", "True", *LIGER]
SUITES = {
    "full": [
        ("this project, defaults", "project-sft", [*FULL]),
        (
            "this project, defaults, 1 packed row a step (TRL's tokens per step)",
            "project-sft",
            [*FULL, "--per_device_train_batch_size", "1"],
        ),
        (
            "this project, no gradient checkpointing",
            "project-sft",
            [*FULL, "--gradient_checkpointing", "False"],
        ),
        (
            "this project, gradient checkpointing",
            "project-sft",
            [*FULL, "--gradient_checkpointing", "True"],
        ),
        (
            "this project, liger kernels, no checkpointing",
            "project-sft",
            [*FULL, "--gradient_checkpointing", "False", *LIGER],
        ),
        (
            "this project, liger kernels + checkpointing",
            "project-sft",
            [*FULL, "--gradient_checkpointing", "True", *LIGER],
        ),
        (
            "this project, bf16 weights (TRL's precision), liger + checkpointing",
            "project-sft",
            [*FULL, "--torch_dtype", "bfloat16", "--gradient_checkpointing", "True", *LIGER],
        ),
        ("TRL SFTTrainer (defaults)", "trl-sft", []),
        (
            "this project, defaults but float32 weights in the model (--master_weights model)",
            "project-sft",
            [*FULL, "--master_weights", "model"],
        ),
        (
            "this project, defaults + compiled decoder layers (--compile_layers True)",
            "project-sft",
            [*FULL, "--compile_layers", "True"],
        ),
        (
            "this project, 1 packed row a step + compiled decoder layers",
            "project-sft",
            [*FULL, "--per_device_train_batch_size", "1", "--compile_layers", "True"],
        ),
        (
            "this project, 1 packed row a step, every 2nd layer recomputed",
            "project-sft",
            [
                *FULL,
                *("--per_device_train_batch_size", "1"),
                *("--gradient_checkpointing_kwargs", HALF_RECOMPUTED),
            ],
        ),
    ],
    "lora": [
        ("this project, LoRA r=8 all linear", "project-sft", [*LORA, *LEAN]),
        (
            "this project, QLoRA r=8 all linear",
            "project-sft",
            [*LORA, *LEAN, "--load_in_4bit", "True", "--qlora", "True"],
        ),
        ("TRL SFTTrainer (defaults), LoRA r=8 all linear", "trl-sft", ["lora_r=8"]),
        (
            "this project, LoRA r=8 all linear, activations offloaded to host memory",
            "project-sft",
            [*LORA, *LEAN, "--gradient_checkpointing_kwargs", OFFLOADED],
        ),
        (
            "this project, QLoRA r=8 all linear, activations offloaded to host memory",
            "project-sft",
            [
                *LORA,
                *LEAN,
                *("--load_in_4bit", "True", "--qlora", "True"),
                *("--gradient_checkpointing_kwargs", OFFLOADED),
            ],
        ),
    ],
    "dpo": [
        (
            "this project, DPO LoRA r=8 all linear",
            "project-dpo",
            ["--use_peft", "True", "--lora_rank", "8"],
        ),
        ("TRL DPOTrainer (defaults), LoRA r=8 all linear", "trl-dpo", ["lora_r=8"]),
        (
            "this project, DPO LoRA r=8 all linear + compiled decoder layers",
            "project-dpo",
            ["--use_peft", "True", "--lora_rank", "8", "--compile_layers", "True"],
        ),
        (
            "this project, DPO LoRA r=8 all linear + liger-kernel's layer kernels",
            "project-dpo",
            ["--use_peft", "True", "--lora_rank", "8", *LIGER],
        ),
    ],
}


def run(
    name: str,
    tool: str,
    args: list[str],
    extra: list[str],
    results: Path,
    index: int,
    profile: str | None,
) -> dict:
    start = time.monotonic()
    env = {
        **os.environ,
        **(
            {
                "BENCH_PROFILE": "1" if profile == "gpu" else profile,
                "BENCH_PROFILE_OUT": str(results / f"profile-run{index}.json"),
            }
            if profile
            else {}
        ),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_one", tool, *args, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    (results / f"run{index}-{tool}.log").write_text(
        " ".join(extra) + "\n" + proc.stdout[-20000:] + proc.stderr[-60000:]
    )
    if proc.returncode != 0:
        errors = [
            line for line in proc.stderr.splitlines() if "Error" in line or line.startswith("error")
        ]
        return {"run": name, "flags": extra, "error": (errors or ["failed"])[-1][:300]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"run": name, "flags": extra, "wall_s": round(time.monotonic() - start, 1), **out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument(
        "--suite",
        default="full",
        choices=sorted(SUITES),
        help="full: full-parameter SFT; lora: LoRA and QLoRA SFT; dpo: DPO with LoRA",
    )
    parser.add_argument("--against", default="trl", choices=["trl", "none"])
    parser.add_argument(
        "--rows", default=None, help="comma-separated row numbers of the suite to run (default all)"
    )
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument(
        "--profile",
        nargs="?",
        const="gpu",
        choices=("gpu", "host", "memory"),
        help="also profile the suite's first row: gpu (steps 4-6: GPU time by phase and host "
        "gaps), host (steps 4-13: the Python time by function, cProfile) or memory (what loading "
        "holds, and the allocations live at the peak of the first 2 steps by the code that made "
        "them)",
    )
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shape, few short samples, on the CPU"
    )
    parser.add_argument(
        "--tokenizer",
        default="tiny",
        choices=("tiny", "llama3"),
        help="the tiny BPE tokenizer (qwen template) or Llama-3's with its official template",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.model_shape, args.samples, args.max_length = "tiny", 32, 256
    results = Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    work = results / "work"
    model = build_model(
        args.model_shape, work / f"model-{args.model_shape}-{args.tokenizer}", args.tokenizer
    )
    if args.tokenizer == "llama3":
        os.environ["BENCH_TEMPLATE"] = (
            "auto"  # the model folder's own official template, for both tools
        )
    median = 60 if args.smoke else 534
    data = work / f"data-{args.tokenizer}"
    make_chats(args.samples, median, min(3600, args.max_length - 64), data / "sft")
    make_pairs(args.samples, median, args.max_length, data / "dpo")
    suite = SUITES[args.suite]
    chosen = [int(i) for i in args.rows.split(",")] if args.rows else range(len(suite))
    # row numbers are the suite's own, whatever is left out: TRL's rows under --against none, the
    # rows of GPU options in the CPU smoke run
    chosen = [
        i
        for i in chosen
        if not (args.against == "none" and suite[i][1].startswith("trl"))
        and not (args.smoke and any(flag in suite[i][2] for flag in GPU_ONLY))
    ]
    rows = []
    for i in chosen:
        name, tool, extra = suite[i]
        common = [
            str(model),
            str(data / tool.split("-")[1]),
            str(args.batch_size),
            str(args.max_length),
            str(work / f"out{i}"),
        ]
        rows.append(run(name, tool, common, extra, results, i, profile=None))
    if args.profile:
        name, tool, extra = suite[chosen[0]]
        common = [
            str(model),
            str(data / tool.split("-")[1]),
            str(args.batch_size),
            str(args.max_length),
            str(work / "profile"),
        ]
        run(
            name + " (profiled)",
            tool,
            common,
            [*extra, "--max_steps", {"gpu": "8", "host": "16", "memory": "3"}[args.profile]],
            results,
            99,
            profile=args.profile,
        )
    table = [
        "| run | tokens/s | after warm-up | peak GPU memory (GiB) | optimizer steps | final loss "
        "| train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        table.append(
            f"| {r['run']} | {r.get('tokens_per_s', r.get('error'))} | "
            f"{r.get('steady_tokens_per_s') or '—'} | {r.get('peak_gib', '—')} | "
            f"{r.get('steps', '—')} | {r.get('final_loss', '—')} | {r.get('train_s', '—')} |"
        )
    summary = {
        "shape": args.model_shape,
        "tokenizer": args.tokenizer,
        "suite": args.suite,
        "samples": args.samples,
        "median_tokens": median,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "rows": rows,
    }
    (results / f"results-{args.suite}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / f"results-{args.suite}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
