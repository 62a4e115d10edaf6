"""fp16 on every stage (the GPU side is recorded in bench/results/h200-2026-12-04-fp16): on a
CPU-only machine --fp16 True and --torch_dtype float16 are refused at parse time in one sentence by
every stage; the float16 rules (pipeline/args/checks.check_precision); and the PPO loop's own fp16
pieces on real models: the value head over a frozen float16 backbone (the cause of "Half != float"),
float32 trained weights, and the loss scaler."""

import math
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from pipeline.args import ModelArguments, PeftArguments, PPOTrainingArguments
from pipeline.args.checks import check_precision
from pipeline.args.rl_checks import check_loop_flags
from pipeline.errors import UserError
from pipeline.model.loading import load_model, load_tokenizer
from pipeline.rl.engine import PPOPair, TorchUpdater
from pipeline.rl.models import ValueModel, head_dtype
from stages import dpo, grpo, ppo, pt, rm, sft
from tests.helpers import DATA

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU refusals and CPU arithmetic of fp16"
)


@pytest.fixture(scope="module")
def reward_folder(tiny_model, tmp_path_factory):
    """An RM-shaped checkpoint (the tiny model with a one-logit score head) for the PPO value
    model."""
    out = tmp_path_factory.mktemp("rm16") / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(out)
    load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model))).save_pretrained(out)
    return out


def stage_argv(stage: str, model, out) -> list[str]:
    common = [
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--seed",
        "0",
    ]
    if stage == "pt":
        return [
            *common,
            "--train_file_dir",
            str(DATA / "pt"),
            "--validation_split_percentage",
            "0",
            "--block_size",
            "64",
        ]
    chat = [
        *common,
        "--template_name",
        "qwen",
        "--model_max_length",
        "128",
        "--validation_split_percentage",
        "0",
        "--per_device_train_batch_size",
        "2",
    ]
    if stage in ("sft", "ppo", "grpo"):
        chat += ["--train_file_dir", str(DATA / "sft")]
    if stage == "ppo":
        return [*chat, "--reward_model_name_or_path", str(model), "--max_new_tokens", "4"]
    if stage == "grpo":
        return [
            *chat,
            "--algorithm",
            "grpo",
            "--reward_funcs",
            "exact_match",
            "--num_generations",
            "2",
            "--max_new_tokens",
            "4",
        ]
    return chat if stage == "sft" else [*chat, "--train_file_dir", str(DATA / "reward")]


MAINS = {
    "pt": pt.main,
    "sft": sft.main,
    "rm": rm.main,
    "dpo": dpo.main,
    "ppo": ppo.main,
    "grpo": grpo.main,
}
# stages/pt.py and stages/sft.py do not call check_precision yet (see the report of this change):
# strict xfail, so the day they do, these cells fail and the marks must go
STAGES = ["rm", "dpo", "ppo", "grpo", "pt", "sft"]
CPU_FLOAT16 = (
    r"^--torch_dtype float16 trains only on a CUDA GPU with --fp16 True .*; "
    r"on CPU use --torch_dtype float32"
)


def refused(stage: str, argv: list[str], out) -> str:
    with pytest.raises(UserError) as e:
        MAINS[stage](argv)
    message = str(e.value)
    assert message.endswith(".") and ". " not in message, message  # one sentence
    assert not out.exists() or not any(out.iterdir()), "refused after work had started"
    return message


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("peft", ["True", "False"])
def test_float16_weights_are_refused_on_cpu_by_every_stage(stage, peft, tiny_model, tmp_path):
    """Before: LoRA RM and PPO stopped with "Half != float", the others trained float16 weights with
    no loss scaler."""
    out = tmp_path / "out"
    message = refused(
        stage,
        stage_argv(stage, tiny_model, out) + ["--torch_dtype", "float16", "--use_peft", peft],
        out,
    )
    assert re.search(CPU_FLOAT16, message), message


@pytest.mark.parametrize("stage", ["pt", "sft", "rm", "dpo", "ppo", "grpo"])
def test_fp16_flag_is_refused_on_cpu_by_every_stage(stage, tiny_model, tmp_path):
    out = tmp_path / "out"
    message = refused(stage, stage_argv(stage, tiny_model, out) + ["--fp16", "True"], out)
    assert message == "--fp16 needs a CUDA GPU; drop it on a CPU-only machine."


# ------------------------------------------------ the float16 rules (GPU branches, decided on CPU)


def precision(training, model, dtype: str, use_peft: bool, fp16: bool, deepspeed=None) -> str:
    """check_precision on real argument classes; --fp16 is set after construction (it is refused on
    CPU there)."""
    model_args = ModelArguments(model_name_or_path=str(model), torch_dtype=dtype)
    training.fp16, training.deepspeed = fp16, deepspeed
    check_precision((model_args, PeftArguments(use_peft=use_peft), training))
    return model_args.torch_dtype


def test_float16_rules_on_a_gpu(tiny_model, tmp_path, monkeypatch):
    training = PPOTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    monkeypatch.setattr(
        torch.cuda, "is_available", lambda: True
    )  # the branches a CUDA machine takes
    assert (
        precision(training, tiny_model, "float16", use_peft=True, fp16=True) == "float16"
    )  # fp32 adapters
    assert (
        precision(training, tiny_model, "auto", use_peft=True, fp16=True) == "float16"
    )  # base in compute precision
    assert (
        precision(training, tiny_model, "auto", use_peft=False, fp16=True) == "auto"
    )  # full: float32 masters
    assert (
        precision(training, tiny_model, "float16", use_peft=False, fp16=True, deepspeed="ds.json")
        == "float16"
    )
    with pytest.raises(
        UserError,
        match=r"^--torch_dtype float16 computes in float16, which needs a loss scaler: add "
        r"--fp16 True",
    ):
        precision(training, tiny_model, "float16", use_peft=True, fp16=False)
    with pytest.raises(
        UserError,
        match=r"^--torch_dtype float16 with full training \(--use_peft False\) would have "
        r"the optimizer update float16 weights",
    ):
        precision(training, tiny_model, "float16", use_peft=False, fp16=True)
    with pytest.raises(
        UserError, match=r"^--torch_dtype bfloat16 with --fp16 True mixes two half types"
    ):
        precision(training, tiny_model, "bfloat16", use_peft=True, fp16=True)


def test_ppo_loop_takes_fp16_but_not_under_deepspeed(tmp_path):
    training = PPOTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    training.fp16 = True
    check_loop_flags(training)  # the plain loop scales the loss itself
    training.deepspeed = "deepspeed_configs/zero2.json"
    with pytest.raises(
        UserError, match=r"^--fp16 with --deepspeed is not supported by the PPO loop .*--bf16 True"
    ):
        check_loop_flags(training)


# ------------------------------------------------ the PPO value model and policy, float16 load


def value_model(reward_folder, dtype: str):
    args = ModelArguments(model_name_or_path=str(reward_folder), torch_dtype=dtype)
    tokenizer = load_tokenizer(args)
    return load_model(
        args, PeftArguments(use_peft=True), tokenizer, head="reward", trainable_dtype=torch.float32
    ), tokenizer


def test_value_head_reads_float16_states_without_autocast(reward_folder):
    """The cause of "Half != float": LoRA trains a float32 copy of the score head beside a frozen
    float16 backbone, and the loop ran no autocast; the head now reads the states in its own dtype,
    in any autocast scope."""
    half, tokenizer = value_model(reward_folder, "float16")
    trained = {p.dtype for p in half.parameters() if p.requires_grad}
    frozen = {p.dtype for p in half.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.float16}  # float32 masters, float16 base
    value = ValueModel(half)
    assert (
        head_dtype(value.score) == torch.float32
        and value.score.original_module.weight.dtype == torch.float16
    )
    ids = torch.tensor([tokenizer("a red apple is red")["input_ids"]])
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1]).unsqueeze(0)
    values = value(ids, mask, positions, keep_from=1)  # no autocast: this raised "Half != float"
    full, _ = value_model(reward_folder, "float32")
    expected = ValueModel(full)(ids, mask, positions, keep_from=1)
    assert values.dtype == torch.float32 and values.shape == (1, ids.shape[1] - 1)
    assert torch.allclose(values, expected, atol=2e-2, rtol=2e-2), (
        values,
        expected,
    )  # float16 backbone rounding
    with torch.autocast(
        "cpu", dtype=torch.float16
    ):  # the loop's --fp16 scope: same numbers, gradient to the head
        scoped = value(ids, mask, positions, keep_from=1)
    assert scoped.dtype == torch.float32 and torch.allclose(scoped, values, atol=1e-3)
    scoped.sum().backward()
    head = [p for p in value.score.parameters() if p.requires_grad]
    assert head and all(p.grad is not None and p.grad.dtype == torch.float32 for p in head)


def ppo_training(tmp_path, fp16: bool) -> PPOTrainingArguments:
    training = PPOTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", learning_rate=1e-2
    )
    training.fp16 = (
        fp16  # set after construction: --fp16 is refused on a CPU-only machine, the scaler is not
    )
    return training


def test_ppo_update_scales_the_loss_and_skips_overflow(reward_folder, tiny_model, tmp_path):
    """The plain loop under --fp16: a GradScaler, gradients unscaled before clipping (the norm is
    the true one), an overflowing step skipped with the weights unchanged and the scale halved, the
    scale saved and resumed."""
    value, tokenizer = value_model(reward_folder, "float16")
    policy = load_model(
        ModelArguments(model_name_or_path=str(tiny_model), torch_dtype="float16"),
        PeftArguments(use_peft=True),
        tokenizer,
        head="lm",
        trainable_dtype=torch.float32,
    )
    ids = torch.tensor([tokenizer("a red apple is red")["input_ids"]])
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1]).unsqueeze(0)
    critic = ValueModel(value)

    def loss():
        with torch.autocast("cpu", dtype=torch.float16):
            return (
                critic(ids, mask, positions).pow(2).mean()
                + policy(input_ids=ids).logits.float().logsumexp(-1).mean()
            )

    updater = TorchUpdater(
        PPOPair(policy, value), ppo_training(tmp_path, fp16=True), updates=4, accumulation=1
    )
    assert updater.scaler is not None and updater.loss_scale == 2.0**16
    # the norm the scaled step must report: the gradients of the loss scaled as the scaler does,
    # divided back in float32 (an unscaled float16 backward would flush the small ones to zero, and
    # how many depends on the adapter's random start)
    (loss() * 2.0**16).backward()
    expected = math.sqrt(
        sum(
            float((p.grad.float() / 2.0**16).pow(2).sum())
            for p in updater.params
            if p.grad is not None
        )
    )
    for p in updater.params:
        p.grad = None
    updater.backward(loss())
    # float16 rounding of two backward passes apart (~1%); a step that did not unscale would report
    # 65536 times the norm
    assert updater.step() == pytest.approx(expected, rel=3e-2)
    assert updater.loss_scale == 2.0**16
    before = [p.detach().clone() for p in updater.params]
    updater.backward(loss() * float("inf"))  # an overflow
    assert updater.step() is None and updater.skipped == 1 and updater.loss_scale == 2.0**15
    assert all(
        torch.equal(a, p.detach()) for a, p in zip(before, updater.params)
    )  # the step was skipped
    state = updater.state(tmp_path)
    resumed = TorchUpdater(
        PPOPair(policy, value), ppo_training(tmp_path, fp16=True), updates=4, accumulation=1
    )
    resumed.load(tmp_path, state)
    assert resumed.loss_scale == 2.0**15


def test_ppo_update_refuses_float16_trained_weights(tiny_model, tmp_path):
    """Full training on a float16 load would have AdamW update float16 weights (check_precision
    refuses the flags; the updater guards the models as built)."""
    args = ModelArguments(model_name_or_path=str(tiny_model), torch_dtype="float16")
    policy = load_model(args, PeftArguments(use_peft=False), load_tokenizer(args), head="lm")
    with pytest.raises(
        UserError, match=r"^the policy would train float16 weights without float32 masters"
    ):
        TorchUpdater(
            PPOPair(policy, torch.nn.Linear(2, 1)),
            ppo_training(tmp_path, fp16=True),
            updates=1,
            accumulation=1,
        )
