"""DPO stage: from a partly trained SFT policy, raises the chosen-over-rejected margin against the
reference on held-out pairs and improves greedy answers; every loss variant trains; LoRA keeps one
copy of the base."""

import json
import math
import os
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.args import DPOArguments
from pipeline.data.conversations import read_conversations
from pipeline.data.preference_dataset import split_texts, tokenize_answer
from pipeline.data.preferences import read_preferences
from pipeline.data.templates import resolve_template
from pipeline.errors import UserError
from pipeline.eval.evaluate import exact_match
from pipeline.train.losses import orpo_loss, simpo_loss
from stages import dpo
from tests.helpers import DATA, REPO, changed_parameters

COMMON = [
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
    "5",
    "--save_strategy",
    "no",
    "--seed",
    "0",
]


@torch.no_grad()
def answer_logps(model_dir, pairs) -> torch.Tensor:
    """(n, 2) summed log-probs of the chosen and rejected answers given their prompts."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = resolve_template("qwen", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for pair in pairs:
        row = []
        for key in ("chosen", "rejected"):
            prompt_ids, answer_ids = tokenize_answer(
                tokenizer, *split_texts(template, pair["prompt"], pair[key])
            )
            ids = torch.tensor([prompt_ids + answer_ids])
            logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            row.append(logps[len(prompt_ids) - 1 :].sum())
        out.append(torch.stack(row))
    return torch.stack(out)


def test_dpo_raises_the_margin_and_improves_greedy_answers(weak_sft_model, tmp_path):
    pairs, _ = read_preferences(str(DATA / "reward_eval"), "--validation_file_dir")
    out = tmp_path / "dpo"
    dpo.main(
        [
            "--model_name_or_path",
            str(weak_sft_model),
            "--output_dir",
            str(out),
            "--validation_file_dir",
            str(DATA / "reward_eval"),
            "--use_peft",
            "False",
            "--learning_rate",
            "1e-4",
            "--max_steps",
            "60",
            "--beta",
            "0.1",
            *COMMON,
        ]
    )
    before, after = answer_logps(weak_sft_model, pairs), answer_logps(out, pairs)
    improved = ((after[:, 0] - after[:, 1]) > (before[:, 0] - before[:, 1])).float().mean().item()
    assert improved >= 0.9, improved
    convs, _ = read_conversations(str(DATA / "sft_eval"), "--validation_file_dir")
    single = [c for c in convs if len(c["messages"]) == 2]
    em_before, em_after = exact_match(str(weak_sft_model), single), exact_match(str(out), single)
    assert em_after > em_before + 0.05, (
        em_before,
        em_after,
    )  # measured 0.34 -> 0.53; margin up on 98% of pairs
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_rewards/accuracies"] >= 0.9 and metrics["eval_rewards/margins"] > 0


@pytest.mark.parametrize(
    "flags",
    [
        ["--loss_type", "ipo"],
        ["--loss_type", "hinge"],
        ["--loss_type", "robust", "--label_smoothing", "0.1"],
        ["--precompute_ref_log_probs", "True"],
        ["--loss_type", "kto"],
        ["--loss_type", "simpo", "--beta", "2.0"],
        ["--loss_type", "orpo"],
    ],
)
def test_loss_variants_train(sft_model, tmp_path, flags):
    trainer = dpo.main(
        [
            "--model_name_or_path",
            str(sft_model),
            "--output_dir",
            str(tmp_path / "v"),
            "--use_peft",
            "False",
            "--validation_split_percentage",
            "0",
            "--learning_rate",
            "1e-4",
            "--max_steps",
            "3",
            *COMMON,
            *flags,
            "--logging_steps",
            "1",
        ]
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert (
        trainer.state.global_step == 3
        and len(losses) == 3
        and all(math.isfinite(x) for x in losses)
    )
    start = AutoModelForCausalLM.from_pretrained(sft_model).state_dict()
    assert (
        len(changed_parameters(trainer.model, start)) > len(start) // 2
    )  # the update reached most weights
    if "--precompute_ref_log_probs" in flags:
        assert trainer.ref_model is None


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "kto", "simpo"])
def test_label_smoothing_only_where_the_loss_uses_it(loss):
    with pytest.raises(
        UserError, match=f"--label_smoothing applies to --loss_type robust .*not {loss}"
    ):
        DPOArguments(loss_type=loss, label_smoothing=0.1)


def test_lora_dpo_holds_one_copy_of_the_base_weights(sft_model, tmp_path):
    trainer = dpo.main(
        [
            "--model_name_or_path",
            str(sft_model),
            "--output_dir",
            str(tmp_path / "lora"),
            "--validation_split_percentage",
            "0",
            "--learning_rate",
            "1e-3",
            "--max_steps",
            "2",
            *COMMON,
        ]
    )
    assert trainer.ref_model is None
    base_numel = AutoModelForCausalLM.from_pretrained(sft_model).num_parameters()
    storages = {
        p.data_ptr(): p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n
    }
    assert (
        sum(storages.values()) == base_numel
    )  # every base weight once; only small adapter tensors besides


def test_kto_reads_unpaired_feedback(sft_model, tmp_path):
    trainer = dpo.main(
        [
            "--model_name_or_path",
            str(sft_model),
            "--output_dir",
            str(tmp_path / "kto"),
            *COMMON,
            "--train_file_dir",
            str(DATA / "examples" / "kto"),
            "--validation_split_percentage",
            "0",
            "--loss_type",
            "kto",
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            "2",
            "--learning_rate",
            "1e-4",
        ]
    )
    assert sorted(trainer.train_dataset["label"]) == [False, False, True, True]
    with pytest.raises(UserError, match="use it with --loss_type kto"):
        dpo.main(
            [
                "--model_name_or_path",
                str(sft_model),
                "--output_dir",
                str(tmp_path / "x"),
                *COMMON,
                "--train_file_dir",
                str(DATA / "examples" / "kto"),
            ]
        )


def test_reference_free_losses_by_hand():
    chosen, rejected = torch.tensor([-0.5, -1.0]), torch.tensor([-1.5, -0.8])
    # SimPO: -log sigmoid(beta * (c - r) - gamma); beta 2, gamma 0.5 -> margins 1.5 and -0.9
    want = (
        -(
            torch.log(torch.sigmoid(torch.tensor(1.5)))
            + torch.log(torch.sigmoid(torch.tensor(-0.9)))
        )
        / 2
    )
    assert simpo_loss(chosen, rejected, beta=2.0, gamma=0.5).item() == pytest.approx(
        want.item(), rel=1e-5
    )
    # ORPO on one pair: log odds(p) = log p - log(1 - p) with p = exp(avg logp)
    c, r = torch.tensor([-0.5]), torch.tensor([-1.5])
    lo = lambda x: x - torch.log(1 - torch.exp(x))  # noqa: E731
    want = 0.5 - 0.1 * torch.log(torch.sigmoid(lo(c) - lo(r)))
    assert orpo_loss(c, r, beta=0.1).item() == pytest.approx(want.item(), rel=1e-5)


def test_reference_free_metrics_are_the_batch_values(tiny_model, tmp_path):
    """SimPO/ORPO log the batch's mean chosen and rejected log-probabilities, accuracy and margin,
    read from the device in one go: each under its own name."""
    from pipeline.train.losses import average_logps

    trainer = dpo.main(
        [
            *("--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "s")),
            *("--loss_type", "simpo", "--max_steps", "1", "--use_peft", "False"),
            *("--validation_split_percentage", "0"),
            *COMMON,
        ]
    )
    model = trainer.model.eval()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        trainer.compute_loss(model, inputs)
        chosen, rejected = average_logps(model, inputs).chunk(2)
    logged = {k: v[0] for k, v in trainer._metrics["eval"].items()}
    want = {
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
    }
    assert logged.keys() == want.keys()
    assert all(logged[k] == pytest.approx(v.item(), abs=1e-6) for k, v in want.items())
    assert len({round(v, 6) for v in logged.values()}) == 4  # four different numbers


@pytest.mark.parametrize("launcher", ["run_rm.sh", "run_dpo.sh"])
def test_rm_and_dpo_train_under_torchrun_with_two_processes(sft_model, tmp_path, launcher):
    out = tmp_path / launcher.removesuffix(".sh")
    env = {**os.environ, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            "bash",
            launcher,
            "--model_name_or_path",
            str(sft_model),
            "--output_dir",
            str(out),
            *COMMON,
            "--per_device_train_batch_size",
            "8",
            "--max_steps",
            "2",
            "--use_peft",
            "False",
            "--validation_split_percentage",
            "0",
            "--learning_rate",
            "1e-5",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    # 144 pairs, 2 processes x 8 pairs per step: 2 steps are 32/144 of an epoch (one process: half
    # that)
    assert state["global_step"] == 2 and state["log_history"][-1]["epoch"] == pytest.approx(
        32 / 144, rel=1e-3
    )
