"""One benchmark run in its own process (so peak memory is its own): this project's SFT stage, or TRL's
SFTTrainer with its defaults, on the same model folder and chats. Prints one JSON line of results.

    python -m bench.run_one project|trl MODEL DATA BATCH_SIZE MAX_LENGTH OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def token_count(model: str, data: str, max_length: int) -> int:
    """Tokens of every chat as the template renders it (what both tools train on), capped at max_length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    total = 0
    for line in (Path(data) / "chats.jsonl").read_text().splitlines():
        turns = json.loads(line)["conversations"]
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        total += min(max_length, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return total


def project(model: str, data: str, batch: int, max_length: int, out: str) -> dict:
    from stages import sft

    sft.main(["--model_name_or_path", model, "--train_file_dir", data, "--output_dir", out, "--template_name", "qwen",
              "--use_peft", "False", "--per_device_train_batch_size", str(batch), "--model_max_length", str(max_length),
              "--num_train_epochs", "1", "--learning_rate", "1e-5", "--report_to", "none", "--save_strategy", "no",
              "--validation_split_percentage", "0", "--do_eval", "False", "--logging_steps", "1"])
    results = json.loads((Path(out) / "train_results.json").read_text())
    history = json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]
    return {"train_s": results["train_runtime"], "peak_gib": results.get("peak_gpu_memory_gib"),
            "steps": json.loads((Path(out) / "trainer_state.json").read_text())["global_step"],
            "final_loss": next(h["loss"] for h in reversed(history) if "loss" in h)}


def trl(model: str, data: str, batch: int, max_length: int, out: str) -> dict:
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    def to_messages(record):
        roles = {"human": "user", "gpt": "assistant"}
        return {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]}

    dataset = load_dataset("json", data_files=str(Path(data) / "chats.jsonl"), split="train").map(
        to_messages, remove_columns=["conversations"])
    config = SFTConfig(output_dir=out, per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=1e-5,
                       max_length=max_length, report_to="none", save_strategy="no", logging_steps=1,
                       bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset)
    result = trainer.train()
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_s": result.metrics["train_runtime"], "peak_gib": peak, "steps": trainer.state.global_step,
            "final_loss": losses[-1]}


def main() -> None:
    tool, model, data, batch, max_length, out = sys.argv[1:7]
    result = {"project": project, "project-same": project, "trl": trl}[tool](model, data, int(batch), int(max_length), out)
    tokens = token_count(model, data, int(max_length))
    result.update(tokens=tokens, tokens_per_s=round(tokens / result["train_s"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
