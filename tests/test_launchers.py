"""The launchers as a user runs them: nothing of a stage outlives its shell (SIGKILL or SIGTERM of
run_sft.sh, of run_pipeline.sh's process group, or SIGTERM of run_pipeline.sh's shell), a second
trainer on a busy output folder is refused, every stage's flags are checked before the pipeline's
first stage trains, and an error through a launcher is one sentence with exit code 2.

Real processes throughout: the real launchers, pipeline.run.launch (torch's elastic agent) and the
tiny model. A run's processes are found by scanning /proc for command lines that name its output
folder, which is unique to the test, so the check also catches a worker that was reparented or lost
from the process tree.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.run.process import LOCK_NAME
from pipeline.tools import pipeline_config
from tests.helpers import DATA, REPO

pytestmark = pytest.mark.timeout(300)


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text` (zombies have an empty one and are left
    out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def wait_until(
    condition,
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
):
    """Poll `condition` until it holds (returns its value); fail naming `what`, with the log's tail,
    on timeout or when `proc` ended first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        ended = proc is not None and proc.poll() is not None
        if ended or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            pytest.fail(
                f"{what}: {'the process ended' if ended else f'not within {timeout} s'}\n{tail}"
            )
        time.sleep(0.2)


@pytest.fixture
def run_dir(tmp_path):
    """A unique folder for one run's outputs; whatever still names it at the end is killed, so a
    failing test leaves no trainer behind."""
    folder = tmp_path / "run"
    yield folder
    for pid in processes_naming(str(folder)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A launcher in a session of its own, as a job scheduler starts one: its process group is ours
    to kill."""
    with open(log, "w") as out:
        return subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )


def sft_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "bash",
        "run_sft.sh",
        "--model_name_or_path",
        str(model),
        "--template_name",
        "qwen",
        "--train_file_dir",
        str(DATA / "sft"),
        "--validation_split_percentage",
        "0",
        "--output_dir",
        str(out),
        "--use_peft",
        "False",
        "--model_max_length",
        "128",
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        *extra,
    ]


def lock_owner(out: Path) -> dict | None:
    """The lock file's record of the process that holds the folder, once it is written."""
    try:
        return json.loads((out / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


def training(log: Path) -> bool:
    """Whether the run has logged a training step (--logging_steps 1)."""
    return log.exists() and "'loss'" in log.read_text(errors="replace")


def one_sentence_error(output: str) -> str:
    """The single `error:` line of a failed launcher's output, which must also be its last line."""
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert output.strip().splitlines()[-1] == errors[0], output[-3000:]
    return errors[0]


# --- the parts: parent-death signal and the output-folder lock, each in a bare Python process -----

SLEEPER = (
    "from pipeline.run.process import die_with_parent; import os, time; die_with_parent(); "
    "print(os.getpid(), flush=True); time.sleep(120)"
)


def test_a_process_dies_when_its_parent_is_sigkilled():
    shell = subprocess.Popen(
        ["bash", "-c", f"{sys.executable} -c '{SLEEPER}' & wait"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child = int(shell.stdout.readline())
    try:
        shell.kill()
        shell.wait(timeout=10)
        wait_until(
            lambda: (
                not Path(f"/proc/{child}/cmdline").exists()
                or not Path(f"/proc/{child}/cmdline").read_bytes()
            ),
            10,
            "the child outlived its parent",
        )
    finally:
        if Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGKILL)


def test_a_parent_that_died_before_prctl_is_noticed():
    """PIPELINE_PARENT_PID names the parent it should have: already gone, so the signal is raised at
    once. A named process that is alive but is not the parent (a value inherited from elsewhere) is
    left alone."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    code = "from pipeline.run.process import die_with_parent; die_with_parent(); print('alive')"
    orphan = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PIPELINE_PARENT_PID": str(gone.pid)},
    )
    assert orphan.returncode == -signal.SIGTERM and "alive" not in orphan.stdout
    stale = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PIPELINE_PARENT_PID": "1"},
    )
    assert stale.returncode == 0 and stale.stdout == "alive\n"


def test_the_output_lock_refuses_a_second_holder_until_the_first_dies(tmp_path):
    out = tmp_path / "out"
    locker = (
        "import sys, time; from pipeline.errors import run_cli; "
        "from pipeline.run.process import lock_output_dir"
    )
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"{locker}; lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        second = subprocess.run(
            [
                sys.executable,
                "-c",
                f"{locker}; run_cli(lambda: lock_output_dir(sys.argv[1]))",
                str(out),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 2
        assert f"is in use by another training run, pid {holder.pid} on " in second.stderr
        assert "wait for it to finish or stop it" in second.stderr
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the SIGKILLed holder's lock; taking it twice in one process is fine; at
    # exit the file goes, and so do the folders the process made for it
    fresh = tmp_path / "fresh" / "a"
    third = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{locker}; [lock_output_dir(p) for p in sys.argv[1:] * 2]",
            str(out),
            str(fresh),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert third.returncode == 0, third.stderr
    assert not (out / LOCK_NAME).exists() and not (tmp_path / "fresh").exists()


# --- run_sft.sh -----------------------------------------------------------------------------------


def test_a_user_error_through_the_launcher_is_one_sentence_and_exit_2(tiny_model, run_dir):
    proc = subprocess.run(
        sft_argv(tiny_model, run_dir, "--lora_rank", "0"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--lora_rank must be positive" in one_sentence_error(proc.stderr)
    assert "Traceback" not in proc.stdout and "ChildFailedError" not in proc.stdout


@pytest.mark.slow
def test_sigkill_of_run_sft_ends_its_worker(tiny_model, run_dir, tmp_path):
    log = tmp_path / "sft.log"
    shell = start(
        sft_argv(tiny_model, run_dir, "--max_steps", "100000", "--logging_steps", "1"), log
    )
    worker = wait_until(
        lambda: lock_owner(run_dir), 240, "the worker never took the output lock", shell, log
    )["pid"]
    wait_until(lambda: training(log), 240, "no training step was logged", shell, log)
    assert worker in processes_naming(str(run_dir))
    shell.kill()  # the stage's shell only: the launcher and its worker must follow it
    shell.wait(timeout=10)
    wait_until(
        lambda: not processes_naming(str(run_dir)),
        30,
        "processes of the killed run are still alive",
    )


@pytest.mark.slow
def test_a_second_run_on_a_busy_output_dir_is_refused(tiny_model, run_dir, tmp_path):
    """...naming the first run's worker; then SIGTERM of the first's shell stops it with a
    checkpoint (exit 143)."""
    log = tmp_path / "first.log"
    first = start(
        sft_argv(tiny_model, run_dir, "--max_steps", "100000", "--logging_steps", "1"), log
    )
    worker = wait_until(
        lambda: lock_owner(run_dir), 240, "the worker never took the output lock", first, log
    )["pid"]
    second = subprocess.run(
        sft_argv(tiny_model, run_dir, "--max_steps", "5"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert second.returncode == 2, second.stderr[-3000:]
    error = one_sentence_error(second.stderr)
    assert f"is in use by another training run, pid {worker} " in error and "stages/sft.py" in error
    assert first.poll() is None and lock_owner(run_dir)["pid"] == worker, (
        "the refused run disturbed the first"
    )

    wait_until(lambda: training(log), 240, "no training step was logged", first, log)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143, log.read_text()[-3000:]
    assert not processes_naming(str(run_dir)), "the shell returned before its worker ended"
    assert list(run_dir.glob("checkpoint-*/trainer_state.json")), "no checkpoint saved on SIGTERM"
    assert not (run_dir / LOCK_NAME).exists()


# --- run_pipeline.sh ------------------------------------------------------------------------------


def long_pt_config(tmp_path: Path, model: Path) -> Path:
    config = tmp_path / "long.yaml"
    config.write_text(f"""
base_model: {model}
stages: [pt]
flags:
  pt: {{block_size: 64, per_device_train_batch_size: 4, max_steps: 100000, \
logging_steps: 1, save_strategy: "no",
        report_to: none, eval_strategy: "no"}}
""")
    return config


def start_pipeline(tmp_path: Path, model: Path, root: Path) -> tuple[subprocess.Popen, Path]:
    """run_pipeline.sh on the one-stage config, once its PT worker trains: (the pipeline, its
    log)."""
    log = tmp_path / "pipeline.log"
    proc = start(
        ["bash", "run_pipeline.sh", str(long_pt_config(tmp_path, model))],
        log,
        OUTPUT_ROOT=str(root),
    )
    wait_until(
        lambda: lock_owner(root / "pt"), 300, "the PT worker never took the output lock", proc, log
    )
    wait_until(lambda: training(log), 240, "no training step was logged", proc, log)
    return proc, log


@pytest.mark.slow
def test_sigkill_of_the_pipeline_process_group_ends_the_stage(tiny_model, run_dir, tmp_path):
    proc, _ = start_pipeline(tmp_path, tiny_model, run_dir)
    os.killpg(
        proc.pid, signal.SIGKILL
    )  # the pipeline, the stage's shell and the launcher; not the worker
    proc.wait(timeout=10)
    wait_until(
        lambda: not processes_naming(str(run_dir)),
        30,
        "processes of the killed pipeline are still alive",
    )
    assert not (run_dir / "pt" / "pipeline_stage_done").exists()


@pytest.mark.slow
def test_sigterm_of_the_pipeline_shell_stops_the_stage_then_exits_143(
    tiny_model, run_dir, tmp_path
):
    proc, log = start_pipeline(tmp_path, tiny_model, run_dir)
    proc.send_signal(signal.SIGTERM)  # the pipeline's shell alone, as `kill PID` does
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    assert not processes_naming(str(run_dir)), "the pipeline returned before its stage ended"
    assert list((run_dir / "pt").glob("checkpoint-*/trainer_state.json")), (
        "the stage saved no checkpoint"
    )
    assert not (run_dir / "pt" / "pipeline_stage_done").exists()


def test_a_bad_flag_in_the_last_stage_stops_the_pipeline_before_any_training(tiny_model, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"base_model: {tiny_model}\nflags:\n  dpo: {{beta: strong}}\n")
    root = tmp_path / "run"
    proc = subprocess.run(
        ["bash", "run_pipeline.sh", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OUTPUT_ROOT": str(root)},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: {config}: flags.dpo: argument --beta: invalid float value: 'strong'."
    ]
    assert not root.exists() and "== pt from" not in proc.stdout


# --- the flag check itself, in this process -------------------------------------------------------


@pytest.mark.parametrize("stage", pipeline_config.STAGES)
@pytest.mark.parametrize(
    "flag, value, message",
    [
        (
            "learning_rate",
            "fast",
            "--learning_rate/--learning-rate: invalid float value: 'fast'",
        ),  # a type
        (
            "lerning_rate",
            "0.1",
            "not used by the HfArgumentParser: ['--lerning_rate', '0.1']",
        ),  # a name
        ("lora_rank", 0, "--lora_rank must be positive, got 0"),  # a dataclass's own check
    ],
)
def test_every_stage_checks_its_flags_without_its_start_model(
    stage, flag, value, message, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)  # the config's data folders are relative to the repository
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps({"flags": {stage: {flag: value}}}))  # JSON is YAML
    config = pipeline_config.load(str(path))
    with pytest.raises(
        UserError, match=rf"^{re.escape(str(path))}: flags\.{stage}: .*{re.escape(message)}"
    ):
        pipeline_config.check_flags(config, str(path), "/nonexistent/run")


def test_shipped_configs_pass_the_flag_check(monkeypatch):
    """Their models (a hub id, the tiny model yet to be built) are not there: the check must not
    need them."""
    monkeypatch.chdir(REPO)
    from stages import sft

    real = sft.parse_args
    for path in sorted((REPO / "configs").glob("pipeline_*.yaml")):
        pipeline_config.check_flags(pipeline_config.load(str(path)), str(path), "/nonexistent/run")
    assert sft.parse_args is real, "the stage's parse_args was not given back"
