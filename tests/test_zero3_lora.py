"""LoRA under DeepSpeed ZeRO-3 for PT and SFT (real torchrun, DeepSpeed and peft; two gloo processes
on CPU, through the run_*.sh launchers): training runs with and without gradient checkpointing,
takes the same steps as plain data-parallel training, saves an adapter that merge_peft_adapter.py
merges, and the merged model's logits are the base+adapter model's. Before the fix every run stopped
at the first backward pass with a CheckpointError: the chunked loss's recomputation met the frozen
output head already re-partitioned by ZeRO-3 (pipeline/train/losses.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import DATA, REPO, lora_b_norms

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ZERO3 = ["--deepspeed", "deepspeed_configs/zero3.json"]


def launch(script: str, flags: list[str]) -> None:
    env = {**os.environ, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", script, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def steps(out) -> list[tuple[float, float]]:
    """(loss, grad_norm) of every logged step."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(h["loss"], h["grad_norm"]) for h in history if "loss" in h]


def assert_same_steps(a, b, out_a, out_b):
    assert len(steps(out_a)) == 3 and len(steps(out_b)) == 3
    for (loss_a, norm_a), (loss_b, norm_b) in zip(steps(out_a), steps(out_b)):
        assert loss_a == pytest.approx(loss_b, rel=1e-4), (a, b)
        assert norm_a == pytest.approx(norm_b, rel=1e-3), (a, b)


def assert_same_adapter(out_a, out_b, tolerance=1e-5):
    a, b = (
        load_file(out_a / "adapter_model.safetensors"),
        load_file(out_b / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < tolerance


def assert_merge_keeps_logits(base, adapter, merged):
    """merge_peft_adapter.py's model computes the logits of peft's base+adapter model, which differ
    from the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = subprocess.run(
        [
            sys.executable,
            "merge_peft_adapter.py",
            "--base_model",
            str(base),
            "--lora_model",
            str(adapter),
            "--output_dir",
            str(merged),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    ids = torch.tensor([[1, 17, 230, 45, 999, 12, 7, 300, 2999, 64]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        base_logits = plain(ids).logits
        with_adapter = PeftModel.from_pretrained(plain, str(adapter)).eval()(ids).logits
        merged_logits = (
            AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits
        )
    assert (
        with_adapter - base_logits
    ).abs().max() > 1e-3  # the adapter changes the model: the comparison means something
    assert torch.allclose(merged_logits, with_adapter, atol=1e-5, rtol=0)


def test_pt_lora_under_zero3_trains_with_and_without_checkpointing_and_merges(tiny_model, tmp_path):
    def pt(out, *extra):
        launch(
            "run_pt.sh",
            [
                "--model_name_or_path",
                str(tiny_model),
                "--train_file_dir",
                str(DATA / "pt"),
                "--output_dir",
                str(out),
                "--block_size",
                "64",
                "--max_steps",
                "3",
                "--use_peft",
                "True",
                "--learning_rate",
                "5e-3",
                "--per_device_train_batch_size",
                "2",
                "--logging_steps",
                "1",
                "--report_to",
                "none",
                "--do_eval",
                "False",
                "--save_strategy",
                "no",
                "--seed",
                "0",
                *extra,
            ],
        )
        return out

    checkpointed = pt(tmp_path / "z3-gc", *ZERO3, "--gradient_checkpointing", "True")
    plain = pt(tmp_path / "z3", *ZERO3, "--gradient_checkpointing", "False")
    ddp = pt(tmp_path / "ddp", "--gradient_checkpointing", "False")
    assert_same_steps("zero3", "ddp", plain, ddp)
    assert_same_steps("zero3 + checkpointing", "zero3", checkpointed, plain)
    assert_same_adapter(checkpointed, plain)
    assert min(lora_b_norms(checkpointed / "adapter_model.safetensors")) > 0
    assert_merge_keeps_logits(tiny_model, checkpointed, tmp_path / "merged")


def test_sft_lora_under_zero3_trains_with_and_without_checkpointing_and_merges(
    tiny_model, tmp_path
):
    def sft(out, *extra):
        # --loss_chunk_size 16: several output-head chunks a step, each recomputed in the backward
        # pass
        launch(
            "run_sft.sh",
            [
                "--model_name_or_path",
                str(tiny_model),
                "--template_name",
                "qwen",
                "--train_file_dir",
                str(DATA / "sft"),
                "--validation_split_percentage",
                "0",
                "--output_dir",
                str(out),
                "--model_max_length",
                "128",
                "--max_steps",
                "3",
                "--use_peft",
                "True",
                "--learning_rate",
                "5e-3",
                "--per_device_train_batch_size",
                "2",
                "--loss_chunk_size",
                "16",
                "--logging_steps",
                "1",
                "--report_to",
                "none",
                "--save_strategy",
                "no",
                "--seed",
                "0",
                *extra,
            ],
        )
        return out

    checkpointed = sft(tmp_path / "z3-gc", *ZERO3, "--gradient_checkpointing", "True")
    plain = sft(tmp_path / "z3", *ZERO3, "--gradient_checkpointing", "False")
    ddp = sft(tmp_path / "ddp", "--gradient_checkpointing", "True")
    assert_same_steps("zero3 + checkpointing", "ddp", checkpointed, ddp)
    assert_same_steps("zero3", "zero3 + checkpointing", plain, checkpointed)
    assert_same_adapter(plain, checkpointed)
    assert min(lora_b_norms(plain / "adapter_model.safetensors")) > 0
    assert_merge_keeps_logits(tiny_model, plain, tmp_path / "merged")
