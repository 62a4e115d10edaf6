"""The bad-input corpus: each kind of mistake a user makes ends in one sentence naming the flag or
the file:line and the fix, with exit code 2 and no traceback, before any training.

Most cases call a stage's entry point in this process (as `run_cli` does for the command line:
fast); `test_through_the_launcher` runs some of them through `run_sft.sh` / `python` as the user
would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import run_cli
from tests.helpers import DATA, REPO

CHAT = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
PAIR = {"question": "q", "response_chosen": "a", "response_rejected": "b"}


def jsonl(path: Path, *records) -> str:
    """Write records (dicts, or raw lines as str) to path; return the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records
        ),
        encoding="utf-8",
    )
    return str(path.parent)


def sft(env, *flags, data=None):
    return "sft", [
        "--model_name_or_path",
        env.model,
        "--template_name",
        "qwen",
        "--train_file_dir",
        data or str(DATA / "sft"),
        "--output_dir",
        env.out,
        "--max_steps",
        "1",
        "--report_to",
        "none",
        *flags,
    ]


def pt(env, *flags, data=None):
    return "pt", [
        "--model_name_or_path",
        env.model,
        "--train_file_dir",
        data or str(DATA / "pt"),
        "--output_dir",
        env.out,
        "--max_steps",
        "1",
        "--report_to",
        "none",
        "--block_size",
        "64",
        *flags,
    ]


def rm(env, data, *flags):
    return "rm", [
        "--model_name_or_path",
        env.model,
        "--template_name",
        "qwen",
        "--train_file_dir",
        data,
        "--output_dir",
        env.out,
        "--max_steps",
        "1",
        "--report_to",
        "none",
        *flags,
    ]


def dpo(env, data, *flags):
    return "dpo", [
        "--model_name_or_path",
        env.model,
        "--template_name",
        "qwen",
        "--train_file_dir",
        data,
        "--output_dir",
        env.out,
        "--max_steps",
        "1",
        "--report_to",
        "none",
        *flags,
    ]


def ppo(env, data, *flags):
    return "ppo", [
        "--model_name_or_path",
        env.model,
        "--reward_model_name_or_path",
        env.reward,
        "--template_name",
        "qwen",
        "--train_file_dir",
        data,
        "--output_dir",
        env.out,
        "--max_steps",
        "1",
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        "2",
        *flags,
    ]


def convert(env, path: Path, text: bytes, kind: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    return "convert", [
        "--input",
        str(path),
        "--output",
        str(env.tmp / "converted.jsonl"),
        "--from",
        kind,
    ]


def finished_run(env):
    """An output folder holding a trained model and checkpoints of another run."""
    out = Path(env.out)
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    return out


def recorded_run(env, model: str):
    out = finished_run(env)
    (out / "pipeline_run.json").write_text(
        json.dumps(
            {"stage": "sft", "model_name_or_path": model, "train_file_dir": str(DATA / "sft")}
        )
    )


def damaged_copy(env, name: str, damage) -> str:
    """A copy of the tiny model with one file damaged by `damage(path)`; returns the folder."""
    import shutil

    folder = env.tmp / "damaged"
    shutil.copytree(env.model, folder)
    damage(folder / name)
    return str(folder)


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def lora_adapter(env) -> str:
    """An adapter folder with a damaged adapter_config.json (a half-written copy)."""
    folder = env.tmp / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    return str(folder)


def deepspeed_file(env, text: str) -> str:
    (env.tmp / "ds.json").write_text(text)
    return str(env.tmp / "ds.json")


# id -> (build(env) -> (entry, argv), fragments the one error sentence must contain)
CASES = {
    # flags and their values
    "unknown-flag": (lambda e: sft(e, "--lerning_rate", "1e-4"), ["--lerning_rate", "--help"]),
    "batch-size-0": (
        lambda e: sft(e, "--per_device_train_batch_size", "0"),
        ["--per_device_train_batch_size", "at least 1"],
    ),
    "accumulation-0": (
        lambda e: sft(e, "--gradient_accumulation_steps", "0"),
        ["--gradient_accumulation_steps"],
    ),
    "output-dir-is-a-file": (
        lambda e: (Path(e.out).write_text("x"), sft(e))[1],
        ["--output_dir", "is a file"],
    ),
    "eval-steps-without-eval-data": (
        lambda e: sft(e, "--eval_strategy", "steps", "--validation_split_percentage", "0"),
        ["--eval_strategy steps", "--validation_file_dir"],
    ),
    "eval-on-start-without-eval-data": (
        lambda e: pt(e, "--eval_on_start", "True", "--validation_split_percentage", "0"),
        ["--eval_on_start", "held-out"],
    ),
    "max-train-samples-0": (
        lambda e: sft(e, "--max_train_samples", "0"),
        ["--max_train_samples 0", "-1"],
    ),
    "no-model": (
        lambda e: ("sft", ["--train_file_dir", "x", "--output_dir", e.out]),
        ["--model_name_or_path is required"],
    ),
    "no-train-dir": (
        lambda e: ("sft", ["--model_name_or_path", e.model, "--output_dir", e.out]),
        ["--train_file_dir is required"],
    ),
    "missing-model-folder": (
        lambda e: sft(e, "--model_name_or_path", str(e.tmp / "no-model")),
        ["--model_name_or_path", "no-model does not exist"],
    ),
    "model-type-mismatch": (
        lambda e: sft(e, "--model_type", "qwen2"),
        ["--model_type qwen2", "'llama'"],
    ),
    "4bit-and-8bit": (
        lambda e: sft(e, "--load_in_4bit", "True", "--load_in_8bit", "True"),
        ["--load_in_4bit", "--load_in_8bit"],
    ),
    "quantized-full-training": (
        lambda e: sft(e, "--qlora", "True", "--use_peft", "False"),
        ["--use_peft True"],
    ),
    "lora-rank-0": (lambda e: sft(e, "--lora_rank", "0"), ["--lora_rank", "positive"]),
    "lora-dropout-1.5": (lambda e: sft(e, "--lora_dropout", "1.5"), ["--lora_dropout"]),
    "peft-path-not-an-adapter": (
        lambda e: sft(e, "--peft_path", e.model),
        ["--peft_path", "adapter_config.json"],
    ),
    "unknown-template": (
        lambda e: sft(e, "--template_name", "no_such_template"),
        ["no_such_template"],
    ),
    "resume-missing-step": (
        lambda e: sft(e, "--resume_from_checkpoint", "7"),
        ["--resume_from_checkpoint 7", "does not exist"],
    ),
    "model-max-length-4": (
        lambda e: sft(e, "--model_max_length", "4"),
        ["--model_max_length", "at least 8"],
    ),
    "fp16-on-cpu": (lambda e: sft(e, "--fp16", "True"), ["--fp16", "CUDA"]),
    "shift-attn": (lambda e: sft(e, "--shift_attn", "True"), ["--shift_attn"]),
    "packing-with-neftune": (
        lambda e: sft(e, "--packing", "True", "--neft_alpha", "5"),
        ["--packing True", "--neft_alpha"],
    ),
    "rope-scaling-too-short": (
        lambda e: sft(e, "--rope_scaling", "linear", "--model_max_length", "64"),
        ["--rope_scaling linear", "--model_max_length"],
    ),
    "source-without-target-length": (
        lambda e: rm(e, str(DATA / "reward"), "--max_source_length", "64"),
        ["--max_source_length", "--max_target_length"],
    ),
    "yaml-syntax-error": (
        lambda e: (
            "sft",
            [str((e.tmp / "c.yaml", (e.tmp / "c.yaml").write_text("a: [1\nb: 2\n"))[0])],
        ),
        ["c.yaml:2", "YAML"],
    ),
    "yaml-mapping-value": (
        lambda e: (
            "sft",
            [str((e.tmp / "m.yaml", (e.tmp / "m.yaml").write_text("lora: {rank: 8}\n"))[0])],
        ),
        ["m.yaml", "'lora'", "mapping"],
    ),
    "config-file-missing": (
        lambda e: ("sft", ["--config", str(e.tmp / "nope.yaml")]),
        ["nope.yaml does not exist"],
    ),
    "learning-rate-negative": (
        lambda e: sft(e, "--learning_rate", "-1e-3"),
        ["--learning_rate", "> 0", "-0.001"],
    ),
    "learning-rate-nan": (
        lambda e: sft(e, "--learning_rate", "nan"),
        ["--learning_rate", "finite"],
    ),
    "max-steps-negative": (lambda e: pt(e, "--max_steps", "-5"), ["--max_steps", ">= -1", "-5"]),
    "warmup-steps-negative": (
        lambda e: rm(e, str(DATA / "reward"), "--warmup_steps", "-10"),
        ["--warmup_steps", ">= 0"],
    ),
    "dpo-beta-0": (lambda e: dpo(e, str(DATA / "reward"), "--beta", "0"), ["--beta", "> 0"]),
    "ppo-top-p-0": (
        lambda e: ppo(e, jsonl(e.tmp / "q" / "q.jsonl", CHAT), "--top_p", "0"),
        ["--top_p", "> 0"],
    ),
    "max-nonfinite-steps-0": (
        lambda e: sft(e, "--max_nonfinite_steps", "0"),
        ["--max_nonfinite_steps", "at least 1"],
    ),
    "nan-inf-filter-on": (
        lambda e: sft(e, "--logging_nan_inf_filter", "True"),
        ["--logging_nan_inf_filter", "NaN"],
    ),
    # DeepSpeed files
    "deepspeed-missing": (
        lambda e: sft(e, "--deepspeed", str(e.tmp / "none.json")),
        ["--deepspeed", "none.json does not exist"],
    ),
    "deepspeed-bad-json": (
        lambda e: sft(
            e, "--deepspeed", deepspeed_file(e, '{\n "zero_optimization": {"stage": 2,}\n}')
        ),
        ["ds.json:2:", "not valid JSON"],
    ),
    "deepspeed-batch-mismatch": (
        lambda e: sft(
            e,
            "--deepspeed",
            deepspeed_file(e, '{"train_micro_batch_size_per_gpu": 4}'),
            "--per_device_train_batch_size",
            "2",
        ),
        ["train_micro_batch_size_per_gpu 4", "--per_device_train_batch_size is 2", "auto"],
    ),
    # damaged model folders
    "model-weights-cut-short": (
        lambda e: sft(e, "--model_name_or_path", damaged_copy(e, "model.safetensors", cut_short)),
        ["model.safetensors", "truncated"],
    ),
    "model-config-cut-short": (
        lambda e: pt(e, "--model_name_or_path", damaged_copy(e, "config.json", cut_short)),
        ["config.json:", "not valid JSON"],
    ),
    "peft-path-damaged-adapter-config": (
        lambda e: sft(e, "--peft_path", lora_adapter(e)),
        ["adapter_config.json:1", "not valid JSON"],
    ),
    # the start model and the data are never written to
    "output-dir-is-the-start-model": (
        lambda e: sft(e, "--output_dir", e.model),
        ["--output_dir", "--model_name_or_path"],
    ),
    "output-dir-inside-the-start-model": (
        lambda e: pt(e, "--output_dir", str(Path(e.model) / "run")),
        ["inside of --model_name_or_path"],
    ),
    "output-dir-is-the-reward-model": (
        lambda e: ppo(e, jsonl(e.tmp / "q" / "q.jsonl", CHAT), "--output_dir", e.reward),
        ["--reward_model_name_or_path"],
    ),
    "output-dir-inside-the-data": (
        lambda e: sft(
            e, "--output_dir", str(e.tmp / "d" / "out"), data=jsonl(e.tmp / "d" / "c.jsonl", CHAT)
        ),
        ["inside of --train_file_dir"],
    ),
    "start-model-in-a-checkpoint-of-the-run": (
        lambda e: (
            finished_run(e),
            sft(e, "--model_name_or_path", str(Path(e.out) / "checkpoint-2")),
        )[1],
        ["checkpoint-2", "lies inside --output_dir"],
    ),
    "output-dir-under-a-file": (
        lambda e: ((e.tmp / "f").write_text("x"), sft(e, "--output_dir", str(e.tmp / "f" / "out")))[
            1
        ],
        ["--output_dir", "which is a file"],
    ),
    # output folders
    "output-dir-holds-another-run": (
        lambda e: (finished_run(e), sft(e))[1],
        ["--output_dir", "holds another run", "--overwrite_output_dir"],
    ),
    "resume-into-another-models-run": (
        lambda e: (recorded_run(e, "/somewhere/else"), sft(e, "--resume_from_checkpoint", "auto"))[
            1
        ],
        ["--output_dir", "/somewhere/else", "--overwrite_output_dir"],
    ),
    "finished-run-without-checkpoint": (
        lambda e: (
            (
                Path(e.out).mkdir(),
                (Path(e.out) / "train_results.json").write_text("{}"),
                (Path(e.out) / "config.json").write_text("{}"),
            ),
            sft(e, "--resume_from_checkpoint", "auto"),
        )[1],
        ["holds a finished run", "--overwrite_output_dir"],
    ),
    # data
    "train-dir-missing": (
        lambda e: sft(e, data=str(e.tmp / "nowhere")),
        ["--train_file_dir", "nowhere"],
    ),
    "empty-file": (lambda e: sft(e, data=jsonl(e.tmp / "d" / "empty.jsonl")), ["empty.jsonl"]),
    "pt-not-utf8": (
        lambda e: (
            (e.tmp / "t").mkdir(),
            (e.tmp / "t" / "gbk.txt").write_bytes("好\n".encode("gbk")),
            pt(e, data=str(e.tmp / "t")),
        )[-1],
        ["gbk.txt:1:", "UTF-8"],
    ),
    "malformed-json-line": (
        lambda e: sft(e, data=jsonl(e.tmp / "d" / "c.jsonl", CHAT, '{"conversations": [')),
        ["c.jsonl:2:", "JSON"],
    ),
    "unknown-record-shape": (
        lambda e: sft(e, data=jsonl(e.tmp / "d" / "c.jsonl", {"text": "x"})),
        ["c.jsonl:1:", "unknown record shape"],
    ),
    "null-user-content": (
        lambda e: sft(
            e,
            data=jsonl(
                e.tmp / "d" / "c.jsonl",
                CHAT,
                {
                    "messages": [
                        {"role": "user", "content": None},
                        {"role": "assistant", "content": "a"},
                    ]
                },
            ),
        ),
        ["c.jsonl:2:", "user message has no content"],
    ),
    "empty-assistant": (
        lambda e: sft(
            e,
            data=jsonl(
                e.tmp / "d" / "c.jsonl",
                {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
            ),
        ),
        ["c.jsonl:1:", "assistant message is empty"],
    ),
    "unknown-role": (
        lambda e: sft(
            e,
            data=jsonl(
                e.tmp / "d" / "c.jsonl",
                {"conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]},
            ),
        ),
        ["c.jsonl:1:", "unknown role 'bot'"],
    ),
    "number-as-content": (
        lambda e: sft(
            e,
            data=jsonl(
                e.tmp / "d" / "c.jsonl",
                {"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]},
            ),
        ),
        ["c.jsonl:1:", "must be a string"],
    ),
    "tool-result-without-call": (
        lambda e: sft(
            e,
            data=jsonl(
                e.tmp / "d" / "c.jsonl",
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                        {"role": "tool", "content": "r"},
                        {"role": "assistant", "content": "b"},
                    ]
                },
            ),
        ),
        ["c.jsonl:1:", "tool message"],
    ),
    "alpaca-number-instruction": (
        lambda e: sft(e, data=jsonl(e.tmp / "d" / "a.jsonl", {"instruction": 3, "output": "a"})),
        ["a.jsonl:1:", '"instruction" must be a string'],
    ),
    "nothing-fits": (lambda e: sft(e, "--model_max_length", "8"), ["--model_max_length 8"]),
    # preference data
    "pair-number-as-prompt": (
        lambda e: rm(e, jsonl(e.tmp / "p" / "p.jsonl", {**PAIR, "question": 5})),
        ["p.jsonl:1:", "must be a string"],
    ),
    "pair-unknown-prompt-role": (
        lambda e: rm(
            e,
            jsonl(
                e.tmp / "p" / "p.jsonl",
                {"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"},
            ),
        ),
        ["p.jsonl:1:", "unknown role 'bot'"],
    ),
    "pair-missing-field": (
        lambda e: rm(e, jsonl(e.tmp / "p" / "p.jsonl", {"question": "q", "response_chosen": "a"})),
        ["p.jsonl:1:", "'response_rejected' is missing"],
    ),
    "pair-null-answer": (
        lambda e: rm(e, jsonl(e.tmp / "p" / "p.jsonl", {**PAIR, "response_chosen": None})),
        ["p.jsonl:1:", '"response_chosen"'],
    ),
    "pairs-all-identical": (
        lambda e: dpo(e, jsonl(e.tmp / "p" / "p.jsonl", {**PAIR, "response_rejected": "a"})),
        ["no usable preference record", "1 read", "chosen equals rejected"],
    ),
    "pairs-all-too-long": (
        lambda e: dpo(
            e,
            jsonl(e.tmp / "p" / "p.jsonl", {**PAIR, "question": "word " * 300}),
            "--model_max_length",
            "32",
        ),
        ["--model_max_length 32"],
    ),
    "unpaired-record-without-kto": (
        lambda e: dpo(
            e, jsonl(e.tmp / "p" / "p.jsonl", {"prompt": "q", "completion": "a", "label": True})
        ),
        ["p.jsonl:1:", "--loss_type kto"],
    ),
    "margin-not-a-number": (
        lambda e: rm(e, jsonl(e.tmp / "p" / "p.jsonl", {**PAIR, "margin": "big"})),
        ["p.jsonl:1:", '"margin"'],
    ),
    # models of the wrong kind
    "sft-from-a-reward-model": (
        lambda e: sft(e, "--model_name_or_path", e.reward, "--tokenizer_name_or_path", e.model),
        ["reward", "ForSequenceClassification", "lm_head.weight"],
    ),
    "ppo-reward-model-is-a-language-model": (
        lambda e: (setattr(e, "reward", e.model), ppo(e, jsonl(e.tmp / "q" / "q.jsonl", CHAT)))[1],
        ["ForCausalLM", "score.weight"],
    ),
    "ppo-every-prompt-too-long": (
        lambda e: ppo(
            e,
            jsonl(
                e.tmp / "q" / "q.jsonl",
                {
                    "conversations": [
                        {"from": "human", "value": "word " * 300},
                        {"from": "gpt", "value": "a"},
                    ]
                },
            ),
            "--model_max_length",
            "96",
            "--max_new_tokens",
            "16",
        ),
        ["no usable prompt", "1 read", "longer than 80 tokens", "--model_max_length"],
    ),
    # convert
    "convert-not-utf8-csv": (
        lambda e: convert(
            e, e.tmp / "gbk.csv", b"instruction,output\n" + "你好,世界\n".encode("gbk"), "csv"
        ),
        ["gbk.csv:2:", "UTF-8", "iconv"],
    ),
    "convert-empty-answer": (
        lambda e: convert(e, e.tmp / "a.csv", b"instruction,output\nhello,\n", "csv"),
        ["a.csv:2:", "assistant message is empty"],
    ),
    "convert-missing-column": (
        lambda e: convert(e, e.tmp / "b.csv", b"instruction,answer\nhello,world\n", "csv"),
        ["b.csv:2:", "'output' is missing"],
    ),
    "convert-over-its-input": (
        lambda e: (
            ("convert", ["--input", str(e.tmp / "a.json"), "--output", str(e.tmp / "a.json")])
            if (e.tmp / "a.json").write_text('[{"instruction": "q", "output": "a"}]')
            else None
        ),
        ["--output", "is the --input file"],
    ),
    "convert-missing-input": (
        lambda e: (
            "convert",
            ["--input", str(e.tmp / "none.json"), "--output", str(e.tmp / "o.jsonl")],
        ),
        ["--input", "none.json does not exist"],
    ),
}


class Env:
    def __init__(self, tmp: Path, model: Path, reward: Path):
        self.tmp, self.model, self.reward, self.out = tmp, str(model), str(reward), str(tmp / "out")


@pytest.fixture(scope="module")
def reward_folder(tiny_model, tmp_path_factory) -> Path:
    """A reward-model folder (score head, no language-model head) built from the tiny model,
    untrained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm-folder") / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(
        out
    )
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def entry_point(name: str):
    from importlib import import_module

    module = import_module("pipeline.tools.convert" if name == "convert" else f"stages.{name}")
    return module.main


def run_in_process(entry: str, argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(
        SystemExit
    ) as stop:  # a bad input that is accepted does not raise: the test fails
        run_cli(lambda: entry_point(entry)(argv))
    return stop.value.code, capsys.readouterr().err


def one_sentence(code, err: str, fragments: list[str]) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    missing = [f for f in fragments if f not in errors[0]]
    assert not missing, f"{missing} not in: {errors[0]}"


def test_the_corpus_has_at_least_forty_kinds():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_in_one_sentence(case, tiny_model, reward_folder, tmp_path, capsys):
    build, fragments = CASES[case]
    env = Env(tmp_path, tiny_model, reward_folder)
    entry, argv = build(env)
    code, err = run_in_process(entry, argv, capsys)
    one_sentence(code, err, fragments)
    out = Path(env.out)
    if (
        entry != "convert" and out.is_dir()
    ):  # nothing trained: no model, no checkpoint written by this run
        assert (
            not list(out.glob("*.safetensors"))
            and not (out / "train_results.json").exists()
            or case.startswith(("output-dir-holds", "resume-into", "finished-run"))
        ), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize(
    "case", ["unknown-flag", "batch-size-0", "null-user-content", "sft-from-a-reward-model"]
)
def test_through_the_launcher(case, tiny_model, reward_folder, tmp_path):
    """The same mistakes through run_sft.sh (torchrun, one process): one sentence, exit 2, no
    traceback."""
    build, fragments = CASES[case]
    entry, argv = build(Env(tmp_path, tiny_model, reward_folder))
    proc = subprocess.run(
        ["bash", "run_sft.sh", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "NPROC_PER_NODE": "1"},
    )
    one_sentence(proc.returncode, proc.stderr, fragments)


@pytest.mark.parametrize("case", ["convert-not-utf8-csv", "pair-number-as-prompt"])
def test_directly_as_a_command(case, tiny_model, reward_folder, tmp_path):
    build, fragments = CASES[case]
    entry, argv = build(Env(tmp_path, tiny_model, reward_folder))
    command = ["-m", "pipeline.convert"] if entry == "convert" else [f"stages/{entry}.py"]
    proc = subprocess.run(
        [sys.executable, *command, *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    one_sentence(proc.returncode, proc.stderr, fragments)
