"""Killed and preempted training resumes to the same weights: SIGKILL and SIGTERM, mid-step and
inside a checkpoint save, for a Trainer stage (PT) here and for the PPO loop in
tests/test_ppo_kill.py (which uses the helpers of this file).

Every run is a subprocess (`python stages/<stage>.py`), killed for real, then resumed with
`--resume_from_checkpoint auto`; the resumed run must end with every saved tensor (final model, and
the last checkpoint: weights, optimizer and scheduler state) equal to an uninterrupted run's, max
abs difference 0, and no process of the killed run may be left.

How a kill lands inside a save, deterministically: the subprocess gets a sitecustomize module from
this test (a folder put first on its PYTHONPATH; nothing in the project reads it) that installs a
CPython audit hook (sys.addaudithook, the interpreter's own observation API). Audit hooks see every
file Python opens; when the process opens the chosen file of the checkpoint being written (e.g.
checkpoint-4/trainer_state.json, after the weights and optimizer state, before the state and the
COMPLETE mark), the hook sends the process the signal itself.
So a real SIGKILL or SIGTERM reaches the real, unchanged save at a chosen point, and what is on disk
is what a kill there leaves. The alternatives are weaker: waiting from outside for checkpoint-4/ to
appear without its COMPLETE mark races with a save that takes milliseconds with the tiny model, and
damaging a copy of a finished checkpoint tests the resume logic on a state the saver may never
produce (the PPO loop writes tmp-checkpoint-N and renames it, so a kill never leaves a checkpoint-N
without its mark there). Mid-step kills come from outside, right after a step's log line: the next
step takes far longer than sending the signal.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import DATA, REPO

# The audit hook: KILL_AT="SIGNAL:path/suffix" sends SIGNAL to this process when it opens a file
# whose path ends with the suffix for writing (once).
SITECUSTOMIZE = textwrap.dedent("""
    import os, signal, sys

    _spec = os.environ.get("KILL_AT")
    if _spec:
        _sig, _suffix = _spec.split(":", 1)
        _fired = []

        def _hook(event, args):
            if event != "open" or _fired or isinstance(args[0], int):
                return
            mode, flags = args[1], args[2]
            writing = ("w" in mode or "a" in mode or "x" in mode) if mode else bool(flags & (os.O_WRONLY | os.O_RDWR))
            if writing and os.fspath(args[0]).replace(os.sep, "/").endswith(_suffix):
                _fired.append(True)
                print(f"kill hook: {_sig} at {os.fspath(args[0])}", flush=True)
                os.kill(os.getpid(), getattr(signal, _sig))

        sys.addaudithook(_hook)
""")  # noqa: E501 - the hook's source is written to a file as it is


def kill_hook(folder: Path) -> Path:
    """A folder holding the hook as sitecustomize.py, for a subprocess's PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def start(
    argv: list[str],
    hook: Path | None = None,
    kill_at: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """A training subprocess in a session of its own (so a SIGKILL can take its whole process group,
    as a scheduler does), unbuffered so its log lines arrive as they are written."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if hook:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    if kill_at:
        env["KILL_AT"] = kill_at
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run(
    argv: list[str], hook: Path | None = None, kill_at: str | None = None, timeout: float = 300
) -> tuple[int, str]:
    proc = start(argv, hook, kill_at)
    try:
        output = proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output


def wait_for_line(proc: subprocess.Popen, needle: str, count: int = 1, timeout: float = 240) -> str:
    """Read the subprocess's output until the `count`-th line that holds `needle`; return what was
    read."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        count -= needle in line
        if count == 0:
            return "".join(seen)
        if time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no line with {needle!r} in the output:\n{''.join(seen)[-3000:]}")


def interrupt(proc: subprocess.Popen, sig: signal.Signals, timeout: float = 240) -> str:
    """SIGKILL: the whole process group, as a scheduler kills a job; SIGTERM: the launched process
    only (a launcher forwards it). Returns the rest of the output once the process has ended."""
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(sig)
    return proc.communicate(timeout=timeout)[0]


def assert_no_process_left(out: Path, timeout: float = 30) -> None:
    """No process of the run (any process whose command line names its output folder) is alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:  # ended while we looked
                continue
            if str(out).encode() in args and int(cmdline.parent.name) != os.getpid():
                alive.append(
                    f"{cmdline.parent.name}: {b' '.join(args).decode(errors='replace')[:200]}"
                )
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not alive, f"processes of the killed run are still alive: {alive}"


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) state dict, keyed by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = (
        obj.items()
        if isinstance(obj, dict)
        else enumerate(obj)
        if isinstance(obj, (list, tuple))
        else ()
    )
    found = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


def saved_tensors(folder: Path, recursive: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor a folder's safetensors and torch files hold (weights, optimizer, scheduler, loop
    state)."""
    found = {}
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        name = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            found.update(tensors(load_file(str(path)), name))
        elif path.suffix in (".pt", ".pth", ".bin"):
            found.update(tensors(torch.load(path, map_location="cpu", weights_only=False), name))
    return found


def assert_same_tensors(whole: Path, resumed: Path, last_checkpoint: str) -> None:
    """The final model and the last checkpoint of the resumed run equal the uninterrupted run's, bit
    for bit."""
    for a_dir, b_dir, recursive in (
        (whole, resumed, False),
        (whole / last_checkpoint, resumed / last_checkpoint, True),
    ):
        a, b = saved_tensors(a_dir, recursive), saved_tensors(b_dir, recursive)
        assert a and sorted(a) == sorted(b), (a_dir, sorted(a), sorted(b))
        diffs = {
            k: (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
            for k in a
        }
        assert max(diffs.values()) == 0, {k: d for k, d in diffs.items() if d}


def checkpoint_steps(out: Path, complete: bool = True) -> list[int]:
    marker = "checkpoint_complete.json"
    return sorted(
        int(p.name.split("-")[1])
        for p in out.glob("checkpoint-*")
        if (p / marker).is_file() == complete
    )


# ---------------------------------------------------------------- PT (a Trainer stage)

# 3 steps per data epoch: the resumes start inside and at the end of epochs; 11 is not a whole
# number of epochs, where the Trainer alone would train past --max_steps when a finished run is
# resumed
PT_STEPS = 11


def pt_argv(tiny_model: Path, out: Path, *extra: str) -> list[str]:
    # 4 accumulated micro-batches a step, so a step lasts much longer than sending a signal takes
    return [
        sys.executable,
        "stages/pt.py",
        "--model_name_or_path",
        str(tiny_model),
        "--train_file_dir",
        str(DATA / "pt"),
        "--output_dir",
        str(out),
        "--block_size",
        "64",
        "--per_device_train_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "4",
        "--max_steps",
        str(PT_STEPS),
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler_type",
        "constant",
        "--use_peft",
        "False",
        "--do_eval",
        "False",
        "--validation_split_percentage",
        "0",
        "--report_to",
        "none",
        "--seed",
        "0",
        "--disable_tqdm",
        "True",
        *extra,
    ]


@pytest.fixture(scope="module")
def pt_whole(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pt") / "whole"
    code, output = run(pt_argv(tiny_model, out))
    assert code == 0, output[-3000:]
    return out


def stopped(code: int, output: str, out: Path, sig: signal.Signals) -> None:
    """What every interrupted run must leave: its exit code, no final model, no process alive."""
    assert code == (143 if sig == signal.SIGTERM else -sig), output[-3000:]
    assert (
        not (out / "model.safetensors").exists()
        and not (out / "adapter_model.safetensors").exists()
    )
    assert_no_process_left(out)


@pytest.mark.slow
def test_pt_killed_and_preempted_inside_saves_and_mid_step_resumes_to_the_same_weights(
    tiny_model, pt_whole, tmp_path
):
    """One job interrupted four ways in a row (as on a preemptible queue), each rerun with `auto`:
    1. SIGKILL while checkpoint-4 is written (weights, optimizer, scheduler and RNG states on disk,
       not its trainer_state.json): checkpoint-4 has no COMPLETE mark; the rerun skips it with a
       warning and starts from checkpoint-2 (the Trainer alone would take it and restart at step 0,
       its state file missing).
    2. SIGTERM while checkpoint-6 is written: the save finishes, the Trainer trains the next step
       (7), saves it, exits 143 and says how to resume.
    3. SIGKILL of the process group mid-step (right after step 9's log line, so in step 10).
    4. SIGTERM mid-step (after the next step's log line): that step finishes and is saved, exit 143.
    The last rerun ends with every saved tensor equal to the uninterrupted run's."""
    out, hook = tmp_path / "cut", kill_hook(tmp_path / "hook")
    code, output = run(pt_argv(tiny_model, out), hook, "SIGKILL:checkpoint-4/trainer_state.json")
    assert f"kill hook: SIGKILL at {out}/checkpoint-4/trainer_state.json" in output, output[-3000:]
    stopped(code, output, out, signal.SIGKILL)
    assert checkpoint_steps(out) == [2] and checkpoint_steps(out, complete=False) == [4]

    code, output = run(
        pt_argv(tiny_model, out, "--resume_from_checkpoint", "auto"),
        hook,
        "SIGTERM:checkpoint-6/trainer_state.json",
    )
    assert f"skipping {out}/checkpoint-4: its save did not finish" in output, output[-3000:]
    assert f"resuming from {out}/checkpoint-2" in output
    stopped(code, output, out, signal.SIGTERM)
    assert checkpoint_steps(out) == [2, 4, 6, 7]
    assert (
        "stopped by SIGTERM after step 7 (saved checkpoint-7); "
        "rerun with --resume_from_checkpoint auto"
    ) in output

    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = start(pt_argv(tiny_model, out, "--resume_from_checkpoint", "auto"))
        output = wait_for_line(proc, "{'loss'", count=2 if sig == signal.SIGKILL else 1)
        output += interrupt(proc, sig)
        stopped(proc.returncode, output, out, sig)
        if sig == signal.SIGKILL:
            assert f"resuming from {out}/checkpoint-7" in output and 8 in checkpoint_steps(out)
        else:
            step = max(checkpoint_steps(out))  # 10, unless this test was held up for a whole step
            assert (
                step < PT_STEPS
                and f"stopped by SIGTERM after step {step} (saved checkpoint-{step})" in output
            )

    code, output = run(pt_argv(tiny_model, out, "--resume_from_checkpoint", "auto"))
    assert code == 0, output[-3000:]
    assert_same_tensors(pt_whole, out, f"checkpoint-{PT_STEPS}")


@pytest.mark.slow
def test_pt_resuming_a_finished_run_trains_no_more_steps(tiny_model, pt_whole, tmp_path):
    """Resuming at checkpoint-11 of 11 (not a whole number of epochs): the Trainer alone re-enters
    the last epoch and trains step 12 before it checks --max_steps; the stage trains nothing and
    writes the same model."""
    out = tmp_path / "again"
    shutil.copytree(pt_whole, out)
    code, output = run(pt_argv(tiny_model, out, "--resume_from_checkpoint", "auto"))
    assert code == 0, output[-3000:]
    assert (
        f"checkpoint-{PT_STEPS} is already at step {PT_STEPS} of {PT_STEPS}: nothing more to train"
        in output
    )
    assert "'loss'" not in output and not (out / f"checkpoint-{PT_STEPS + 1}").exists()
    assert_same_tensors(pt_whole, out, f"checkpoint-{PT_STEPS}")
