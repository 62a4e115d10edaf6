"""run_pipeline.sh end to end: one real run of the embedded default (every stage beats its starting
point on held-out data), a re-run that skips it all, a run killed mid-stage that resumes from its
checkpoint; plus the config reader's errors and the report's table on hand-made stage folders."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from pipeline.errors import UserError
from pipeline.eval.report import write_report
from pipeline.tools import pipeline_config
from tests.helpers import REPO

pytestmark = pytest.mark.timeout(
    1500
)  # the demo pipeline (~5 min alone on 2 cores) runs in the first test

STAGES = ("pt", "sft", "rm", "ppo", "dpo")


def pipeline(output_root: Path, *args: str, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUTPUT_ROOT=str(output_root))
    return subprocess.run(
        ["bash", "run_pipeline.sh", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        **popen,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's main command on the embedded default, run once for the tests below."""
    root = tmp_path_factory.mktemp("pipeline") / "demo"
    start = time.monotonic()
    proc = pipeline(root)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 480, (
        f"the demo took {elapsed:.0f} s; it should take a few minutes (about 2 on 2 CPU cores)"
    )
    return root, proc.stdout


def test_default_run_improves_every_stage(demo, monkeypatch):
    monkeypatch.chdir(REPO)
    root, stdout = demo
    report = json.loads((root / "report.json").read_text())
    wanted = pipeline_config.load(str(REPO / "configs" / "pipeline_default.yaml"))["stages"]
    for stage in STAGES:
        entry = report["stages"][stage]
        assert entry["status"] == ("finished" if stage in wanted else "not run"), stage
        for metric in entry["metrics"]:
            if metric["better"]:
                assert metric["improved"], (stage, metric)
    judged = [m for stage in STAGES for m in report["stages"][stage]["metrics"] if m["better"]]
    assert len(judged) == 9 and (root / "report.md").read_text().count("| yes |") == 9
    kl = report["stages"]["ppo"]["metrics"][2]
    assert (
        kl["key"] == "eval_kl" and 0 < kl["after"] < 1
    )  # PPO moved away from the SFT model, but not far
    assert "| PT | eval perplexity" in stdout  # the table is printed too
    assert (root / "losses.png").stat().st_size > 10_000
    for stage in (
        "pt",
        "sft",
        "rm",
    ):  # LoRA stages are merged; the next stage started from the merge
        assert (root / f"{stage}-merged" / "config.json").is_file()
    assert (root / "rm" / "pipeline_stage_done").read_text().strip() == str(root / "sft-merged")


def test_rerun_skips_every_finished_stage(demo):
    root, _ = demo
    outputs = [root / s / "train_results.json" for s in STAGES]
    outputs += [root / f"{s}-merged" / "config.json" for s in ("pt", "sft", "rm")]
    outputs += [root / s / "exact_match_results.json" for s in ("sft", "dpo")]
    outputs += [root / "tiny-llama" / "model.safetensors"]
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    start = time.monotonic()
    proc = pipeline(root)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in STAGES:
        assert f"== {stage}: finished earlier, skipped" in proc.stdout
    assert (
        proc.stdout.count("merged earlier, skipped") == 3
        and proc.stdout.count("exact match: measured earlier, skipped") == 2
    )
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes
    assert "torchrun" not in proc.stdout + proc.stderr and elapsed < 60


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL, as a crash or a preempted job: the process group started with the pipeline, and
    torchrun's workers, which run in sessions of their own."""
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(workers, timeout=30)
    proc.wait()


@pytest.mark.slow
def test_killed_stage_resumes_from_its_checkpoint(tiny_model, tmp_path):
    config = tmp_path / "short.yaml"
    config.write_text(f"""
base_model: {tiny_model}
stages: [pt]
flags:
  pt: {{block_size: 128, per_device_train_batch_size: 8, learning_rate: 5.0e-3, max_steps: 12, \
save_steps: 4,
        logging_steps: 4, report_to: none, seed: 0}}
""")
    root, out = tmp_path / "run", tmp_path / "run" / "pt"
    env = dict(os.environ, OUTPUT_ROOT=str(root))
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            ["bash", "run_pipeline.sh", str(config)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        # trainer_state.json is the last file a Trainer checkpoint writes
        while not list(out.glob("checkpoint-*/trainer_state.json")) and first.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        kill_everything(first)
    assert not (out / "train_results.json").exists(), "killed too late: the stage had finished"
    assert not (out / "pipeline_stage_done").exists()
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))

    proc = pipeline(root, str(config))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resuming from {out}/checkpoint-{steps[-1]}" in proc.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 12
    assert (root / "pt-merged" / "config.json").is_file()
    report = json.loads((root / "report.json").read_text())
    assert (
        report["stages"]["pt"]["status"] == "finished"
        and report["stages"]["sft"]["status"] == "not run"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("methd: lora", "unknown key(s) methd"),
        ("method: dora", "method must be one of full, lora, qlora"),
        ("stages: [sft, ppo]", "add rm to stages"),
        ("data: {sft: no/such/folder}", "data.sft folder no/such/folder does not exist"),
        (
            "flags: {sft: {output_dir: x}}",
            "flags.sft sets output_dir, which the pipeline sets itself",
        ),
        ("flags: {sft: {lora_rank: {a: 1}}}", "flags.sft.lora_rank holds a mapping"),
        ("stages: [pt\n", "does not parse"),
        (
            "flags: {ppo: {method: dora}}",
            "flags.ppo.method must be one of full, lora, qlora, got 'dora'",
        ),
    ],
)
def test_config_mistakes_are_one_sentence(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(
        REPO
    )  # data folders are relative to the repository, where run_pipeline.sh runs
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipeline_config.load(str(path))


def test_bad_config_stops_the_pipeline_before_any_work(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: dora\n")
    proc = pipeline(tmp_path / "run", str(path))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {path}: method must be one of full, lora, qlora, got 'dora'."
    ]
    assert not (tmp_path / "run").exists()


def test_shipped_configs_load_and_quote_for_bash(monkeypatch):
    monkeypatch.chdir(REPO)
    for path in sorted((REPO / "configs").glob("pipeline_*.yaml")):
        lines = pipeline_config.shell_lines(pipeline_config.load(str(path)))
        script = "\n".join(lines) + '\nprintf "%s\\n" "${sft_flags[@]}"'
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
        assert proc.stdout.split("\n")[:-1] == pipeline_config.load(str(path))["flags"]["sft"], path


def test_a_stage_method_overrides_the_top_level_one(tmp_path, monkeypatch):
    """method: qlora everywhere except flags.ppo.method: full -> PPO gets --use_peft False and no
    --qlora."""
    monkeypatch.chdir(REPO)
    path = tmp_path / "mixed.yaml"
    path.write_text("method: qlora\nflags: {ppo: {method: full, kl_coef: 0.1}}\n")
    script = (
        "\n".join(pipeline_config.shell_lines(pipeline_config.load(str(path))))
        + '\necho "${sft_method[*]}|${ppo_method[*]}|${ppo_flags[*]}"'
    )
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "--use_peft True --qlora True|--use_peft False|--kl_coef 0.1"


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_report_table_from_hand_made_stage_folders(tmp_path):
    write(
        tmp_path / "pt" / "trainer_state.json",
        {
            "log_history": [
                {"step": 0, "eval_loss": 2.0},
                {"step": 5, "loss": 3.0},
                {"step": 10, "loss": 1.5},
                {"step": 10, "eval_loss": 1.0},
            ]
        },
    )
    write(tmp_path / "pt" / "eval_results.json", {"eval_loss": 1.0, "perplexity": 2.718281828})
    write(tmp_path / "pt" / "train_results.json", {"train_loss": 2.2})
    write(
        tmp_path / "sft" / "trainer_state.json",
        {"log_history": [{"step": 0, "eval_loss": 0.5}, {"step": 4, "loss": 1.0}]},
    )
    write(tmp_path / "sft" / "eval_results.json", {"eval_loss": 0.75})  # worse than at the start
    write(
        tmp_path / "sft" / "exact_match_results.json",
        {"eval_exact_match_before": 0.25, "eval_exact_match": 0.5},
    )
    write(tmp_path / "sft" / "train_results.json", {})
    (tmp_path / "rm" / "checkpoint-2").mkdir(parents=True)  # interrupted: no train_results.json
    write(
        tmp_path / "dpo" / "eval_results.json",
        {"eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.1},
    )
    write(tmp_path / "dpo" / "train_results.json", {})  # no trainer_state.json: no "before"
    table = write_report(tmp_path)
    assert table.splitlines()[2:] == [
        "| PT | eval perplexity, lower is better | 7.389 | 2.718 | yes |",
        "| SFT | eval loss, lower is better | 0.5 | 0.75 | no |",
        "| SFT | exact match (greedy), higher is better | 0.25 | 0.5 | yes |",
        "| RM | unfinished (no train_results.json: interrupted or running) | — | — | — |",
        "| PPO | not run (no folder) | — | — | — |",
        "| DPO | reward accuracy, higher is better | — | 0.75 | — |",
        "| DPO | reward margin, higher is better | — | 0.1 | — |",
        "| DPO | exact match (greedy), higher is better | — | — | — |",
    ]
    report = json.loads((tmp_path / "report.json").read_text())
    assert (
        report["stages"]["sft"]["metrics"][0]["improved"] is False
        and report["loss_plot"] == "losses.png"
    )
    assert (tmp_path / "losses.png").read_bytes()[:4] == b"\x89PNG"
    assert table in (tmp_path / "report.md").read_text()


def test_report_of_ppo_results(tmp_path):
    write(
        tmp_path / "ppo" / "trainer_state.json",
        {
            "global_step": 2,
            "log_history": [
                {"step": 0, "eval_score": 0.1, "eval_kl": 0.0},
                {"step": 1, "loss": 0.3, "objective/scores": 0.2, "objective/kl": 0.01},
            ],
        },
    )
    write(
        tmp_path / "ppo" / "eval_results.json",
        {
            "eval_score_before": 0.1,
            "eval_score": 0.9,
            "eval_kl": 0.02,
            "eval_exact_match_before": 0.5,
            "eval_exact_match": 0.5,
        },
    )
    write(tmp_path / "ppo" / "train_results.json", {"global_step": 2})
    rows = write_report(tmp_path).splitlines()
    assert "| PPO | mean reward-model score, higher is better | 0.1 | 0.9 | yes |" in rows
    assert "| PPO | exact match (greedy), higher is better | 0.5 | 0.5 | no |" in rows
    assert "| PPO | KL to the SFT model | 0 | 0.02 | — |" in rows
