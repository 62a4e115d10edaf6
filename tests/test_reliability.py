"""Nothing silently wrong off the happy path: a diverged run is never saved as a model, the start
model and the data are never written to, every numeric flag has a range, DeepSpeed files and damaged
model folders are named, a full or read-only disk is one sentence. Each test drives the real stage
(or the real Trainer)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import typing
from importlib import import_module
from pathlib import Path

import pytest
import torch

from pipeline.args.checks import NUMBER_BOUNDS, UNBOUNDED
from pipeline.errors import UserError, run_cli
from pipeline.run.checkpoints import is_complete
from tests.helpers import DATA, REPO, read_scalars

STAGES = ("pt", "sft", "rm", "dpo", "ppo", "grpo")


def stage_argv(stage: str, model, out, *extra, reward=None) -> list[str]:
    """A small valid command line for `stage` on the shipped data."""
    data = {
        "pt": DATA / "pt",
        "sft": DATA / "sft",
        "rm": DATA / "reward",
        "dpo": DATA / "reward",
        "ppo": DATA / "sft",
        "grpo": DATA / "sft",
    }[stage]
    argv = [
        "--model_name_or_path",
        str(model),
        "--train_file_dir",
        str(data),
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--max_steps",
        "8",
        "--logging_steps",
        "1",
        "--seed",
        "0",
    ]
    if stage == "pt":
        argv += ["--block_size", "64"]
    else:
        argv += ["--template_name", "qwen", "--model_max_length", "128"]
    if stage in ("ppo", "grpo"):
        argv += ["--max_new_tokens", "8", "--per_device_train_batch_size", "8"]
        argv += ["--reward_model_name_or_path", str(reward)] if reward else []
        argv += ["--reward_funcs", "model"] if stage == "grpo" else []
    return argv + list(extra)


def run_stage(stage: str, argv: list[str], capsys) -> tuple[int, str]:
    """The stage as its command runs it (run_cli): (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: (import_module(f"stages.{stage}").main(argv), sys.exit(0)))
    return stop.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def untrained_rm(tiny_model, tmp_path_factory) -> Path:
    """A reward model of the tiny shape after one RM step (a score head from the RM stage
    itself)."""
    from stages import rm

    out = tmp_path_factory.mktemp("rm") / "rm"
    rm.main(stage_argv("rm", tiny_model, out, "--max_steps", "1", "--use_peft", "False"))
    return out


# ---------------------------------------------- 1. diverged training is never saved


def finite_weights(folder: Path) -> bool:
    from safetensors.torch import load_file

    return all(
        torch.isfinite(t).all()
        for f in folder.glob("*.safetensors")
        for t in load_file(str(f)).values()
    )


def test_diverged_sft_logs_nan_stops_and_keeps_the_checkpoint_before(tiny_model, tmp_path, capsys):
    out = tmp_path / "sft"
    argv = stage_argv(
        "sft",
        tiny_model,
        out,
        "--use_peft",
        "False",
        "--learning_rate",
        "1e10",
        "--save_steps",
        "1",
        "--report_to",
        "tensorboard",
        "--per_device_train_batch_size",
        "4",
        "--packing",
        "False",
    )
    code, err = run_stage("sft", argv, capsys)
    assert code == 2 and "Traceback" not in err
    sentence = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(sentence) == 1 and "diverged" in sentence[0] and "last finite loss" in sentence[0], (
        err
    )
    assert "--learning_rate" in sentence[0]
    assert not list(out.glob("*.safetensors")) and not (out / "train_results.json").exists()
    # the step before the divergence was checkpointed whole and finite; no checkpoint of a
    # non-finite step exists
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1"], checkpoints
    assert is_complete(checkpoints[0]) and finite_weights(checkpoints[0])
    # the non-finite loss is logged as NaN, never as 0
    losses = read_scalars(out / "logs", "train/loss")
    assert (
        math.isfinite(losses[0]) and any(math.isnan(v) for v in losses[1:]) and 0.0 not in losses
    ), losses


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage,extra",
    [
        ("pt", ()),
        ("rm", ()),
        ("dpo", ()),
        ("dpo", ("--loss_type", "kto")),
        ("dpo", ("--loss_type", "orpo")),
        ("ppo", ()),
        ("grpo", ()),
    ],
)
def test_every_stage_stops_a_diverged_run_without_a_model(
    stage, extra, tiny_model, untrained_rm, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = stage_argv(
        stage,
        tiny_model,
        out,
        "--use_peft",
        "False",
        "--learning_rate",
        "1e10",
        *extra,
        reward=untrained_rm,
    )
    code, err = run_stage(stage, argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "diverged" in err and "no model was saved" in err, err
    assert not list(out.glob("*.safetensors")) and not (out / "adapter_config.json").exists()


class NaNOnce:
    """A fault: the embedding output of the `at`-th training forward pass is NaN (a bad batch),
    once."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, module, inputs, output):
        if module.training:
            self.calls += 1
            if self.calls == self.at:
                return output * float("nan")
        return output


def guarded_trainer(model, tmp_path, limit: int = 3, **args):
    """A plain Trainer on 32 short rows of the tiny model (CPU, every step logged, no
    `logging_nan_inf_filter`) with the divergence guard: (trainer, guard)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from pipeline.train.divergence import DivergenceGuard

    ids = [list(range(5 + i, 37 + i)) for i in range(32)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        logging_nan_inf_filter=False,
        **{"save_strategy": "no", **args},
    )
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    trainer = Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data.select(range(8))
    )
    guard = DivergenceGuard(trainer, limit=limit)
    trainer.add_callback(guard)
    return trainer, guard


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_one_nonfinite_step_is_skipped_and_training_goes_on(optim, tiny_model, tmp_path):
    """A single NaN batch: logged as NaN, its optimizer step skipped (weights unchanged and finite),
    counted, and the steps after it train and log finite losses again. A fused AdamW skips it
    itself (found_inf, no host read); another optimizer has the gradients dropped."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.get_input_embeddings().register_forward_hook(NaNOnce(at=2))
    trainer, guard = guarded_trainer(model, tmp_path, max_steps=5, learning_rate=1e-3, optim=optim)
    weights = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            weights[state.global_step] = model.model.layers[0].mlp.up_proj.weight.detach().clone()

    trainer.add_callback(Snapshot())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and math.isnan(losses[1]), losses
    assert all(math.isfinite(v) for i, v in enumerate(losses) if i != 1), losses
    assert guard.steps.total == 1
    assert torch.equal(weights[1], weights[2]), "the NaN step was applied"
    assert not torch.equal(weights[2], weights[3]) and all(
        torch.isfinite(p).all() for p in model.parameters()
    )


def test_a_nonfinite_last_step_of_an_epoch_is_not_checkpointed(tiny_model, tmp_path):
    """Steps are read one step late, except where a checkpoint is due: a NaN step that ends an epoch
    (save_strategy epoch) is judged before that save, which is skipped; the next epoch trains on
    and is saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.get_input_embeddings().register_forward_hook(NaNOnce(at=8))  # epoch 1's last step
    trainer, guard = guarded_trainer(
        model, tmp_path, num_train_epochs=2, learning_rate=1e-3, save_strategy="epoch"
    )
    trainer.train()
    assert guard.steps.total == 1 and trainer.state.global_step == 16
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-16"]


@pytest.mark.parametrize(
    "case",
    [
        "last step, epoch saves",
        "stopped as by SIGTERM",
        "evaluated, best saved",
        "stopped by max_steps",
    ],
)
def test_a_nonfinite_step_is_never_checkpointed_however_its_save_comes(case, tiny_model, tmp_path):
    """The step read late must still be judged before any save of it: at the end of training under
    epoch saves, a stop with a save asked at the step's end (what a SIGTERM does), an evaluation
    that saves a new best (no callback runs between), and the end of max_steps."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.get_input_embeddings().register_forward_hook(NaNOnce(at=4))
    args = {
        "last step, epoch saves": dict(max_steps=4, save_strategy="epoch"),
        "stopped as by SIGTERM": dict(max_steps=8, save_strategy="epoch"),
        "evaluated, best saved": dict(
            max_steps=8,
            eval_strategy="steps",
            eval_steps=4,
            save_strategy="best",
            metric_for_best_model="loss",
        ),
        "stopped by max_steps": dict(max_steps=4, save_strategy="steps", save_steps=4),
    }[case]
    limit = 1 if case.startswith("evaluated") else 3
    trainer, guard = guarded_trainer(model, tmp_path, limit=limit, learning_rate=1e-3, **args)

    class Stop(TrainerCallback):  # asks what CheckpointGuard asks on SIGTERM, at step 4
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_save = control.should_training_stop = True
            return control

    if case == "stopped as by SIGTERM":
        trainer.callback_handler.callbacks.insert(1, Stop())  # before the guard, as in the stages
    if limit == 1:
        with pytest.raises(UserError, match="step 4 was not finite"):
            trainer.train()
    else:
        trainer.train()
    assert trainer.state.global_step == 4 and guard.was_skipped(4)
    assert not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the late read copies from a GPU")
def test_a_step_read_late_from_the_gpu_reads_its_own_values():
    """A step's values copied to pinned memory behind an event read back as they were when the
    step queued them: read() waits for the copy (queued behind other GPU work), and later work on
    the tensor they came from does not reach them."""
    from pipeline.train.divergence import Reading, judge, step_values

    values = step_values(
        torch.tensor(2.5, device="cuda"), torch.tensor(float("nan"), device="cuda")
    )
    torch.cuda._sleep(100_000_000)  # the copy is queued behind GPU work: read() must wait for it
    reading = Reading(7, values, True)
    values.fill_(0.0)  # later work on the same tensor, queued after the copy
    assert reading.step == 7
    loss_read, grad = judge(reading.read(), True)
    assert loss_read == 2.5 and math.isnan(grad)


def test_the_sigterm_message_says_when_the_last_step_was_not_checkpointed(caplog):
    from pipeline.run.checkpoints import PREEMPTED_EXIT, exit_preempted

    for saved, said in ((True, "saved checkpoint-7"), (False, "not checkpointed")):
        with caplog.at_level("WARNING"), pytest.raises(SystemExit) as stop:
            exit_preempted(7, saved=saved)
        assert stop.value.code == PREEMPTED_EXIT and said in caplog.text
        caplog.clear()


def test_a_fused_optimizer_skips_a_flagged_step_under_master_weights():
    """--master_weights optimizer steps its inner AdamW a chunk at a time; `found_inf` set by the
    guard on that inner (fused) optimizer leaves every master, weight and step count as it was."""
    from pipeline.train.divergence import skips_on_device
    from pipeline.train.master_weights import MasterWeightsAdamW

    weights = [torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16)) for _ in range(3)]
    optimizer = MasterWeightsAdamW([{"params": weights, "lr": 0.1}], {"lr": 0.1})
    assert skips_on_device(optimizer) is None  # unfused on the CPU: the guard drops the gradients
    masters = optimizer.masters()
    optimizer.inner = torch.optim.AdamW([{"params": masters, "lr": 0.1}], fused=True)
    optimizer.CHUNK_ELEMENTS = 16  # one weight a chunk
    inner = skips_on_device(optimizer)
    assert inner is optimizer.inner
    for w in weights:
        w.grad = torch.ones_like(w)
    optimizer.step()
    before = [w.detach().clone() for w in weights]
    steps = [s["step"].clone() for s in inner.state.values()]
    inner.found_inf = torch.tensor(1.0)
    optimizer.step()
    assert all(torch.equal(a, w) for a, w in zip(before, weights))
    assert all(torch.equal(a, s["step"]) for a, s in zip(steps, inner.state.values()))
    inner.found_inf = torch.tensor(0.0)
    optimizer.step()
    assert not any(torch.equal(a, w) for a, w in zip(before, weights))


class Constant:
    """A fault: the final norm's output is zero from the first training pass on, so the logits no
    longer depend on any weight (what a run that collapsed to finite garbage looks like: loss
    ln(vocab), gradient exactly 0)."""

    def __call__(self, module, inputs, output):
        return output * 0 if module.training else output


def test_a_collapsed_run_with_a_zero_gradient_stops_without_a_model(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.model.norm.register_forward_hook(Constant())
    trainer, _ = guarded_trainer(model, tmp_path, max_steps=6)
    with pytest.raises(
        UserError, match="cannot learn any more: the last 3 steps .* gradient norm of exactly 0"
    ):
        trainer.train()
    # each step is read one step later (no host wait on the GPU at every step): the third stalled
    # step is judged at the end of the fourth
    assert trainer.state.global_step == 4


def _agree_on_two_ranks(rank: int, port: int, losses: list[float], out: str) -> None:
    import torch.distributed as dist

    from pipeline.train.divergence import judge, step_values

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        values = step_values(torch.tensor(losses[rank], dtype=torch.float64), torch.zeros(()))
        Path(out, f"{rank}.json").write_text(json.dumps(judge(values.tolist(), True)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("losses,expected", [((0.0, 0.5), 0.5), ((0.7, float("nan")), "nan")])
def test_ranks_judge_a_step_alike(losses, expected, tmp_path):
    """Rank 0's own loss is 0 (or finite) while rank 1's is not: both must see the same step, or one
    rank stops (collapsed / diverged) while the other waits for it in the next collective."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_agree_on_two_ranks, args=(port, list(losses), str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1], seen
    loss, grad = seen[0]
    assert (math.isnan(loss) if expected == "nan" else loss == expected) and grad == 0.0


def test_generation_from_nan_weights_is_an_error_not_a_crash(tiny_model):
    from transformers import AutoModelForCausalLM

    from pipeline.infer.generation import NonFiniteLogits, generate, sampling_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    ids = torch.tensor([[5, 6, 7]])
    config = sampling_config(model.generation_config, 4, temperature=1.0)
    with pytest.raises(NonFiniteLogits):
        generate(model, ids, torch.ones_like(ids), config)
    out = generate(model, ids, torch.ones_like(ids), config, allow_nonfinite=True)
    assert out.nonfinite and out.responses.shape == (1, 4)


# ---------------------------------------------- 2. the start model and the data are never written


def folder_state(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("where", ["model", "inside-model", "inside-data", "reward"])
def test_output_dir_never_lands_on_what_the_run_reads(
    stage, where, tiny_model, untrained_rm, tmp_path
):
    if where == "reward" and stage not in ("ppo", "grpo"):
        pytest.skip("only the RL stages read a reward model")
    model = tmp_path / "start"
    shutil.copytree(tiny_model, model)
    data = tmp_path / "data"
    shutil.copytree(stage_argv(stage, model, "x")[3], data)
    out = {
        "model": model,
        "inside-model": model / "run",
        "inside-data": data / "run",
        "reward": untrained_rm,
    }[where]
    before = folder_state(model), folder_state(untrained_rm)
    argv = stage_argv(
        stage,
        model,
        out,
        "--overwrite_output_dir",
        "True",
        "--resume_from_checkpoint",
        "auto",
        reward=untrained_rm,
    )
    argv[argv.index("--train_file_dir") + 1] = str(data)
    with pytest.raises(UserError, match="--output_dir .* (is the folder|is inside) of --"):
        import_module(f"stages.{stage}").main(argv)
    assert (folder_state(model), folder_state(untrained_rm)) == before


def test_a_start_model_inside_the_runs_checkpoints_is_refused(tiny_model, tmp_path):
    from stages import sft

    out = tmp_path / "out"
    shutil.copytree(tiny_model, out / "checkpoint-3")
    with pytest.raises(UserError, match="lies inside --output_dir"):
        sft.main(stage_argv("sft", out / "checkpoint-3", out, "--resume_from_checkpoint", "auto"))


# ---------------------------------------------- 6. numbers, DeepSpeed files, damaged folders, disks


def numeric_fields() -> dict[str, str]:
    """Every numeric flag of every stage -> a stage that takes it."""
    found = {}
    for stage in STAGES:
        for cls in import_module(f"stages.{stage}").ARGUMENTS:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                kind = str(hints[f.name])
                if (
                    f.init
                    and "str" not in kind
                    and "bool" not in kind
                    and ("int" in kind or "float" in kind)
                ):
                    found.setdefault(f.name, stage)
    return found


def test_every_numeric_flag_has_a_stated_range():
    unstated = sorted(set(numeric_fields()) - set(NUMBER_BOUNDS) - UNBOUNDED)
    assert not unstated, (
        "give these flags a range in pipeline/args/checks.py NUMBER_BOUNDS "
        f"(or list them UNBOUNDED): {unstated}"
    )


def out_of_range(bounds) -> float:
    low, low_ok, high, high_ok = bounds
    if low is not None:
        return low - 1 if low_ok else low
    return high + 1 if high_ok else high


@pytest.mark.parametrize("name", sorted(NUMBER_BOUNDS))
def test_a_number_out_of_its_range_is_refused_naming_the_flag(
    name, tiny_model, untrained_rm, tmp_path
):
    stage = numeric_fields().get(name)
    if stage is None:
        pytest.skip(f"no stage takes --{name}")
    value = out_of_range(NUMBER_BOUNDS[name])
    argv = stage_argv(
        stage, tiny_model, tmp_path / "out", f"--{name}", f"{value:g}", reward=untrained_rm
    )
    with pytest.raises(
        UserError, match=f"--{name}\\b"
    ):  # the table's sentence, or the owning class's own check
        import_module(f"stages.{stage}").parse(argv)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "pt", "ppo", "grpo"])
def test_max_steps_zero_is_refused_in_every_stage(stage, tiny_model, untrained_rm, tmp_path):
    # transformers trains one step at --max_steps 0 (and the run exits 0)
    argv = stage_argv(stage, tiny_model, tmp_path / "o", "--max_steps", "0", reward=untrained_rm)
    with pytest.raises(UserError, match="--max_steps 0 would train nothing"):
        import_module(f"stages.{stage}").parse(argv)


@pytest.mark.parametrize("stage, flag", [("sft", "--model_max_length"), ("pt", "--block_size")])
def test_a_length_past_the_models_positions_is_said(stage, flag, tiny_model, tmp_path, caplog):
    module = import_module(f"stages.{stage}")
    caplog.set_level(logging.WARNING, logger="pipeline")
    module.parse(stage_argv(stage, tiny_model, tmp_path / "o", flag, "4096"))
    said = [r.getMessage() for r in caplog.records if "positions" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{flag} 4096 is above the 1024 positions")
    caplog.clear()
    module.parse(stage_argv(stage, tiny_model, tmp_path / "o", flag, "1024"))
    module.parse(
        stage_argv(stage, tiny_model, tmp_path / "o", flag, "4096", "--rope_scaling", "linear")
    )
    assert not [r for r in caplog.records if "positions the model never saw" in r.getMessage()]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(value, tiny_model, tmp_path):
    from stages import sft

    with pytest.raises(UserError, match="--learning_rate must be a finite number"):
        sft.parse(stage_argv("sft", tiny_model, tmp_path / "o", "--learning_rate", value))


def test_negative_numbers_parse_as_values(tiny_model, tmp_path):
    from stages import rm

    *_, training_args = rm.parse(
        stage_argv(
            "rm",
            tiny_model,
            tmp_path / "o",
            "--max_steps",
            "-1",
            "--num_train_epochs",
            "1",
            "--center_rewards_coefficient",
            "1e-2",
            "--local_rank",
            "-1",
        )
    )
    assert training_args.max_steps == -1 and training_args.center_rewards_coefficient == 1e-2
    with pytest.raises(
        UserError, match="--learning_rate must be > 0, got -0.001"
    ):  # a range error, not a usage dump
        rm.parse(stage_argv("rm", tiny_model, tmp_path / "o", "--learning_rate", "-1e-3"))


def test_deepspeed_config_mistakes_name_the_file(tiny_model, tmp_path):
    from stages import sft

    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "train_batch_size": "auto",\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(UserError, match=r"ds.json:3: not valid JSON"):
        sft.parse(stage_argv("sft", tiny_model, tmp_path / "o", "--deepspeed", str(bad)))
    bad.write_text(json.dumps({"train_batch_size": 64, "gradient_accumulation_steps": "auto"}))
    with pytest.raises(UserError, match="train_batch_size 64 but the flags give 16"):
        sft.parse(
            stage_argv(
                "sft",
                tiny_model,
                tmp_path / "o",
                "--deepspeed",
                str(bad),
                "--per_device_train_batch_size",
                "4",
                "--gradient_accumulation_steps",
                "4",
            )
        )
    bad.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    with pytest.raises(
        UserError, match="gradient_accumulation_steps 2 but --gradient_accumulation_steps is 1"
    ):
        sft.parse(stage_argv("sft", tiny_model, tmp_path / "o", "--deepspeed", str(bad)))
    # values the Trainer would only compare when training starts (a traceback then): one sentence
    # now
    bad.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "gradient_clipping": 0.5,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            }
        )
    )
    with pytest.raises(
        UserError,
        match=r"gradient_clipping=0.5 in the file but --max_grad_norm=1.0; optimizer.params.lr=",
    ):
        sft.parse(
            stage_argv(
                "sft",
                tiny_model,
                tmp_path / "o",
                "--deepspeed",
                str(bad),
                "--learning_rate",
                "2e-4",
            )
        )


def clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "LOCAL_WORLD_SIZE",
        )
    }


@pytest.mark.slow
def test_deepspeed_without_a_launcher_runs_as_one_process(tiny_model, tmp_path):
    out = tmp_path / "ds"
    argv = stage_argv(
        "sft",
        tiny_model,
        out,
        "--use_peft",
        "False",
        "--max_steps",
        "2",
        "--deepspeed",
        str(REPO / "deepspeed_configs" / "zero2.json"),
    )
    proc = subprocess.run(
        [sys.executable, "stages/sft.py", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "without a launcher" in proc.stdout + proc.stderr
    assert (out / "model.safetensors").is_file() and finite_weights(out)


def test_damaged_model_folders_are_named_before_loading(tiny_model, tmp_path):
    from pipeline.model.integrity import check_folder_whole

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    check_folder_whole(folder, "--model_name_or_path")  # whole: passes
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(UserError, match=r"model.safetensors is truncated: \d+ of \d+ bytes"):
        check_folder_whole(folder, "--model_name_or_path")
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="damaged or truncated"):
        check_folder_whole(folder, "--model_name_or_path")
    weights.write_bytes(data)
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(UserError, match=r"config.json:1: not valid JSON"):
        check_folder_whole(folder, "--model_name_or_path")


def test_merge_and_chat_name_a_damaged_adapter(tiny_model, tmp_path, capsys):
    from pipeline.infer.chat_model import load_chat_model
    from stages import sft

    adapter = tmp_path / "lora"
    sft.main(stage_argv("sft", tiny_model, adapter, "--max_steps", "1", "--save_strategy", "no"))
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    proc = subprocess.run(
        [
            sys.executable,
            "merge_peft_adapter.py",
            "--base_model",
            str(tiny_model),
            "--lora_model",
            str(adapter),
            "--output_dir",
            str(tmp_path / "merged"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "truncated" in proc.stderr, (
        proc.stderr[-2000:]
    )
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"')
    with pytest.raises(UserError, match=r"adapter_config.json:1: not valid JSON"):
        load_chat_model(str(adapter))


def unshare_available() -> bool:
    try:
        return (
            subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def in_small_disk(
    folder: Path, mount_options: str, command: list[str]
) -> subprocess.CompletedProcess:
    """Run `command` with a tmpfs (mount_options) on `folder`, in a private mount namespace (no root
    needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o {mount_options} tmpfs {folder} && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )


@pytest.mark.skipif(
    not unshare_available(), reason="needs user namespaces (unshare -rm) to mount a small tmpfs"
)
def test_a_full_disk_during_a_checkpoint_is_one_sentence_and_keeps_the_last_checkpoint(
    tiny_model, tmp_path
):
    out = tmp_path / "full"
    # one checkpoint of the tiny model (weights + Adam state) takes ~6 MB: the second one does not
    # fit
    argv = stage_argv(
        "sft", tiny_model, out, "--use_peft", "False", "--max_steps", "3", "--save_steps", "1"
    )
    proc = in_small_disk(out, "size=9m", [sys.executable, "stages/sft.py", *argv])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert (
        "no space left on device" in errors[0]
        and str(out) in errors[0]
        and "checkpoint-1 stays" in errors[0]
    )


@pytest.mark.skipif(
    not unshare_available(), reason="needs user namespaces (unshare -rm) to mount a read-only tmpfs"
)
def test_a_read_only_output_folder_is_refused_before_work(tiny_model, tmp_path):
    out = tmp_path / "ro"
    proc = in_small_disk(
        out,
        "ro,size=1m",
        [sys.executable, "stages/pt.py", *stage_argv("pt", tiny_model, out / "run")],
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot be written" in proc.stderr and "read-only" in proc.stderr
