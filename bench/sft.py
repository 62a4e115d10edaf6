"""SFT throughput and memory: this project's stage against TRL's SFTTrainer, same model shape, data and
global batch, one process each, in one run.

    python -m bench.sft --model_shape 1b --against trl --out bench/results     # on a GPU
    python -m bench.sft --smoke                                                # tiny shape on the CPU

The model is built from a config with random weights (no download) with the real vocabulary size (the
logits dominate memory); the tokenizer is the tiny BPE one (ids only). The data is a chat mix with a
long-tailed length distribution (median ~530 tokens, up to ~3.6k). Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B shapes, and a tiny one for the CPU smoke run
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=3000, tie_word_embeddings=False),
}


def build_model(shape: str, out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data.templates import chat_template_jinja
    from pipeline.model.tiny_model import REPO_DATA, corpus, train_tokenizer

    tokenizer = train_tokenizer(corpus(REPO_DATA), 3000)
    tokenizer.chat_template = chat_template_jinja("qwen")  # both tools train the same format
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(out)
    tokenizer.model_max_length = 8192
    tokenizer.save_pretrained(out)
    return out


def make_chats(n: int, median: int, cap: int, out: Path, seed: int = 0) -> list[int]:
    """ShareGPT chats whose token lengths follow a log-normal mix; returns the approximate lengths."""
    from pipeline.model.tiny_model import REPO_DATA, corpus

    words = " ".join(corpus(REPO_DATA)).split()
    rng = random.Random(seed)

    def text(tokens: int) -> str:  # about two tokens a word
        return " ".join(rng.choice(words) for _ in range(max(tokens // 2, 1)))

    lengths = []
    out.mkdir(parents=True, exist_ok=True)
    with (out / "chats.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(n):
            total = min(cap, max(16, int(rng.lognormvariate(math.log(median), 0.7))))
            q = max(4, int(total * rng.uniform(0.2, 0.6)))
            f.write(json.dumps({"conversations": [{"from": "human", "value": text(q)},
                                                  {"from": "gpt", "value": text(total - q)}]}) + "\n")
            lengths.append(total)
    return lengths


def run(name: str, command: list[str], results: Path) -> dict:
    start = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    (results / f"{command[3]}.log").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or line.startswith("error")]
        return {"run": name, "error": (errors or ["failed"])[-1][:300]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"run": name, "wall_s": round(time.monotonic() - start, 1), **out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--against", default="trl", choices=["trl", "none"])
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, few short samples, on the CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model_shape, args.samples, args.max_length = "tiny", 32, 256
    results = Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    work = results / "work"
    model = build_model(args.model_shape, work / f"model-{args.model_shape}")
    median = 60 if args.smoke else 534
    lengths = make_chats(args.samples, median, min(3600, args.max_length - 64), work / "data")
    common = [str(model), str(work / "data"), str(args.batch_size), str(args.max_length)]
    # packed rows of max_length tokens: this many per step hold about as many tokens as batch_size samples
    same_rows = max(1, round(args.batch_size * sum(lengths) / len(lengths) / args.max_length))
    same = [str(model), str(work / "data"), str(same_rows), str(args.max_length)]
    rows = [run("this project (defaults)", [sys.executable, "-m", "bench.run_one", "project", *common, str(work / "p")],
                results),
            run(f"this project, {same_rows} packed rows a step (about {args.batch_size} samples' tokens)",
                [sys.executable, "-m", "bench.run_one", "project-same", *same, str(work / "q")], results)]
    if args.against == "trl":
        rows.append(run("TRL SFTTrainer (defaults)", [sys.executable, "-m", "bench.run_one", "trl", *common,
                                                       str(work / "t")], results))
    table = ["| run | tokens/s | peak GPU memory (GiB) | optimizer steps | final loss | train s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        table.append(f"| {r['run']} | {r.get('tokens_per_s', r.get('error'))} | {r.get('peak_gib', '—')} | "
                     f"{r.get('steps', '—')} | {r.get('final_loss', '—')} | {r.get('train_s', '—')} |")
    summary = {"shape": args.model_shape, "samples": args.samples, "median_tokens": median, "max_length": args.max_length,
               "approx_tokens": sum(lengths), "batch_size": args.batch_size, "rows": rows}
    (results / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
