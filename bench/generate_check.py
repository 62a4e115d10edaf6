"""Where a rollout's time goes: model.generate of the 1B shape (random weights, 128k vocabulary), 16
prompts of 512 tokens, 128 new tokens, sampled: eager with the dynamic cache, with LoRA (unmerged /
merged), and a static cache with the compiled decode step. Prints seconds per rollout and per new
token.

    python -m bench.generate_check
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from bench.sft import SHAPES


def timed(model, ids, mask, **extra) -> float:
    config = GenerationConfig(
        max_new_tokens=128,
        min_new_tokens=128,
        do_sample=True,
        top_k=0,
        temperature=1.0,
        pad_token_id=0,
        eos_token_id=1,
        **extra,
    )
    model.generate(
        input_ids=ids, attention_mask=mask, generation_config=config
    )  # warm-up (and compile)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    import pipeline  # noqa: F401  (before peft: its filters keep the libraries' known noise out of the output)

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES["1b"], max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(2, 128000, (16, 512), device="cuda")
    mask = torch.ones_like(ids)
    mask[:8, :200] = 0  # left padding of shorter prompts
    rows = [("eager, dynamic cache", timed(model, ids, mask))]
    profile = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    )
    with profile:
        timed(model, ids, mask)
    print(profile.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    rows.append(
        ("static cache, compiled decode", timed(model, ids, mask, cache_implementation="static"))
    )
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    rows.append(("LoRA r=8 all linear, unmerged", timed(lora, ids, mask)))
    lora.merge_adapter()
    rows.append(("LoRA merged", timed(lora, ids, mask)))
    lora.unmerge_adapter()
    print("| generate | s per rollout | ms per new token |\n| --- | --- | --- |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / 128 * 1000:.1f} |")


if __name__ == "__main__":
    main()
