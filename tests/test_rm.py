"""RM stage: learns the synthetic preference task (scored through plain transformers and the saved
chat template), LoRA RM merges to a folder giving the same rewards, preference formats and their
errors."""

import json
import math
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.data.preferences import read_preferences
from pipeline.errors import UserError
from pipeline.eval.evaluate import pairwise_accuracy, rewards
from pipeline.train.losses import pairwise_loss
from stages import rm
from tests.helpers import DATA, REPO

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
    "50",
    "--save_strategy",
    "no",
    "--seed",
    "0",
]


@pytest.fixture(scope="module")
def heldout_pairs():
    pairs, _ = read_preferences(str(DATA / "reward_eval"), "--validation_file_dir")
    return pairs


def test_rm_reaches_95_percent_heldout_accuracy(sft_model, reward_model, heldout_pairs):
    # conftest: full RM training from the SFT model on data/reward, eval on data/reward_eval
    out = reward_model
    untrained = AutoModelForSequenceClassification.from_pretrained(sft_model, num_labels=1)
    untrained.config.pad_token_id = AutoTokenizer.from_pretrained(out).pad_token_id
    base_scores = rewards(untrained.eval(), AutoTokenizer.from_pretrained(out), heldout_pairs)
    assert (base_scores[:, 0] > base_scores[:, 1]).float().mean() < 0.8
    assert pairwise_accuracy(str(out), heldout_pairs) >= 0.95
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_accuracy"] >= 0.95 and metrics["eval_margin"] > 0


@pytest.mark.slow
def test_lora_rm_merge_gives_the_same_rewards(sft_model, tmp_path, heldout_pairs):
    out = tmp_path / "rm-lora"
    rm.main(
        [
            "--model_name_or_path",
            str(sft_model),
            "--output_dir",
            str(out),
            "--validation_split_percentage",
            "0",
            "--use_peft",
            "True",
            "--learning_rate",
            "2e-3",
            "--max_steps",
            "20",
            *COMMON,
        ]
    )
    merged = tmp_path / "rm-merged"
    subprocess.run(
        [
            sys.executable,
            "merge_peft_adapter.py",
            "--base_model",
            str(sft_model),
            "--lora_model",
            str(out),
            "--output_dir",
            str(merged),
        ],
        cwd=REPO,
        check=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(
        sft_model, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    adapter = PeftModel.from_pretrained(base, out).eval()
    want = rewards(adapter, tokenizer, heldout_pairs[:8])
    got = rewards(
        AutoModelForSequenceClassification.from_pretrained(merged).eval(),
        AutoTokenizer.from_pretrained(merged),
        heldout_pairs[:8],
    )
    assert torch.allclose(got, want, atol=1e-3)
    fresh = AutoModelForSequenceClassification.from_pretrained(
        sft_model, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    assert not torch.allclose(rewards(fresh.eval(), tokenizer, heldout_pairs[:8]), want, atol=1e-2)


def test_every_preference_format_is_read():
    pairs, report = read_preferences(str(DATA / "examples" / "reward"), "--train_file_dir")
    assert report.read == report.kept == 5
    seed = next(p for p in pairs if p["prompt"][-1]["content"] == "Give me a tip for better sleep.")
    assert [m["role"] for m in seed["prompt"]] == ["system", "user", "assistant", "user"]
    implicit = next(p for p in pairs if p["chosen"].startswith("可以从"))
    assert implicit["prompt"] == [{"role": "user", "content": "推荐一本关于天文的入门书。"}]
    ranking = next(p for p in pairs if p["chosen"] == "Blue.")
    assert ranking["prompt"][-1]["role"] == "user"


def test_identical_pairs_are_reported_and_bad_records_named(tmp_path):
    path = tmp_path / "d" / "pairs.jsonl"
    path.parent.mkdir()
    path.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
        '{"prompt": "q", "chosen": "same", "rejected": "same"}\n'
    )
    pairs, report = read_preferences(str(path.parent), "--train_file_dir")
    assert len(pairs) == 1 and report.dropped == {"chosen equals rejected": 1}
    path.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
        '{"prompt": "q", "chosen": "", "rejected": "b"}\n'
    )
    with pytest.raises(UserError, match=r"pairs.jsonl:2: \"chosen\" must be a non-empty answer"):
        read_preferences(str(path.parent), "--train_file_dir")


def test_a_bad_margin_is_named_with_file_and_line(tmp_path):
    path = tmp_path / "d" / "pairs.jsonl"
    path.parent.mkdir()
    path.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5}\n'
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": null}\n'
    )
    with pytest.raises(
        UserError, match=r"pairs.jsonl:2: \"margin\" must be a finite number, got None"
    ):
        read_preferences(str(path.parent), "--train_file_dir")
    pairs, report = read_preferences(str(path.parent), "--train_file_dir", skip_invalid=True)
    assert [p["margin"] for p in pairs] == [1.5] and sum(report.dropped.values()) == 1


def test_pairwise_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    # plain: mean of -log sigmoid(1) and -log sigmoid(-1)
    plain = (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2
    assert pairwise_loss(chosen, rejected, torch.zeros(2), 0.0).item() == pytest.approx(
        plain, rel=1e-6
    )
    # margins 0.5 and 1: -log sigmoid(0.5) and -log sigmoid(-2); centering
    # 0.1 * mean((1)^2, (0)^2) = 0.05
    with_margin = (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(2)))) / 2
    got = pairwise_loss(chosen, rejected, torch.tensor([0.5, 1.0]), 0.1).item()
    assert got == pytest.approx(with_margin + 0.05, rel=1e-6)


def test_qlora_rm_trains_and_saves_the_score_head(sft_model, tmp_path):
    out = tmp_path / "rm-qlora"
    rm.main(
        [
            "--model_name_or_path",
            str(sft_model),
            "--output_dir",
            str(out),
            "--validation_split_percentage",
            "0",
            "--qlora",
            "True",
            "--learning_rate",
            "2e-3",
            "--max_steps",
            "3",
            *COMMON,
        ]
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in (config["modules_to_save"] or [])
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert any("score" in k for k in f.keys())
