"""Every command answers --help, and the libraries' known harmless warnings
(pipeline/library_noise.py) do not reach the user on any entry point, while other warnings still
do."""

import logging
import subprocess
import sys
import warnings

import pytest

from pipeline import library_noise
from tests.helpers import DATA, REPO

NOISE = (library_noise.BNB_CPU_KERNEL, "is deprecated and will be removed in v6")


def entry_points() -> list[list[str]]:
    """Every runnable file of the project, as its docs run it: packages' modules with -m, stages and
    scripts by path."""
    files = [
        *REPO.glob("*.py"),
        *(f for d in ("pipeline", "stages", "bench", "scripts") for f in (REPO / d).rglob("*.py")),
    ]
    found = []
    for path in sorted(files):
        if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8"):
            rel = path.relative_to(REPO)
            found.append(
                ["-m", ".".join(rel.with_suffix("").parts)]
                if rel.parts[0] in ("pipeline", "bench")
                else [str(rel)]
            )
    return found


ENTRY_POINTS = entry_points()


def test_the_filters_drop_only_the_named_messages(caplog):
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("%s: no network", library_noise.BNB_CPU_KERNEL)
        log.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        library_noise.silence()  # the process-wide filters, as `import pipeline` installs them
        for name in (
            "is_gradient_checkpointing",
            "gradient_checkpointing_enable",
            "gradient_checkpointing_disable",
        ):
            warnings.warn(
                f"`{name}` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
            )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_the_entry_points_are_found():
    names = {a[-1] for a in ENTRY_POINTS}
    assert {
        "stages/sft.py",
        "stages/grpo.py",
        "merge_peft_adapter.py",
        "pipeline.serve",
        "pipeline.report",
        "pipeline.tools.pipeline_config",
        "bench.sft",
        "bench.run_one",
        "scripts/make_golden.py",
    } <= names


@pytest.mark.parametrize("argv", ENTRY_POINTS, ids=lambda a: a[-1])
def test_every_entry_point_answers_help_without_known_noise(argv):
    proc = subprocess.run(
        [sys.executable, *argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [n for n in NOISE if n in proc.stdout + proc.stderr], proc.stderr[-2000:]


@pytest.mark.parametrize("stage, data", [("sft", "sft"), ("dpo", "reward")])
def test_a_training_run_prints_no_deprecation_warning(tiny_model, tmp_path, stage, data):
    proc = subprocess.run(
        [
            sys.executable,
            f"stages/{stage}.py",
            "--model_name_or_path",
            str(tiny_model),
            "--train_file_dir",
            str(DATA / data),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "1",
            "--template_name",
            "qwen",
            "--gradient_checkpointing",
            "True",
            "--report_to",
            "none",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert "FutureWarning" not in said and not [n for n in NOISE if n in said], said[-3000:]
