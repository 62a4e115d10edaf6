"""No flag is accepted and ignored: a real run of each stage (2 steps, tiny model, held-out data)
reads every flag the project declares for it, except those listed here with the condition under
which they are read or refused. tests/flag_audit.py runs the stage with its argument classes
instrumented; a new flag that nothing reads fails here, and so does an entry below that went stale.
(The Trainer's own flags: the Trainer stages are the Trainer's; the own RL loops refuse those they
do not implement, tests/test_rl_flags.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

READ_ONLY_WHEN = {
    "qlora": "acts at parse (4-bit NF4 with double quantization) "
    "and when the 4-bit weights are loaded",
    "shift_attn": "refused at parse when set",
    "overwrite_cache": "PT only; the other stages never cache tokenization (its help says so)",
    "test_file": "SFT with --predict_with_generate True; "
    "refused at parse elsewhere (args/checks.py check_test_file)",
    "validation_split_percentage": "read when no validation folder or files are given; "
    "the RL stages refuse it",
    "num_virtual_tokens": "prefix tuning only; refused at parse under LoRA or full training",
    "max_new_tokens": "SFT: with --predict_with_generate True only, refused at parse without it",
    "prompt_column": "acts at parse: chooses the two-text-field record format",
    "response_column": "acts at parse: chooses the two-text-field record format",
    "max_source_length": "acts at parse: sets --model_max_length (the seeds' spelling)",
    "max_target_length": "acts at parse: sets --model_max_length (the seeds' spelling)",
    "simpo_gamma": "--loss_type simpo only; refused at parse under another loss",
    "desirable_weight": "--loss_type kto only; refused at parse under another loss",
    "undesirable_weight": "--loss_type kto only; refused at parse under another loss",
    "reward_model_name_or_path": "GRPO family: when --reward_funcs includes model",
}
STAGES = ("pt", "sft", "rm", "dpo", "ppo", "grpo")


@pytest.fixture(scope="module")
def unread(tmp_path_factory) -> dict[str, dict[str, list[str]]]:
    found = {}
    for stage in STAGES:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.flag_audit", stage, str(tmp_path_factory.mktemp(stage))],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        found[stage] = json.loads(proc.stdout.strip().splitlines()[-1])
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_every_flag_of_the_stage_is_read_or_listed_with_its_condition(unread, stage):
    unexplained = {
        cls: [n for n in names if n not in READ_ONLY_WHEN] for cls, names in unread[stage].items()
    }
    assert not any(unexplained.values()), (
        f"{stage}: accepted, never read, not listed: {unexplained}"
    )


def test_no_entry_of_the_list_is_stale(unread):
    listed = {n for by_class in unread.values() for names in by_class.values() for n in names}
    assert set(READ_ONLY_WHEN) == listed, set(READ_ONLY_WHEN) ^ listed
