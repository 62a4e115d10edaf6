"""--master_weights optimizer (pipeline/train/master_weights.py): bf16 weights in the model, float32
masters in the optimizer; the default (auto) takes it where it applies with one micro-batch a
step. The optimizer's arithmetic equals torch's AdamW on float32 weights given
the same gradients, follows the Trainer's learning-rate schedule and resumes exactly; an SFT run
with it trains like the default, saves the masters, resumes from its checkpoint to the uninterrupted
run's weights, and is refused where it would do nothing."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import UserError
from pipeline.train.master_weights import MasterWeightsAdamW
from tests.helpers import train_sft


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    reference = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    half = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in reference]
    with (
        torch.no_grad()
    ):  # the reference starts from the bf16 values too (as the masters of a bf16 model do)
        for r, h in zip(reference, half):
            r.copy_(h)
    groups = lambda ps: [  # noqa: E731
        {"params": [ps[0]], "weight_decay": 0.1},
        {"params": [ps[1]], "weight_decay": 0.0},
    ]
    ref_opt = torch.optim.AdamW(groups(reference), lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    opt = MasterWeightsAdamW.replacing(
        torch.optim.AdamW(groups(half), lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    )
    return reference, ref_opt, half, opt


def _steps(reference, ref_opt, half, opt, n: int, start: int = 0, schedules=()):
    for step in range(start, start + n):
        torch.manual_seed(100 + step)
        for r, h in zip(reference, half):
            grad = torch.randn_like(r).to(
                torch.bfloat16
            )  # the model's backward gives bf16 gradients
            r.grad, h.grad = grad.float(), grad.clone()
        ref_opt.step(), opt.step()
        for s in schedules:
            s.step()
        ref_opt.zero_grad(set_to_none=True), opt.zero_grad(set_to_none=True)


def test_masters_step_as_adamw_on_float32_weights_and_follow_the_schedule():
    reference, ref_opt, half, opt = _pair()
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (ref_opt, opt)
    ]
    _steps(reference, ref_opt, half, opt, 5, schedules=schedules)
    assert (
        opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] != 1e-2
    )  # the masters below followed it
    for r, m, h in zip(reference, opt.masters(), half):
        assert m.dtype == torch.float32 and h.dtype == torch.bfloat16
        assert torch.equal(m, r.detach())  # the float32 update itself, exactly
        assert torch.equal(h, r.detach().to(torch.bfloat16))  # the model holds its rounding
    assert not torch.equal(
        reference[0].detach(), reference[0].detach().to(torch.bfloat16).float()
    )  # not bf16 values


def test_the_step_casts_gradients_to_float32_a_chunk_at_a_time(monkeypatch):
    """Casting every gradient first would hold float32 copies of all of them at once (+3.5 GiB of
    peak on a 1B model); a chunked step keeps at most one chunk (or one larger weight) of them, and
    is still exactly AdamW on float32 weights."""
    monkeypatch.setattr(MasterWeightsAdamW, "CHUNK_ELEMENTS", 40)
    torch.manual_seed(0)
    shapes = [(8, 4), (8,), (16, 4), (3,), (5, 5), (2,)]  # 32, 8, 64 (> a chunk), 3, 25, 2
    reference = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16).float()) for s in shapes]
    half = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in reference]

    def groups(ps):
        return [{"params": ps[:4], "weight_decay": 0.1}, {"params": ps[4:], "weight_decay": 0.0}]

    ref_opt = torch.optim.AdamW(groups(reference), lr=1e-2)
    opt = MasterWeightsAdamW.replacing(torch.optim.AdamW(groups(half), lr=1e-2))
    alive = []
    inner_step = opt.inner.step

    def counting_step(*args, **kwargs):
        alive.append(sum(m.numel() for m in opt.masters() if m.grad is not None))
        return inner_step(*args, **kwargs)

    monkeypatch.setattr(opt.inner, "step", counting_step)
    for step in range(3):
        torch.manual_seed(10 + step)
        for r, h in zip(reference, half):
            grad = torch.randn_like(r).to(torch.bfloat16)
            r.grad, h.grad = grad.float(), grad.clone()
        half[3].grad = reference[3].grad = None  # a weight without a gradient is left alone
        ref_opt.step(), opt.step()
        ref_opt.zero_grad(set_to_none=True), opt.zero_grad(set_to_none=True)
    # float32 gradient elements alive at each inner step: group 1 in two chunks ([32, 8], then the
    # 64-element weight alone; the weight without a gradient is skipped), group 2 in one ([25, 2])
    assert alive == [40, 64, 27] * 3
    for r, m, h in zip(reference, opt.masters(), half):
        assert torch.equal(m, r.detach()) and torch.equal(h, r.detach().to(torch.bfloat16))
    assert opt.inner.param_groups[0]["weight_decay"] == 0.1 and len(opt.inner.param_groups) == 2


def test_masters_resume_exactly_from_the_optimizer_state(tmp_path):
    reference, ref_opt, half, opt = _pair()
    _steps(reference, ref_opt, half, opt, 3)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    _steps(reference, ref_opt, half, opt, 3, start=3)

    _, _, half2, opt2 = _pair(
        seed=1
    )  # another start: everything must come from the saved state and weights
    state = torch.load(tmp_path / "optimizer.pt", weights_only=False)
    with torch.no_grad():
        for h, m in zip(half2, state["masters"]):
            h.copy_(m)  # the checkpoint's saved weights
    opt2.load_state_dict(state)
    ref_half = [
        torch.nn.Parameter(r.detach().clone()) for r in reference
    ]  # unused reference stand-ins
    _steps(ref_half, torch.optim.AdamW(ref_half), half2, opt2, 3, start=3)
    for m, m2 in zip(opt.masters(), opt2.masters()):
        assert torch.equal(m, m2)


def test_sft_with_master_weights_trains_like_the_default_saves_the_masters_and_resumes(
    tiny_model, tmp_path
):
    common = ("--bf16", "True", "--logging_steps", "1")
    default = train_sft(tiny_model, tmp_path / "default", 6, *common, "--master_weights", "model")
    masters = train_sft(
        tiny_model, tmp_path / "masters", 6, *common, "--master_weights", "optimizer"
    )

    def losses(out):
        return [
            h["loss"]
            for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
            if "loss" in h
        ]

    a, b = losses(default), losses(masters)
    assert len(a) == len(b) == 6 and b[-1] < b[0] - 0.5  # it learns
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05 * max(
        a
    )  # bf16 rounding of the forward's weights only
    assert (
        a != b
    )  # with float32 weights left in the model the arithmetic would be the default's, exactly
    saved = load_file(str(masters / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert any(
        not torch.equal(t, t.to(torch.bfloat16).float()) for t in saved.values()
    )  # masters, not bf16 values

    # interrupted at step 3 and resumed: the same final weights as the uninterrupted run
    straight = train_sft(
        tiny_model,
        tmp_path / "straight",
        6,
        *common,
        "--master_weights",
        "optimizer",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
    )
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    train_sft(
        tiny_model,
        resumed,
        6,
        *common,
        "--master_weights",
        "optimizer",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
        "--resume_from_checkpoint",
        "auto",
    )
    end, again = (
        load_file(str(straight / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    assert end.keys() == again.keys() and all(torch.equal(end[k], again[k]) for k in end)


@pytest.mark.parametrize(
    "flags, refused",
    [
        (("--use_peft", "True"), "adapters"),
        (("--bf16", "False"), "--bf16 True"),
        (("--bf16", "True", "--torch_dtype", "float32"), "--torch_dtype"),
    ],
)
def test_master_weights_refused_where_it_would_do_nothing(tiny_model, tmp_path, flags, refused):
    with pytest.raises(UserError, match=refused):
        train_sft(tiny_model, tmp_path / "out", 1, "--master_weights", "optimizer", *flags)


def test_a_master_weights_checkpoint_is_not_resumed_as_plain_adamw(tiny_model, tmp_path):
    """Its moments sit beside the masters: a plain AdamW would load an empty state and restart
    Adam."""
    out = train_sft(
        tiny_model,
        tmp_path / "run",
        3,
        "--bf16",
        "True",
        "--master_weights",
        "optimizer",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
    )
    with pytest.raises(UserError, match="saved under --master_weights optimizer"):
        train_sft(
            tiny_model,
            out,
            6,
            "--bf16",
            "True",
            "--master_weights",
            "model",
            "--save_strategy",
            "steps",
            "--save_steps",
            "3",
            "--resume_from_checkpoint",
            "auto",
        )


def test_master_weights_refuse_load_best_model_at_end(tiny_model, tmp_path):
    with pytest.raises(UserError, match="not of the best checkpoint"):
        train_sft(
            tiny_model,
            tmp_path / "out",
            1,
            "--bf16",
            "True",
            "--master_weights",
            "optimizer",
            "--load_best_model_at_end",
            "True",
            "--eval_strategy",
            "steps",
            "--save_strategy",
            "steps",
        )


@pytest.mark.parametrize(
    "flags, chosen",
    [
        (("--bf16", "True"), "optimizer"),
        (("--bf16", "True", "--gradient_accumulation_steps", "2"), "model"),
        (("--bf16", "False"), "model"),
        (("--bf16", "True", "--use_peft", "True"), "model"),
        (("--bf16", "True", "--torch_dtype", "float32"), "model"),
        (("--bf16", "True", "--master_weights", "model"), "model"),
        (
            (
                "--bf16",
                "True",
                "--gradient_accumulation_steps",
                "2",
                "--master_weights",
                "optimizer",
            ),
            "optimizer",
        ),
    ],
)
def test_the_default_keeps_float32_masters_in_the_optimizer_where_it_applies(
    tiny_model, tmp_path, flags, chosen
):
    from stages import sft

    argv = ["--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "o")]
    argv += ["--train_file_dir", "data/sft", "--use_peft", "False", *flags]
    training_args = sft.parse(argv)[-1]
    assert training_args.master_weights == chosen


def test_the_default_keeps_float32_weights_when_processes_sum_gradients(
    tiny_model, tmp_path, monkeypatch
):
    """Under torchrun with several processes DDP would all-reduce bf16 gradients: auto keeps
    float32 weights there (an explicit optimizer is still taken)."""
    from pipeline.train.master_weights import check_master_weights
    from stages import sft

    argv = ["--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "o")]
    argv += ["--train_file_dir", "data/sft", "--use_peft", "False", "--bf16", "True"]
    model_args, _, peft_args, _, training_args = sft.parse(argv)
    assert training_args.master_weights == "optimizer"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for asked, chosen in (("auto", "model"), ("optimizer", "optimizer")):
        training_args.master_weights = asked
        check_master_weights(model_args, peft_args, training_args)
        assert training_args.master_weights == chosen


def test_a_plain_adamw_state_resumes_under_masters_exactly():
    """A checkpoint saved under --master_weights model (float32 weights, a plain AdamW) continues
    under the default's masters: the weights it saved become the masters, its moments the inner
    AdamW's, and the steps that follow equal plain AdamW's on float32 weights."""
    reference, ref_opt, half, opt = _pair()
    _steps(reference, ref_opt, half, opt, 3)
    # what a run under --master_weights model checkpoints (a copy, as read back from its file)
    saved = copy.deepcopy(ref_opt.state_dict())

    # the resumed run: float32 weights loaded from the checkpoint, the optimizer built on them,
    # then the model's weights cast to bf16 (CausalLMTrainer.create_optimizer)
    weights = [torch.nn.Parameter(r.detach().clone()) for r in reference]
    groups = [
        {"params": [weights[0]], "weight_decay": 0.1},
        {"params": [weights[1]], "weight_decay": 0.0},
    ]
    resumed = MasterWeightsAdamW.replacing(
        torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    )
    for w in weights:
        w.data = w.data.to(torch.bfloat16)
    resumed.load_state_dict(saved)
    _steps(reference, ref_opt, weights, resumed, 3, start=3)
    for r, m, w in zip(reference, resumed.masters(), weights):
        assert torch.equal(m, r.detach()) and torch.equal(w, r.detach().to(torch.bfloat16))
    assert not torch.equal(reference[0].detach(), reference[0].detach().to(torch.bfloat16).float())
