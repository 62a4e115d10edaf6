"""Shared fixtures: the tiny model is built once per test session, in a temporary folder."""

from pathlib import Path

import pytest

from pipeline.tiny_model import build

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def read_scalars(logdir: Path, tag: str) -> list[float]:
    """Values of one scalar tag from the tensorboard event files under logdir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars(tag)]
    return values


@pytest.fixture(scope="session")
def sft_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model after full SFT on the learnable task (qwen template): the start point of RM and DPO."""
    return _sft(tiny_model, tmp_path_factory.mktemp("sft") / "sft", 150)


def _sft(tiny_model: Path, out: Path, steps: int) -> Path:
    from stages import sft

    sft.main(["--model_name_or_path", str(tiny_model), "--template_name", "qwen", "--train_file_dir", str(DATA / "sft"),
              "--validation_split_percentage", "0", "--output_dir", str(out), "--use_peft", "False",
              "--learning_rate", "3e-3", "--max_steps", str(steps), "--per_device_train_batch_size", "16",
              "--model_max_length", "128", "--report_to", "none", "--save_strategy", "no", "--seed", "0"])
    return out


@pytest.fixture(scope="session")
def weak_sft_model(tiny_model, tmp_path_factory) -> Path:
    """A partly trained SFT policy (80 steps: right format, about a third of the held-out colours right),
    the start point where DPO and the RL stages have room to improve greedy answers."""
    return _sft(tiny_model, tmp_path_factory.mktemp("weak-sft") / "sft", 80)


@pytest.fixture(scope="session")
def reward_model(sft_model, tmp_path_factory) -> Path:
    """A full reward model trained from the SFT model on the learnable preference pairs."""
    from stages import rm

    out = tmp_path_factory.mktemp("rm") / "rm"
    rm.main(["--model_name_or_path", str(sft_model), "--output_dir", str(out), "--validation_file_dir",
             str(DATA / "reward_eval"), "--use_peft", "False", "--learning_rate", "1e-3", "--max_steps", "400",
             "--template_name", "qwen", "--train_file_dir", str(DATA / "reward"), "--per_device_train_batch_size", "16",
             "--model_max_length", "128", "--report_to", "none", "--logging_steps", "50", "--save_strategy", "no",
             "--seed", "0"])
    return out
