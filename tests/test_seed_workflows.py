"""Each seed document's workflow as its reader types it (tests/seed_commands/ holds their command
lines), run end to end on the tiny model through the real entry points: the ChatGLM3 and GLM-4
demos' positional `DATA_DIR MODEL CONFIG [yes|STEP]` form with their nested configs, resume and
one-shot inference; the ChatGLM-6B article's P-Tuning command on AdvertiseGen records with
generation metrics; FastChat's Yuan2.0 LoRA command with its loss switches, then merge and chat.
(The staged README's chain is run_pipeline.sh, tested in test_pipeline.py.) Only what a CPU cannot
do is changed: few steps, no bf16/tf32."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DATA, REPO

pytestmark = pytest.mark.slow
SHORT = [
    "--max_steps",
    "2",
    "--save_steps",
    "1",
    "--eval_steps",
    "2",
    "--logging_steps",
    "1",
    "--per_device_train_batch_size",
    "1",
    "--per_device_eval_batch_size",
    "1",
    "--max_new_tokens",
    "4",
    "--report_to",
    "none",
]


def run(*argv, check=True) -> str:
    """The command's output (stdout and stderr together); it must succeed unless check is False."""
    proc = subprocess.run(
        [sys.executable, *map(str, argv)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout if check else (proc.returncode, proc.stdout)


def demo_folder(tmp_path: Path, source: Path) -> Path:
    """A demo data folder: train.json and dev.json side by side, as the demos' format_*.py scripts
    write them."""
    folder = tmp_path / "data"
    folder.mkdir()
    records = (
        json.loads(source.read_text())
        if source.suffix == ".json"
        else [json.loads(line) for line in source.read_text().splitlines()]
    )
    for name in ("train.json", "dev.json"):
        (folder / name).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        )
    return folder


def test_chatglm3_demo_lora_config_resume_and_inference(tiny_model, tmp_path):
    data, out = (
        demo_folder(tmp_path, DATA / "examples" / "sft" / "chatglm3_tools.json"),
        tmp_path / "out",
    )
    config = REPO / "configs" / "glm" / "lora.yaml"
    first = run(
        "stages/sft.py",
        data,
        tiny_model,
        config,
        "--output_dir",
        out,
        "--template_name",
        "chatglm3",
        *SHORT,
    )
    assert "lora.yaml is read as --model_name_or_path" in first and (out / "checkpoint-2").is_dir()
    assert "eval_rouge-1" in json.loads(
        (out / "eval_results.json").read_text()
    )  # predict_with_generate: true
    assert "test_bleu-4" in json.loads(
        (out / "predict_results.json").read_text()
    )  # test_file: dev.json
    resumed = run(
        "stages/sft.py",
        data,
        tiny_model,
        config,
        "yes",
        "--output_dir",
        out,
        "--template_name",
        "chatglm3",
        *SHORT[:-2],
        "--max_steps",
        "3",
        "--report_to",
        "none",
    )
    assert (
        "checkpoint-2" in resumed
        and json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    )
    answer = run("-m", "pipeline.chat", out, "--prompt", "你好", "--max_new_tokens", "4")
    assert answer.strip().splitlines()[-1].strip(), answer


def test_glm4_demo_ptuning_config_resumes_from_a_step(tiny_model, tmp_path):
    data, out = (
        demo_folder(tmp_path, DATA / "examples" / "sft" / "messages_tools.jsonl"),
        tmp_path / "out",
    )
    config = REPO / "configs" / "glm" / "ptuning_v2.yaml"
    run(
        "stages/sft.py",
        data,
        tiny_model,
        config,
        "--output_dir",
        out,
        "--template_name",
        "glm4",
        *SHORT,
    )
    state = json.loads((out / "trainer_state.json").read_text())
    assert (
        state["global_step"] == 2
        and json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    )
    shutil.rmtree(out / "checkpoint-2")
    resumed = run(
        "stages/sft.py",
        data,
        tiny_model,
        config,
        "1",
        "--output_dir",
        out,
        "--template_name",
        "glm4",
        *SHORT,
    )
    assert (
        "checkpoint-1" in resumed
        and json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    )
    code, said = run(
        "stages/sft.py",
        data,
        tiny_model,
        config,
        "7",
        "--output_dir",
        out,
        "--template_name",
        "glm4",
        *SHORT,
        check=False,
    )
    assert code != 0 and "checkpoint-7" in said


def test_chatglm6b_ptuning_on_advertisegen_with_generation_metrics(tiny_model, tmp_path):
    data = tmp_path / "AdvertiseGen"
    data.mkdir()
    pairs = [
        {"content": f"类型#裙*颜色#{c}", "summary": f"这条{c}的裙子很好看。"}
        for c in ("红色", "蓝色", "白色", "黑色")
    ]
    for name in ("train.json", "dev.json"):
        (data / name).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    out = tmp_path / "adgen-pt"
    run(
        "stages/sft.py",
        "--do_train",
        "--train_file",
        data / "train.json",
        "--validation_file",
        data / "dev.json",
        "--prompt_column",
        "content",
        "--response_column",
        "summary",
        "--overwrite_cache",
        "--model_name_or_path",
        tiny_model,
        "--output_dir",
        out,
        "--overwrite_output_dir",
        "--max_source_length",
        "64",
        "--max_target_length",
        "64",
        "--per_device_train_batch_size",
        "1",
        "--per_device_eval_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--predict_with_generate",
        "--max_steps",
        "2",
        "--logging_steps",
        "1",
        "--save_steps",
        "1000",
        "--learning_rate",
        "2e-2",
        "--pre_seq_len",
        "4",
        "--template_name",
        "chatglm3",
        "--max_new_tokens",
        "4",
        "--report_to",
        "none",
    )
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PREFIX_TUNING" and adapter["num_virtual_tokens"] == 4
    scores = json.loads((out / "eval_results.json").read_text())
    assert {"eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_bleu-4"} <= set(scores)
    predictions = [
        json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()
    ]
    assert sorted(p["label"] for p in predictions) == sorted(p["summary"] for p in pairs)


def test_fastchat_yuan2_lora_with_split_loss_then_merge_and_chat(tiny_model, tmp_path):
    data = tmp_path / "alpaca-data-conversation.json"
    data.write_bytes((DATA / "examples" / "sft" / "sharegpt_chat.jsonl").read_bytes())
    out, merged = tmp_path / "checkpoints_yuan2_lora", tmp_path / "merged"
    trained = run(
        "stages/sft.py",
        "--model_name_or_path",
        tiny_model,
        "--trust_remote_code",
        "True",
        "--data_path",
        data,
        "--output_dir",
        out,
        "--num_train_epochs",
        "1",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--evaluation_strategy",
        "no",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1200",
        "--learning_rate",
        "2e-5",
        "--weight_decay",
        "0.",
        "--warmup_ratio",
        "0.03",
        "--lr_scheduler_type",
        "cosine",
        "--logging_steps",
        "1",
        "--model_max_length",
        "256",
        "--gradient_checkpointing",
        "True",
        "--lazy_preprocess",
        "True",
        "--efficient_loss",
        "False",
        "--split_example_loss",
        "True",
        "--last_response_loss",
        "False",
        "--lora_r",
        "4",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
        "--q_lora",
        "False",
        "--template_name",
        "yuan2",
        "--report_to",
        "none",
    )
    assert (
        "--split_example_loss (as the seed documents spell it) True is read as "
        "--multi_turn_mode split" in trained
    )
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    run(
        "merge_peft_adapter.py",
        "--base_model",
        tiny_model,
        "--lora_model",
        out,
        "--output_dir",
        merged,
    )
    answer = run(
        "-m", "pipeline.chat", "--model", merged, "--prompt", "Hello", "--max_new_tokens", "4"
    )
    assert answer.strip().splitlines()[-1].strip(), answer
