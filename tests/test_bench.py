"""bench/: the SFT benchmark runs end to end in its CPU smoke mode (the GPU figures come from device
runs)."""

import json
import subprocess
import sys

import pytest

from bench.run_one import WARMUP_STEPS
from tests.helpers import REPO


@pytest.mark.slow
def test_sft_bench_smoke_runs_both_tools_on_the_same_tokens(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sft", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results-full.json").read_text())["rows"]
    assert [r["run"].split(" ")[0] for r in rows] == ["this"] * 4 + ["TRL"]
    assert (
        rows[1]["steps"] > rows[0]["steps"]
    )  # one packed row a step (TRL's tokens per step): more, smaller steps
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows), rows
    assert len({r["tokens"] for r in rows}) == 1  # every tool trains on the same tokens
    assert "| TRL SFTTrainer (defaults) |" in (tmp_path / "results-full.md").read_text()
    # the rate after warm-up, for every run with steps beyond it (one packed row a step has)
    longer = [r for r in rows if r["steps"] > WARMUP_STEPS]
    assert rows[1] in longer
    assert all(r["steady_tokens_per_s"] > 0 for r in longer), longer
    assert all(r["steady_tokens_per_s"] is None for r in rows if r not in longer)


@pytest.mark.slow
def test_dpo_bench_smoke_runs_the_project_stage_and_trl_on_the_same_pairs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sft", "--smoke", "--suite", "dpo", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results-dpo.json").read_text())["rows"]
    assert [r["run"].split(",")[0] for r in rows] == ["this project", "TRL DPOTrainer (defaults)"]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows), rows
    assert len({r["tokens"] for r in rows}) == 1


@pytest.mark.slow
def test_ppo_bench_smoke_reports_phases_for_the_loop_and_trls_grpo(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ppo", "--smoke", "--rows", "0,3", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results-ppo.json").read_text())["rows"]
    assert all("error" not in r and r["samples_per_s"] > 0 and r["saved_loadable"] for r in rows), (
        rows
    )
    assert rows[0]["generate_s"] > 0 and rows[0]["update_s"] > 0  # the loop's per-phase times


def test_profile_phases_of_kernels_seen_on_an_h200():
    """bench.run_one's profile sorts kernels into phases by name (names as the H200 profile of the
    SFT bench showed them, template arguments included); annotations are not kernels and are not
    counted twice."""
    from bench.run_one import is_annotation, phase_of

    seen = {
        "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN": "matmul",
        "void pytorch_flash::flash_fwd_kernel<"
        "Flash_fwd_kernel_traits<64, 128, 128, 4, false, false>>": "attention",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
        "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>": "loss",
        "void at::native::(anonymous namespace)::"
        "nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": "loss",
        "void at::native::vectorized_elementwise_kernel<8, "
        "at::native::bfloat16_copy_kernel_cuda(at::"
        "TensorIteratorBase&)::{lambda(float)#1}>": "casts and copies",
        "void at::native::elementwise_kernel<128, 4, "
        "at::native::gpu_kernel_impl_nocast<at::native::"
        "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>>": "casts and copies",
        "void at::native::unrolled_elementwise_kernel<at::native::CUDAFunctor_add<float>, "
        "std::array<char*, 3ul>, TrivialOffsetCalculator<2, unsigned int>, "
        "memory::LoadWithCast<2>, memory::StoreWithCast<1>>": "other elementwise",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<"
        "at::native::(anonymous namespace)::FusedAdamMathFunctor>": "optimizer",
        "void at::native::reduce_kernel<512, 1, "
        "at::native::ReduceOp<float, at::native::MeanOps<float, float>>>": "reductions",
        "Memcpy DtoD (Device -> Device)": "casts and copies",
    }
    assert {name: phase_of(name) for name in seen} == seen
    assert is_annotation("ProfilerStep*") and is_annotation("Optimizer.step#AdamW.step")
    assert not is_annotation(next(iter(seen)))
