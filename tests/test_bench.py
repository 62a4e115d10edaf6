"""bench/: the SFT benchmark runs end to end in its CPU smoke mode (the GPU figures come from device runs)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_sft_bench_smoke_runs_both_tools_on_the_same_tokens(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.sft", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results-full.json").read_text())["rows"]
    assert [r["run"].split(" ")[0] for r in rows] == ["this"] * 4 + ["TRL"]
    assert rows[1]["steps"] > rows[0]["steps"]  # one packed row a step (TRL's tokens per step): more, smaller steps
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows), rows
    assert len({r["tokens"] for r in rows}) == 1  # every tool trains on the same tokens
    assert "| TRL SFTTrainer (defaults) |" in (tmp_path / "results-full.md").read_text()


@pytest.mark.slow
def test_dpo_bench_smoke_runs_the_project_stage_and_trl_on_the_same_pairs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.sft", "--smoke", "--suite", "dpo", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results-dpo.json").read_text())["rows"]
    assert [r["run"].split(",")[0] for r in rows] == ["this project", "TRL DPOTrainer (defaults)"]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows), rows
    assert len({r["tokens"] for r in rows}) == 1


@pytest.mark.slow
def test_ppo_bench_smoke_reports_phases_for_the_loop_and_trls_grpo(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.ppo", "--smoke", "--rows", "0,3", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results-ppo.json").read_text())["rows"]
    assert all("error" not in r and r["samples_per_s"] > 0 and r["saved_loadable"] for r in rows), rows
    assert rows[0]["generate_s"] > 0 and rows[0]["update_s"] > 0  # the loop's per-phase times
