"""Every flag of the seed documents' command lines, extracted mechanically from their text
(tests/seed_commands/, copied from the seeds; SOURCES.md there) and parsed by the program that takes
it here: each one works, or is refused in one sentence that names what to use. A flag the table
below does not know fails the test, so a seed flag cannot go unchecked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

import merge_peft_adapter
from pipeline.errors import UserError
from pipeline.infer.cli import build_parser as chat_parser
from stages import sft
from tests.helpers import DATA

COMMANDS = Path(__file__).parent / "seed_commands"
FLAG = re.compile(r"(?<![A-Za-z0-9_-])--([a-z][a-z0-9_-]*)(?:[ =]((?!--)[^\s,，。;；()]+))?")
SCRIPTS = {
    "finetune_hf.py": "sft",
    "finetune.py": "sft",
    "main.py": "sft",
    "train_mem.py": "sft",
    "train_lora.py": "sft",
    "run_supervised_finetuning.py": "sft",
    "merge_peft_adapter.py": "merge",
    "inference_hf.py": "chat",
    "fastchat.serve.cli": "chat",
    "tensorboard": "tensorboard",
    "cover_alpaca2jsonl.py": "convert",
    "tokenize_dataset_rows.py": "tokenize",
}
PROSE = {"staged_readme.txt": "sft", "fastchat_yuan2.txt": "sft"}  # flags named in running text
# programs that are not this project's, and what stands for them here
NOT_OURS = {
    "tensorboard": "tensorboard itself, on the output_dir/logs folder every stage writes",
    "convert": "python -m pipeline.convert (Alpaca to conversations)",
    "tokenize": "nothing: the stages tokenize with the model's chat template",
}
# placeholders in the seeds' values -> what this test gives instead
SUBSTITUTE = {
    "$LR": "1e-2",
    "$PRE_SEQ_LEN": "8",
    "deepspeed_zero_stage2_config.json": "deepspeed_configs/zero2.json",
    "deepspeed_zero_stage3_config.json": "deepspeed_configs/zero3.json",
    "playground/zero2_ds_woloading.json": "deepspeed_configs/zero2.json",
    "${master_addr}": "10.0.0.1",
    "${node_rank}": "0",
    "XXXX": "29500",
}
NEEDS_VALUE = {
    "train_file_dir": str(DATA / "sft"),
    "validation_file_dir": str(DATA / "sft_eval"),
    "max_train_samples": "-1",
    "max_eval_samples": "50",
    "neft_alpha": "5",
    "resume_from_checkpoint": "auto",
    "dataset_name": "shibing624/medical",
    "peft_path": "ADAPTER",
    "lora_r": "16",
    "lora_target_modules": "q_proj,v_proj",
}

# flags the seeds give in pairs: the one-flag test adds the other
COMPANION = {
    "max_source_length": ["--max_target_length", "64"],
    "max_target_length": ["--max_source_length", "64"],
    "prompt_column": ["--response_column", "summary"],
    "response_column": ["--prompt_column", "content"],
    "predict_with_generate": ["--validation_file_dir", str(DATA / "sft_eval")],
}
# (flag, value as written or None) or flag -> "ok", or a pattern of the refusal
EXPECTED = {
    "base_model": "ok",
    "bf16": "ok",
    "data_path": "ok",
    "deepspeed": "ok",
    "do_train": "ok",
    "efficient_loss": "ok",
    "evaluation_strategy": "ok",
    "gradient_accumulation_steps": "ok",
    "gradient_checkpointing": "ok",
    "last_response_loss": "ok",
    "lazy_preprocess": "ok",
    "learning_rate": "ok",
    "load_in_4bit": "ok",
    "load_in_8bit": "ok",
    "logging_steps": "ok",
    "lora_model": "ok",
    "lora_rank": "ok",
    "lora_target_modules": "ok",
    "lora_r": "ok",
    "lr_scheduler_type": "ok",
    "master_addr": "ok",
    "master_port": "ok",
    "max_eval_samples": "ok",
    "max_steps": "ok",
    "max_train_samples": "ok",
    "model": "ok",
    "num-gpus": "ok",
    "model_max_length": "ok",
    "model_name_or_path": "ok",
    "modules_to_save": "ok",
    "neft_alpha": "ok",
    "nnodes": "ok",
    "node_rank": "ok",
    "nproc_per_node": "ok",
    "num_train_epochs": "ok",
    "optim": "ok",
    "output_dir": "ok",
    "overwrite_cache": "ok",
    "overwrite_output_dir": "ok",
    "peft_path": "ok",
    "per_device_eval_batch_size": "ok",
    "per_device_train_batch_size": "ok",
    "pre_seq_len": "ok",
    "prompt": "ok",
    "q_lora": "ok",
    "qlora": "ok",
    "remove_unused_columns": "ok",
    "resume_from_checkpoint": "ok",
    "rope_scaling": "ok",
    "save_steps": "ok",
    "save_strategy": "ok",
    "save_total_limit": "ok",
    "split_example_loss": "ok",
    "standalone": "ok",
    "target_modules": "ok",
    "tokenizer_path": "ok",
    "torch_dtype": "ok",
    "train_file": "ok",
    "train_file_dir": "ok",
    "trust_remote_code": "ok",
    "use_peft": "ok",
    "validation_file": "ok",
    "validation_file_dir": "ok",
    "warmup_ratio": "ok",
    "weight_decay": "ok",
    "prompt_column": "ok",
    "response_column": "ok",
    "predict_with_generate": "ok",
    "max_source_length": "ok",
    "max_target_length": "ok",
    # refused on this CPU-only machine, naming what to do (on a GPU they are "ok" and tested in the
    # device runs)
    "fp16": r"needs a CUDA GPU; drop it",
    "tf32": r"needs an NVIDIA GPU .*; drop it",
    "flash_attn": r"needs the flash-attn package.*or drop the flag",
    # no counterpart here: the refusal names the replacement
    "dataset_path": r"give the JSON lines file itself with --train_file",
    "dataset_name": r"give them with --train_file_dir",
    "shift_attn": r"use --rope_scaling linear",
    # the seed's values that do not fit the tiny model: the refusal says what fits
    ("model_type", "baichuan"): r"drop --model_type \(it is detected\)",
    ("template_name", "baichuan"): r"is unknown; choose one of: auto, ",
    ("template_name", "vicuna"): "ok",
}


def mentions() -> list[tuple[str, str, str, str | None]]:
    """(seed file, program, flag, value) for every flag in the copied seed text."""
    found = []
    for path in sorted(COMMANDS.glob("*.txt")):
        text = path.read_text(encoding="utf-8").replace("\\\n", " ").replace(" \\ ", " ")
        for line in text.splitlines():
            script = next((s for s in SCRIPTS if s in line), None)
            before, _, after = line.rpartition(script) if script else ("", "", line)
            for part, program in (
                (before, "torchrun" if "torchrun" in before else None),
                (after, SCRIPTS.get(script) or PROSE.get(path.name)),
            ):
                for m in FLAG.finditer(part):
                    if program is None:
                        raise AssertionError(
                            f"{path.name}: --{m.group(1)} belongs to no known program: {line!r}"
                        )
                    found.append(
                        (
                            path.name,
                            program,
                            m.group(1),
                            m.group(2).strip('"') if m.group(2) else None,
                        )
                    )
    return found


MENTIONS = mentions()


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter folder on the tiny model (untrained: only its files matter here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2)
    ).save_pretrained(folder)
    return folder


def _value(flag: str, value: str | None, adapter: Path) -> list[str]:
    value = value if value is not None else NEEDS_VALUE.get(flag)
    if value is None:
        return []
    for old, new in SUBSTITUTE.items():
        value = value.replace(old, new)
    return [str(adapter) if value == "ADAPTER" else value]


def _outcome(program: str, flag: str, value: str | None, tiny_model, adapter, tmp_path) -> str:
    if program == "sft":
        data = (
            []
            if flag in ("train_file", "data_path", "train_file_dir")
            else ["--train_file_dir", str(DATA / "sft")]
        )
        base = [
            "--model_name_or_path",
            str(tiny_model),
            *data,
            "--output_dir",
            str(tmp_path / "out"),
        ]
        argv = base + (
            []
            if flag in ("model_name_or_path", "output_dir")
            else [f"--{flag}", *_value(flag, value, adapter)]
        )
        argv += COMPANION.get(flag, [])
        try:
            sft.parse(argv)
        except UserError as e:
            return str(e)
        return "ok"
    if program == "torchrun":
        get_args_parser().parse_args([f"--{flag}", *_value(flag, value, adapter), "stages/sft.py"])
        return "ok"
    parser = merge_peft_adapter.build_parser() if program == "merge" else chat_parser()
    known = {a for action in parser._actions for a in action.option_strings}
    return "ok" if f"--{flag}" in known else "not a flag here"


def test_every_seed_flag_is_known_to_this_test():
    programs = {program for _, program, _, _ in MENTIONS}
    assert programs <= {"sft", "torchrun", "merge", "chat", *NOT_OURS}, programs
    unknown = {
        (p, f, v)
        for _, p, f, v in MENTIONS
        if p not in NOT_OURS and (f, v) not in EXPECTED and f not in EXPECTED
    }
    assert not unknown, f"seed flags with no expected outcome: {sorted(unknown)}"


@pytest.mark.parametrize(
    "seed, program, flag, value", [m for m in MENTIONS if m[1] not in NOT_OURS]
)
def test_each_seed_flag_works_or_is_refused_naming_the_replacement(
    seed, program, flag, value, tiny_model, tiny_adapter, tmp_path
):
    expected = EXPECTED.get((flag, value), EXPECTED.get(flag))
    got = _outcome(program, flag, value, tiny_model, tiny_adapter, tmp_path)
    if expected == "ok":
        assert got == "ok", f"{seed}: --{flag} {value or ''}: {got}"
    else:
        assert re.search(expected, got), f"{seed}: --{flag} {value or ''}: {got}"
        assert got.count(". ") == 0 and got.endswith("."), f"not one sentence: {got}"
