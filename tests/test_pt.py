"""PT stage: learning, tensorboard output, LoRA + merge equivalence, vocab expansion, QLoRA,
resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import pt
from tests.helpers import DATA, REPO, read_scalars

COMMON = [
    "--block_size",
    "64",
    "--per_device_train_batch_size",
    "8",
    "--logging_steps",
    "5",
    "--save_steps",
    "1000",
    "--report_to",
    "tensorboard",
    "--seed",
    "0",
]


def run_pt(model: Path, out: Path, *extra: str) -> Path:
    pt.main(
        [
            "--model_name_or_path",
            str(model),
            "--train_file_dir",
            str(DATA / "pt"),
            "--validation_file_dir",
            str(DATA / "pt_eval"),
            "--output_dir",
            str(out),
            *COMMON,
            *extra,
        ]
    )
    return out


def logits(model, text_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=text_ids).logits


def sample_ids(tokenizer) -> torch.Tensor:
    return tokenizer(
        "The color of ka-bo is red. 蜜蜂通过跳舞来告诉同伴", return_tensors="pt"
    ).input_ids


@pytest.mark.slow
def test_full_pt_halves_loss_and_logs_tensorboard(tiny_model, tmp_path):
    out = run_pt(
        tiny_model,
        tmp_path / "pt",
        "--use_peft",
        "False",
        "--max_steps",
        "60",
        "--learning_rate",
        "3e-3",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "60",
    )
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] <= losses[0] / 2, losses
    assert read_scalars(out / "logs", "train/loss"), "no train/loss scalar in output_dir/logs"
    eval_results = json.loads((out / "eval_results.json").read_text())
    # the final evaluation sees the same model as the last in-training one (same masking, no cache)
    assert eval_results["eval_loss"] == pytest.approx(
        [h for h in history if "eval_loss" in h][-1]["eval_loss"]
    )
    assert eval_results["perplexity"] == pytest.approx(
        torch.tensor(eval_results["eval_loss"]).exp().item(), rel=1e-4
    )
    for name in ("model.safetensors", "tokenizer.json", "train_results.json", "config.json"):
        assert (out / name).is_file(), name
    assert AutoModelForCausalLM.from_pretrained(out).config.use_cache is True


@pytest.mark.slow
def test_lora_pt_then_merge_matches_adapter(tiny_model, tmp_path):
    out = run_pt(
        tiny_model,
        tmp_path / "lora",
        "--max_steps",
        "20",
        "--learning_rate",
        "1e-2",
        "--lora_rank",
        "8",
    )
    assert (out / "adapter_model.safetensors").is_file() and not (
        out / "model.safetensors"
    ).exists()
    merged_dir = tmp_path / "merged"
    subprocess.run(
        [
            sys.executable,
            "merge_peft_adapter.py",
            "--base_model",
            str(tiny_model),
            "--tokenizer_path",
            str(tiny_model),
            "--lora_model",
            str(out),
            "--output_dir",
            str(merged_dir),
        ],
        cwd=REPO,
        check=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = sample_ids(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_logits = logits(base, ids)
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), out
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert torch.allclose(logits(merged, ids), logits(adapter, ids), atol=1e-4)
    assert not torch.allclose(logits(merged, ids), base_logits, atol=1e-3)


@pytest.mark.slow
def test_vocab_expansion_trains_and_merges(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    new_words = ["跳舞", "蜜蜂", "lighthouse", "checksum"]
    assert tokenizer.add_tokens(new_words) == len(new_words)
    tok_dir = tmp_path / "bigger-tokenizer"
    tokenizer.save_pretrained(tok_dir)
    out = run_pt(
        tiny_model,
        tmp_path / "expanded",
        "--tokenizer_name_or_path",
        str(tok_dir),
        "--max_steps",
        "10",
        "--learning_rate",
        "1e-2",
        "--modules_to_save",
        "embed_tokens,lm_head",
    )
    merged_dir = tmp_path / "merged"
    subprocess.run(
        [
            sys.executable,
            "merge_peft_adapter.py",
            "--base_model",
            str(tiny_model),
            "--tokenizer_path",
            str(tok_dir),
            "--lora_model",
            str(out),
            "--output_dir",
            str(merged_dir),
        ],
        cwd=REPO,
        check=True,
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    merged_tok = AutoTokenizer.from_pretrained(merged_dir)
    assert len(merged_tok) == len(tokenizer) == merged.get_input_embeddings().weight.shape[0]
    ids = sample_ids(merged_tok)
    assert set(merged_tok.convert_tokens_to_ids(new_words)) & set(ids[0].tolist()), (
        "new tokens not used"
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base.resize_token_embeddings(len(tokenizer))
    new_id = merged_tok.convert_tokens_to_ids("跳舞")
    untrained_row = base.get_input_embeddings().weight[new_id].detach().clone()
    adapter = PeftModel.from_pretrained(base, out).eval()
    assert torch.allclose(logits(merged, ids), logits(adapter, ids), atol=1e-4)
    # the new token's embedding row was trained (the resize initialised it; training moved it)
    assert not torch.allclose(
        merged.get_input_embeddings().weight[new_id], untrained_row, atol=1e-4
    )


@pytest.mark.slow
def test_qlora_trains_and_quantized_base_is_refused(tiny_model, tmp_path):
    out = run_pt(tiny_model, tmp_path / "qlora", "--qlora", "True", "--max_steps", "3")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)
    quantized_base = tmp_path / "q4"
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model,
        quantization_config={"load_in_4bit": True, "quant_method": "bitsandbytes"},
        device_map={"": "cpu"},
    )
    model.save_pretrained(quantized_base)
    proc = subprocess.run(
        [
            sys.executable,
            "merge_peft_adapter.py",
            "--base_model",
            str(quantized_base),
            "--lora_model",
            str(out),
            "--output_dir",
            str(tmp_path / "m"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "is quantized" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_from_checkpoint_continues(tiny_model, tmp_path):
    out = tmp_path / "resume"
    run_pt(tiny_model, out, "--use_peft", "False", "--max_steps", "4", "--save_steps", "4")
    assert (out / "checkpoint-4").is_dir()
    run_pt(
        tiny_model,
        out,
        "--use_peft",
        "False",
        "--max_steps",
        "8",
        "--save_steps",
        "4",
        "--resume_from_checkpoint",
        "4",
    )
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    # the resumed run logged steps 5..8 only, so its first logged step comes after the checkpoint
    assert (out / "checkpoint-8").is_dir()


def test_sigterm_saves_a_checkpoint_stops_and_the_resumed_run_reaches_the_same_weights(
    tiny_model, tmp_path
):
    """Preemption: SIGTERM mid-training saves a complete checkpoint of the current step and exits
    143 with no final model; resuming with auto ends with exactly the weights of an uninterrupted
    run."""
    import signal
    import time

    from safetensors.torch import load_file

    flags = [
        "--model_name_or_path",
        str(tiny_model),
        "--train_file_dir",
        str(DATA / "pt"),
        *COMMON,
        "--use_peft",
        "False",
        "--max_steps",
        "60",
        "--save_steps",
        "1000",
        "--lr_scheduler_type",
        "constant",
        "--do_eval",
        "False",
        "--validation_split_percentage",
        "0",
    ]
    whole = tmp_path / "whole"
    pt.main([*flags, "--output_dir", str(whole)])
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "stages/pt.py", *flags, "--output_dir", str(cut), "--logging_steps", "1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until training has started, then preempt
        if "{'loss'" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output[-2000:]
    [checkpoint] = list(cut.glob("checkpoint-*"))
    step = int(checkpoint.name.split("-")[1])
    assert 0 < step < 60 and (checkpoint / "checkpoint_complete.json").is_file()
    assert not (cut / "model.safetensors").exists()  # no final model: the stage is not done
    pt.main([*flags, "--output_dir", str(cut), "--resume_from_checkpoint", "auto"])
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_sigterm_handler_is_given_back_after_training(tiny_model, tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    run_pt(
        tiny_model,
        tmp_path / "o",
        "--use_peft",
        "False",
        "--max_steps",
        "1",
        "--do_eval",
        "False",
        "--validation_split_percentage",
        "0",
    )
    assert signal.getsignal(signal.SIGTERM) is before
