"""--gradient_checkpointing_kwargs, transformers' own options of checkpointing, act in every stage:
`every_n_layers` recomputes only every n-th decoder layer (a small step spends a third of its layer
calls recomputing; fewer recomputed layers trade memory back for speed), `offload` keeps the saved
activations in host memory (GPU only). The Trainer stages pass them to transformers; the RL loops
pass them on themselves. Values that cannot act are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Trainer

from pipeline.errors import UserError
from stages import grpo, sft
from tests.helpers import DATA, train_sft
from tests.test_grpo_own import flags as grpo_flags


def _watch_layers(monkeypatch, method_owner, method: str) -> list[list[bool]]:
    """Record, at each call of `method_owner.method`, which decoder layers of its model recompute
    their activations."""
    seen: list[list[bool]] = []
    original = getattr(method_owner, method)

    def watched(self, *args, **kwargs):
        model = getattr(self, "model", None) or getattr(self, "policy", None)
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        seen.append([bool(layer.gradient_checkpointing) for layer in layers])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(method_owner, method, watched)
    return seen


def _losses(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_sft_recomputes_every_second_layer_and_trains_the_same(tiny_model, tmp_path, monkeypatch):
    seen = _watch_layers(monkeypatch, Trainer, "training_step")
    every = train_sft(tiny_model, tmp_path / "every", 3, "--logging_steps", "1")
    assert seen[-1] == [True, True]
    seen.clear()
    half = train_sft(
        tiny_model,
        tmp_path / "half",
        3,
        "--logging_steps",
        "1",
        "--gradient_checkpointing_kwargs",
        '{"every_n_layers": 2}',
    )
    assert seen[-1] == [True, False]  # the tiny model's two layers: the first recomputes
    a, b = _losses(every), _losses(half)
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5 * max(a)  # recomputation changes no number


def test_the_rl_loop_passes_the_options_on(tiny_model, tmp_path, monkeypatch):
    from pipeline.rl import models

    seen = []
    original = models.prepare_for_rl

    def watched(model, gradient_checkpointing, options=None):
        original(model, gradient_checkpointing, options)
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        seen.append([bool(layer.gradient_checkpointing) for layer in layers])

    monkeypatch.setattr("pipeline.rl.loop.prepare_for_rl", watched)
    grpo.main(
        grpo_flags(
            tiny_model,
            tmp_path / "grpo",
            "--max_steps",
            "1",
            "--gradient_checkpointing",
            "True",
            "--gradient_checkpointing_kwargs",
            '{"every_n_layers": 2}',
        )
    )
    assert seen == [[True, False]]


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto"])
def test_dpo_and_kto_keep_the_layers_choice_around_the_reference_forward(
    tiny_model, tmp_path, monkeypatch, loss_type
):
    """trl pauses checkpointing for the reference forward of every step; afterwards each layer
    has its own setting back (trl's own helper sent every_n_layers to torch's checkpoint, which
    stopped the run at the second step)."""
    from stages import dpo
    from tests.test_compiled_layers import PAIR_FLAGS

    seen = _watch_layers(monkeypatch, Trainer, "training_step")
    trainer = dpo.main(
        [
            *("--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "d")),
            *PAIR_FLAGS,
            *("--use_peft", "True", "--loss_type", loss_type),
            *("--gradient_checkpointing_kwargs", '{"every_n_layers": 2}'),
        ]
    )
    assert trainer.state.global_step == 3
    assert seen == [[True, False]] * 3


def test_trl_group_trainers_refuse_what_they_would_hand_to_torch(tiny_model, tmp_path):
    """trl's GRPO/RLOO trainers re-enable checkpointing with the options passed to torch's
    checkpoint, which refuses every_n_layers: said before the run, not at its first step."""
    with pytest.raises(UserError, match="use --rl_engine own"):
        grpo.parse(
            grpo_flags(
                tiny_model,
                tmp_path / "g",
                *("--rl_engine", "trl", "--gradient_checkpointing", "True"),
                *("--gradient_checkpointing_kwargs", '{"every_n_layers": 2}'),
            )
        )


@pytest.mark.parametrize(
    "extra, refused",
    [
        (
            ("--gradient_checkpointing_kwargs", '{"every_n_layers": 0}'),
            "every_n_layers must be a whole number >= 1",
        ),
        (
            ("--gradient_checkpointing_kwargs", '{"every_n_layers": 1.5}'),
            "every_n_layers must be a whole number >= 1",
        ),
        (
            ("--gradient_checkpointing_kwargs", '{"offload": "yes"}'),
            "offload must be true or false",
        ),
        (("--gradient_checkpointing_kwargs", "{every_n_layers: 2}"), "is not valid JSON"),
        (("--gradient_checkpointing_kwargs", "every_n_layers=2"), "takes a JSON object"),
        (
            ("--gradient_checkpointing", "False", "--gradient_checkpointing_kwargs", "{}"),
            None,
        ),
        (
            (
                "--gradient_checkpointing",
                "False",
                "--gradient_checkpointing_kwargs",
                '{"every_n_layers": 2}',
            ),
            "acts only with gradient checkpointing on",
        ),
        (
            (
                "--peft_type",
                "prefix_tuning",
                "--gradient_checkpointing_kwargs",
                '{"offload": false}',
            ),
            "prefix_tuning turns off",
        ),
    ],
)
def test_options_that_cannot_act_are_refused(tiny_model, tmp_path, extra, refused):
    argv = [
        *("--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "x")),
        *("--train_file_dir", str(DATA / "sft")),
        *extra,
    ]
    if refused is None:
        sft.parse(argv)  # an empty object asks for nothing: accepted
        return
    with pytest.raises(UserError, match=refused):
        sft.parse(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_offload_is_refused_without_a_gpu(tiny_model, tmp_path):
    with pytest.raises(UserError, match="offload keeps the saved activations in pinned host"):
        sft.parse(
            [
                *("--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "x")),
                *("--train_file_dir", str(DATA / "sft")),
                *("--gradient_checkpointing_kwargs", '{"offload": true}'),
            ]
        )
