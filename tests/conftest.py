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
