"""--compile_layers (pipeline/model/compiled.py): the parts of every decoder layer (attention, MLP,
norms) compiled by torch.compile with dynamic shapes, the rest eager. On the CPU the tiny model
compiles as on a GPU: under gradient checkpointing (the stages' default) the parts are captured
whole, with no graph break, and give the eager logits and gradients; a packed row of another length
does not recompile; SFT, DPO and RM runs with them train as the eager runs do; and the flag is
refused where it cannot act. Each run counts what dynamo captured: a compiled model that silently
ran eager would train the same numbers."""

from __future__ import annotations

import importlib
import json
import logging
import math

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from pipeline.errors import UserError
from pipeline.model.adapters import unwrap
from pipeline.model.compiled import compile_decoder_layers, is_compiled
from tests.helpers import DATA, train_sft


def _loss(model, ids):
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


@pytest.fixture(autouse=True)
def _no_silent_eager(monkeypatch):
    """Past the recompile limit dynamo would run the part eager behind a warning: here it fails."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)


def _fresh_counters():
    """dynamo's caches emptied and its counters zeroed: what it captures next is counted."""
    torch._dynamo.reset()
    counters.clear()
    return counters


# the one break allowed: transformers' output-recording hook on attention modules reads a
# ContextVar, which dynamo does not trace (the attention's own forward is compiled before it)
HOOK_BREAK = "method `get` of class `ContextVar`"


def _captured_whole(counts) -> bool:
    """Something was compiled, and no graph broke but at the output-recording hook."""
    breaks = [reason for reason in counts["graph_break"] if HOOK_BREAK not in reason]
    return counts["stats"]["unique_graphs"] > 0 and not breaks


def test_compiled_layers_compute_what_the_eager_ones_do(tiny_model):
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    compiled = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert compile_decoder_layers(compiled) == compiled.config.num_hidden_layers
    for model in (eager, compiled):  # as the stages train: checkpointed layers, training mode
        model.gradient_checkpointing_enable()
        model.train()  # (with `kernels` installed, this swaps the norms' forward)
    part_classes = {type(p) for m in compiled.model.layers for p in m.children() if is_compiled(p)}
    assert len(part_classes) == 3  # attention, MLP, RMSNorm
    counts = _fresh_counters()
    for length in (37, 53, 90):  # three lengths, one compilation (dynamic shapes)
        ids = torch.randint(0, compiled.config.vocab_size, (1, length))
        (a, ga), (b, gb) = _loss(eager, ids), _loss(compiled, ids)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
        assert len(ga) == len(gb) and all(
            torch.allclose(x, y, atol=1e-4, rtol=1e-4) for x, y in zip(ga, gb)
        )
    assert _captured_whole(counts), dict(counts["graph_break"])
    # one graph per part class, not one per length
    assert counts["stats"]["unique_graphs"] <= 2 * len(part_classes)


def _losses(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_an_sft_run_with_compiled_layers_trains_as_the_eager_one(tiny_model, tmp_path, caplog):
    common = ("--logging_steps", "1", "--gradient_checkpointing", "True")
    eager = train_sft(tiny_model, tmp_path / "eager", 4, *common)
    counts = _fresh_counters()
    with caplog.at_level(logging.INFO, logger="pipeline.model.compiled"):
        compiled = train_sft(
            tiny_model, tmp_path / "compiled", 4, *common, "--compile_layers", "True"
        )
    assert "layers compiled" in caplog.text
    assert _captured_whole(counts), dict(counts["graph_break"])
    a, b = _losses(eager), _losses(compiled)
    assert len(a) == len(b) == 4 and b[-1] < b[0]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3 * max(a)
    assert (compiled / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(compiled)  # a plain model folder
    assert not any("_orig_mod" in name for name, _ in reloaded.named_parameters())


@pytest.mark.parametrize(
    "flags, refused",
    [
        (("--use_liger_kernel", "True"), "drop --use_liger_kernel"),
        (("--deepspeed", "deepspeed_configs/zero2.json"), "not supported with --deepspeed"),
        (("--use_peft", "True", "--qlora", "True"), "does not compile quantized layers"),
        (("--use_peft", "True", "--use_dora", "True"), "does not compile DoRA adapters"),
    ],
)
def test_compile_layers_refused_where_it_cannot_act(tiny_model, tmp_path, flags, refused):
    with pytest.raises(UserError, match=refused):
        train_sft(tiny_model, tmp_path / "out", 1, "--compile_layers", "True", *flags)


def test_a_model_that_names_no_decoder_layer_is_refused(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model._no_split_modules = None  # as a remote-code model may leave it
    with pytest.raises(UserError, match="names no decoder layer class"):
        compile_decoder_layers(model)


PAIR_FLAGS = [
    *("--template_name", "qwen", "--train_file_dir", str(DATA / "reward")),
    *"--per_device_train_batch_size 8 --model_max_length 128 --max_steps 3 --seed 0".split(),
    *"--report_to none --logging_steps 1 --save_strategy no --learning_rate 1e-3".split(),
    *"--validation_split_percentage 0".split(),
]


@pytest.mark.parametrize(
    "stage, flags",
    [
        ("dpo", ("--use_peft", "True")),
        ("dpo", ("--use_peft", "True", "--loss_type", "kto")),
        ("rm", ("--use_peft", "False")),
    ],
    ids=["dpo-lora", "kto-lora", "rm-full"],
)
def test_pair_stages_train_with_compiled_layers_as_without(tiny_model, tmp_path, stage, flags):
    """DPO (a LoRA policy whose reference is the same layers with the adapter off) and the reward
    model take --compile_layers: their padding-free forward hands the compiled layers the rows'
    bounds, and the losses are the eager run's."""
    main = importlib.import_module(f"stages.{stage}").main
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile_layers", "True"))):
        counts = _fresh_counters()
        trainer = main(
            [
                "--model_name_or_path",
                str(tiny_model),
                "--output_dir",
                str(tmp_path / name),
                *PAIR_FLAGS,
                *flags,
                *extra,
            ]
        )
        runs[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        parts = [p for layer in unwrap(trainer.model).model.layers for p in layer.children()]
        assert all(is_compiled(p) for p in parts) == (name == "compiled")
        assert _captured_whole(counts) == (name == "compiled"), dict(counts["graph_break"])
    a, b = runs["eager"], runs["compiled"]
    assert len(a) == len(b) == 3 and all(math.isfinite(x) for x in b)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3 * max(abs(x) for x in a)
