"""Host work the causal-LM Trainer does once instead of at every micro-step (a small step on a GPU
is bound by its Python time: bench/results): the weights counted for the FLOPs estimate. The test
shows the work is done once and the result equals the Trainer's own, which recounts every step."""

from __future__ import annotations

import json

from transformers import PreTrainedModel, Trainer

from pipeline.train.causal_lm import CausalLMTrainer
from tests.helpers import train_sft


def test_the_flops_estimate_counts_the_weights_once(tiny_model, tmp_path, monkeypatch):
    counted = []
    count = PreTrainedModel.num_parameters

    def counting(self, *args, **kwargs):
        counted.append(kwargs.get("exclude_embeddings", False))
        return count(self, *args, **kwargs)

    def total_flos(out):
        return json.loads((out / "trainer_state.json").read_text())["total_flos"]

    monkeypatch.setattr(PreTrainedModel, "num_parameters", counting)
    once = train_sft(tiny_model, tmp_path / "once", 4, "--logging_steps", "1")
    assert counted.count(True) == 1  # four micro-steps, one count
    counted.clear()
    monkeypatch.setattr(CausalLMTrainer, "floating_point_ops", Trainer.floating_point_ops)
    every = train_sft(tiny_model, tmp_path / "every", 4, "--logging_steps", "1")
    assert counted.count(True) == 4  # the Trainer's own: a count each micro-step
    assert total_flos(once) == total_flos(every) > 0
