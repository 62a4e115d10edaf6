"""Shared fixtures: the tiny model is built once per test session, in a temporary folder, and the
SFT and reward models the later stages start from are trained once from it."""

from pathlib import Path

import pytest

from pipeline.model.tiny_model import build
from tests.helpers import DATA, train_sft


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def sft_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model after full SFT on the learnable task (qwen template): the start point of RM
    and DPO. Unpacked like weak_sft_model, so the reward model the RL tests score with stays the one
    they were measured with; packed SFT is tested in test_sft.py and by the demo pipeline."""
    return train_sft(tiny_model, tmp_path_factory.mktemp("sft") / "sft", 150, "--packing", "False")


@pytest.fixture(scope="session")
def weak_sft_model(tiny_model, tmp_path_factory) -> Path:
    """A partly trained SFT policy (80 unpacked steps: right format, about a third of the held-out
    colours right), the start point where DPO and the RL stages have room to improve greedy answers.
    Unpacked, so the start point stays the one their thresholds were measured from (packing puts ~2
    samples in a step row and trains faster per step)."""
    return train_sft(
        tiny_model, tmp_path_factory.mktemp("weak-sft") / "sft", 80, "--packing", "False"
    )


@pytest.fixture(scope="session")
def reward_model(sft_model, tmp_path_factory) -> Path:
    """A full reward model trained from the SFT model on the learnable preference pairs. Unpadded
    like the SFT fixtures: packed pairs compute the same rewards only to float rounding
    (tests/test_pair_packing.py), and the PPO tests' thresholds were measured against this reward
    model; packed RM is tested in test_rm.py."""
    from stages import rm

    out = tmp_path_factory.mktemp("rm") / "rm"
    rm.main(
        [
            "--model_name_or_path",
            str(sft_model),
            "--output_dir",
            str(out),
            "--validation_file_dir",
            str(DATA / "reward_eval"),
            "--use_peft",
            "False",
            "--learning_rate",
            "1e-3",
            "--max_steps",
            "400",
            "--template_name",
            "qwen",
            "--train_file_dir",
            str(DATA / "reward"),
            "--per_device_train_batch_size",
            "16",
            "--model_max_length",
            "128",
            "--report_to",
            "none",
            "--logging_steps",
            "50",
            "--save_strategy",
            "no",
            "--seed",
            "0",
            "--packing",
            "False",
        ]
    )
    return out


# Fixtures that train a model first: a test that uses one (directly or through another fixture) is
# slow.
TRAINED_FIXTURES = {"sft_model", "weak_sft_model", "reward_model", "demo"}


def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test that needs a trained model, besides those marked by hand, so that
    `python -m pytest -m "not slow"` is the fast inner loop."""
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
