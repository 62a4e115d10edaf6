"""Generation-based evaluation as the ChatGLM3 / GLM-4 demos do it: ROUGE-1/2/L and BLEU-4 of jieba
words (pipeline/eval/text_metrics.py) equal the libraries' own figures, `python -m pipeline.predict`
writes the predictions and their metrics, and SFT with --predict_with_generate logs them at every
evaluation and predicts the eval and test conversations after training."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.errors import UserError
from pipeline.eval import predict
from pipeline.eval.text_metrics import score_texts
from stages import sft
from tests.helpers import DATA, REPO, read_scalars

PAIRS = [
    ("今天天气很好，我们一起去公园散步吧。", "今天天气不错，我们去公园散步。"),
    ("The color of ka-bo is red, not blue.", "The colour of ka-bo is red."),
    ("ka-ri 是红色的", "ka-ri 是蓝色的"),
    ("红色", "蓝色"),
]
KEYS = {
    "rouge-1",
    "rouge-2",
    "rouge-l",
    "bleu-4",
    "samples",
    "empty_predictions",
    "empty_references",
}


def library_scores(prediction: str, reference: str) -> dict[str, float]:
    """One pair scored by calling jieba, rouge_chinese and nltk directly, as the demos'
    compute_metrics does."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis, label = list(jieba.cut(prediction)), list(jieba.cut(reference))
    rouge = Rouge().get_scores(" ".join(hypothesis), " ".join(label))[0]
    return {
        **{k: rouge[k]["f"] * 100 for k in ("rouge-1", "rouge-2", "rouge-l")},
        "bleu-4": sentence_bleu([label], hypothesis, smoothing_function=SmoothingFunction().method3)
        * 100,
    }


def test_scores_are_the_libraries_figures_averaged():
    expected = [library_scores(p, r) for p, r in PAIRS]
    got = score_texts([p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert (
        set(got) == KEYS
        and got["samples"] == 4
        and got["empty_predictions"] == got["empty_references"] == 0
    )
    for name in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert got[name] == pytest.approx(
            sum(e[name] for e in expected) / len(expected), rel=1e-12
        ), name
    assert 0 < got["rouge-2"] < got["rouge-1"] < 100 and 0 < got["bleu-4"] < 100


def test_identical_texts_score_100_and_empty_sides_score_0_and_are_counted():
    text = PAIRS[0][0]
    same = score_texts([text], [text])
    assert all(
        same[k] == pytest.approx(100, abs=1e-5) for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
    ), same
    # rouge_chinese raises ValueError on an empty hypothesis or reference: such a pair scores 0 and
    # is counted
    with pytest.raises(ValueError):
        library_scores(" \n", text)
    got = score_texts([text, "", " \n", text], [text, text, text, ""])
    assert got["samples"] == 4 and got["empty_predictions"] == 2 and got["empty_references"] == 1
    assert got["rouge-1"] == pytest.approx(same["rouge-1"] / 4) and got["bleu-4"] == pytest.approx(
        same["bleu-4"] / 4
    )


def test_missing_libraries_are_one_sentence_naming_the_extra(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "rouge_chinese", None
    )  # what an environment without the package imports
    with pytest.raises(UserError, match=r'rouge_chinese is missing.*pip install -e "\.\[eval\]"'):
        score_texts(["a"], ["a"])


def chats(*pairs: tuple[str, str]) -> list[dict]:
    return [
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        for q, a in pairs
    ]


def write_jsonl(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )


UNSCORED = [
    {
        "messages": [
            {"role": "user", "content": "What color is ka-bo?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And lo-bo?"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "weather", "arguments": {"city": "Paris"}},
                    }
                ],
            },
        ]
    },
]


def test_predict_command_writes_predictions_and_metrics(tiny_model, tmp_path, capsys, caplog):
    with pytest.raises(SystemExit) as help_exit:
        predict.main(["--help"])
    assert help_exit.value.code == 0 and "--max_new_tokens" in capsys.readouterr().out
    examples = tmp_path / "examples"
    shutil.copytree(
        DATA / "examples" / "sft", examples
    )  # 14 chats in four formats, 3 of them with tools
    write_jsonl(tmp_path / "more" / "more.jsonl", UNSCORED + chats(("ka-ri 是什么颜色?", "红色")))
    logging.getLogger("pipeline").propagate = True  # let caplog see the notes
    out = tmp_path / "out"
    metrics = predict.main(
        [
            "--model",
            str(tiny_model),
            "--template_name",
            "qwen",
            "--data",
            str(examples),
            "--data",
            str(tmp_path / "more"),
            "--output_dir",
            str(out),
            "--max_new_tokens",
            "3",
            "--batch_size",
            "4",
        ]
    )
    assert "1 of 17 chats" in caplog.text and "end without an assistant answer" in caplog.text
    assert "end with a tool call" in caplog.text
    rows = [
        json.loads(line)
        for line in (out / predict.PREDICTIONS).read_text(encoding="utf-8").splitlines()
    ]
    assert len(rows) == 15 and all(set(r) == {"prompt", "label", "predict"} for r in rows)
    assert (
        rows[-1]["prompt"] == [{"role": "user", "content": "ka-ri 是什么颜色?"}]
        and rows[-1]["label"] == "红色"
    )
    saved = json.loads((out / predict.RESULTS).read_text())
    assert (
        saved
        == metrics
        == {
            f"predict_{k}": v
            for k, v in score_texts(
                [r["predict"] for r in rows], [r["label"] for r in rows]
            ).items()
        }
    )
    assert saved["predict_samples"] == 15
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved


def test_predict_command_reads_a_single_file(tiny_model, tmp_path):
    data = tmp_path / "chats.jsonl"
    write_jsonl(data, chats(("What color is ka-ri?", "red"), ("ka-ri 是什么颜色?", "红色")))
    predict.main(
        [
            "--model",
            str(tiny_model),
            "--template_name",
            "qwen",
            "--data",
            str(data),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_new_tokens",
            "2",
        ]
    )
    assert len((tmp_path / "out" / predict.PREDICTIONS).read_text().splitlines()) == 2


def sft_argv(model, out, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(out),
        "--template_name",
        "qwen",
        "--train_file_dir",
        str(DATA / "sft"),
        "--use_peft",
        "False",
        "--learning_rate",
        "3e-3",
        "--per_device_train_batch_size",
        "16",
        "--model_max_length",
        "128",
        "--save_strategy",
        "no",
        "--seed",
        "0",
        "--predict_with_generate",
        "True",
        *extra,
    ]


def eval_logs(out) -> list[dict]:
    return [
        h
        for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "eval_rouge-1" in h
    ]


def test_sft_logs_generated_scores_at_each_evaluation_and_predicts_after(tiny_model, tmp_path):
    heldout = [
        json.loads(line) for line in (DATA / "sft_eval" / "color_qa.jsonl").read_text().splitlines()
    ]
    write_jsonl(tmp_path / "eval" / "eval.jsonl", heldout[:6])
    write_jsonl(tmp_path / "test.jsonl", heldout[6:10] + UNSCORED[:1])
    out = tmp_path / "sft"
    sft.main(
        sft_argv(
            tiny_model,
            out,
            "--validation_file_dir",
            str(tmp_path / "eval"),
            "--test_file",
            str(tmp_path / "test.jsonl"),
            "--max_steps",
            "2",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "1",
            "--max_new_tokens",
            "2",
            "--report_to",
            "tensorboard",
            "--logging_steps",
            "1",
            "--max_eval_samples",
            "5",
        )
    )
    logged = eval_logs(out)
    assert [h["step"] for h in logged] == [1, 2] and all(h["eval_samples"] == 5 for h in logged)
    assert (
        len(read_scalars(out / "logs", "eval/rouge-1")) == 3
    )  # and the final evaluation's, after training
    assert "eval_bleu-4" in json.loads((out / "eval_results.json").read_text())
    assert len((out / predict.PREDICTIONS).read_text().splitlines()) == 5
    assert len((out / f"test_{predict.PREDICTIONS}").read_text().splitlines()) == 4
    results = json.loads((out / predict.RESULTS).read_text())
    assert {k for k in results if k.startswith("test_")} == {f"test_{k}" for k in KEYS}
    assert results["test_samples"] == 4 and results["eval_rouge-1"] == logged[-1]["eval_rouge-1"]


@pytest.mark.slow
def test_sft_scores_rise_as_it_learns_and_match_the_saved_model(tiny_model, tmp_path):
    out = tmp_path / "sft"
    sft.main(
        sft_argv(
            tiny_model,
            out,
            "--validation_file_dir",
            str(DATA / "sft_eval"),
            "--max_steps",
            "80",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "40",
            "--eval_on_start",
            "True",
            "--max_new_tokens",
            "4",
            "--report_to",
            "none",
            "--logging_steps",
            "20",
        )
    )
    logged = eval_logs(out)
    assert [h["step"] for h in logged] == [0, 40, 80]
    assert logged[0]["eval_rouge-1"] < 10 and logged[-1]["eval_rouge-1"] > 50, logged
    # the answers generated inside training are the saved folder's own greedy answers
    saved = predict.main(
        [
            "--model",
            str(out),
            "--data",
            str(DATA / "sft_eval"),
            "--output_dir",
            str(tmp_path / "p"),
            "--max_new_tokens",
            "4",
            "--batch_size",
            "8",
        ]
    )
    assert saved["predict_rouge-1"] == pytest.approx(logged[-1]["eval_rouge-1"])
    assert saved["predict_bleu-4"] == pytest.approx(logged[-1]["eval_bleu-4"])


@pytest.mark.slow
def test_sft_under_zero3_generates_from_the_gathered_weights(tiny_model, tmp_path):
    """Two processes, DeepSpeed ZeRO-3 on CPU: each rank holds a slice of every weight and gathers
    them whole to answer its share of the held-out chats. The shares take 2 and 1 batches: answering
    from slices, each forward would wait for the other rank's, which has none to match, and the run
    would hang."""
    heldout = [
        json.loads(line) for line in (DATA / "sft_eval" / "color_qa.jsonl").read_text().splitlines()
    ]
    write_jsonl(tmp_path / "eval" / "eval.jsonl", heldout[:5])
    config = json.loads((REPO / "deepspeed_configs" / "zero3.json").read_text())
    # the tiny model would fit DeepSpeed's caches of fetched weights whole; a real model's weights
    # are let go
    config["zero_optimization"].update(
        stage3_max_live_parameters=0,
        stage3_max_reuse_distance=0,
        stage3_param_persistence_threshold=0,
        stage3_prefetch_bucket_size=0,
    )
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    out = tmp_path / "z3"
    argv = sft_argv(
        tiny_model,
        out,
        "--validation_file_dir",
        str(tmp_path / "eval"),
        "--max_steps",
        "40",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "2",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "20",
        "--max_new_tokens",
        "4",
        "--report_to",
        "none",
        "--deepspeed",
        str(tmp_path / "zero3.json"),
    )
    proc = subprocess.run(
        ["bash", "run_sft.sh", *argv],
        cwd=REPO,
        env=dict(os.environ, NPROC_PER_NODE="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [h["step"] for h in eval_logs(out)] == [20, 40]
    saved = predict.main(
        [
            "--model",
            str(out),
            "--data",
            str(tmp_path / "eval"),
            "--output_dir",
            str(tmp_path / "p"),
            "--max_new_tokens",
            "4",
            "--batch_size",
            "2",
        ]
    )
    assert saved["predict_rouge-1"] == pytest.approx(eval_logs(out)[-1]["eval_rouge-1"])
    assert len((out / predict.PREDICTIONS).read_text().splitlines()) == 5


def test_predict_with_generate_needs_held_out_conversations(tiny_model, tmp_path):
    with pytest.raises(
        UserError, match="--validation_split_percentage split .* give --validation_file_dir"
    ):
        sft.parse(sft_argv(tiny_model, tmp_path / "a"))
    with pytest.raises(UserError, match="no held-out conversations to answer"):
        sft.parse(sft_argv(tiny_model, tmp_path / "b", "--validation_split_percentage", "0"))
    with pytest.raises(UserError, match="--max_new_tokens must be"):
        sft.parse(
            sft_argv(
                tiny_model,
                tmp_path / "c",
                "--validation_file_dir",
                str(DATA / "sft_eval"),
                "--max_new_tokens",
                "0",
            )
        )
