"""One benchmark run in its own process (so peak memory is its own): one of this project's stages, or the
TRL trainer it is compared with, on a model folder and a data folder. Prints one JSON line of results.

    python -m bench.run_one TOOL MODEL DATA BATCH_SIZE MAX_LENGTH OUTPUT_DIR [extra flags ...]

TOOL: project-sft | trl-sft | project-dpo | trl-dpo. Extra flags go to the project stage as they are; for
TRL they are `key=value` fields of its config (values parsed as JSON where they parse). BENCH_PROFILE=1
profiles training steps 4-6 and prints where the GPU time goes (by kernel) to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

# the tiny tokenizer trains the qwen format; BENCH_TEMPLATE=auto for a model folder with its own official template
COMMON = ["--num_train_epochs", "1", "--learning_rate", "1e-5", "--report_to", "none", "--save_strategy", "no",
          "--validation_split_percentage", "0", "--do_eval", "False", "--logging_steps", "1",
          "--template_name", os.environ.get("BENCH_TEMPLATE", "qwen")]


def chat_messages(record: dict) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]


def token_count(tool: str, model: str, data: str, max_length: int) -> int:
    """Tokens the step computes on, as the template renders them (what every tool trains on): each chat
    capped at max_length; for DPO, prompt + chosen and prompt + rejected of each pair."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)

    def n(messages, **kw) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))

    total = 0
    for line in (Path(data) / ("pairs.jsonl" if tool.endswith("dpo") else "chats.jsonl")).read_text().splitlines():
        record = json.loads(line)
        if tool.endswith("dpo"):
            prompt = [{"role": "user", "content": record["question"]}]
            total += sum(n(prompt + [{"role": "assistant", "content": record[k]}]) for k in ("response_chosen",
                                                                                               "response_rejected"))
        else:
            total += min(max_length, n(chat_messages(record)))
    return total


def profile_steps(trainer_class) -> None:
    """Profile training steps 4-6 (after warm-up) of every trainer of `trainer_class`."""
    from torch.profiler import ProfilerActivity, profile, schedule

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=schedule(wait=3, warmup=1, active=3))
    prof.start()
    original = trainer_class.training_step

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        prof.step()
        if prof.step_num == 8:
            prof.stop()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40), file=sys.stderr)
        return out

    trainer_class.training_step = step


def results_of(out: str) -> dict:
    results = json.loads((Path(out) / "train_results.json").read_text())
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return {"train_s": results["train_runtime"], "peak_gib": results.get("peak_gpu_memory_gib"),
            "steps": state["global_step"], "final_loss": next(h["loss"] for h in reversed(state["log_history"]) if "loss" in h)}


def project(stage: str, model: str, data: str, batch: int, max_length: int, out: str, extra: list[str]) -> dict:
    import importlib

    if os.environ.get("BENCH_PROFILE"):
        from transformers import Trainer

        profile_steps(Trainer)
    module = importlib.import_module(f"stages.{stage}")
    module.main(["--model_name_or_path", model, "--train_file_dir", data, "--output_dir", out,
                 "--per_device_train_batch_size", str(batch), "--model_max_length", str(max_length), *COMMON, *extra])
    return results_of(out)


def trl_config(extra: list[str]) -> dict:
    fields = {}
    for item in extra:
        key, _, value = item.partition("=")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return fields


def trl_run(stage: str, model: str, data: str, batch: int, max_length: int, out: str, extra: list[str]) -> dict:
    from datasets import load_dataset

    gpu = torch.cuda.is_available()
    common = dict(output_dir=out, per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=1e-5,
                  max_length=max_length, report_to="none", save_strategy="no", logging_steps=1, bf16=gpu, use_cpu=not gpu)
    fields = trl_config(extra)
    peft_config = None
    if fields.pop("lora_r", None):
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    if fields.pop("load_in_4bit", None):
        from transformers import BitsAndBytesConfig

        fields["model_init_kwargs"] = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), "dtype": torch.bfloat16}
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        dataset = load_dataset("json", data_files=str(Path(data) / "chats.jsonl"), split="train").map(
            lambda r: {"messages": chat_messages(r)}, remove_columns=["conversations"])
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, **fields), train_dataset=dataset, peft_config=peft_config)
    else:
        from trl import DPOConfig, DPOTrainer

        def to_pair(r):
            return {"prompt": [{"role": "user", "content": r["question"]}],
                    "chosen": [{"role": "assistant", "content": r["response_chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["response_rejected"]}]}

        dataset = load_dataset("json", data_files=str(Path(data) / "pairs.jsonl"), split="train").map(
            to_pair, remove_columns=["question", "response_chosen", "response_rejected"])
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, **fields), train_dataset=dataset, peft_config=peft_config)
    result = trainer.train()
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_s": result.metrics["train_runtime"], "peak_gib": peak, "steps": trainer.state.global_step,
            "final_loss": losses[-1]}


def main() -> None:
    tool, model, data, batch, max_length, out, *extra = sys.argv[1:]
    who, stage = tool.split("-")
    run = project if who == "project" else trl_run
    result = run(stage, model, data, int(batch), int(max_length), out, extra)
    tokens = token_count(tool, model, data, int(max_length))
    result.update(tokens=tokens, tokens_per_s=round(tokens / result["train_s"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
