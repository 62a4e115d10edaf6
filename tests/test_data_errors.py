"""Bad input ends in one sentence naming the file (and line) and the fix, before any training."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.files import load_text_dataset
from pipeline.errors import UserError
from tests.helpers import REPO


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def error_for(directory: Path) -> str:
    with pytest.raises(UserError) as info:
        load_text_dataset(str(directory), "--train_file_dir")
    return str(info.value)


def test_missing_dir(tmp_path):
    msg = error_for(tmp_path / "nope")
    assert "nope is not a folder" in msg and "--train_file_dir" in msg


def test_empty_file(tmp_path):
    write(tmp_path / "d" / "good.txt", b"one document\n")
    bad = write(tmp_path / "d" / "sub" / "empty.txt", b"\n  \n")
    assert f"{bad} is empty" in error_for(tmp_path / "d")


def test_wrong_extension(tmp_path):
    write(tmp_path / "d" / "good.txt", b"one document\n")
    bad = write(tmp_path / "d" / "table.csv", b"a,b\n")
    msg = error_for(tmp_path / "d")
    assert f"{bad} has an unsupported extension" in msg and ".jsonl" in msg


def test_non_utf8_bytes_name_the_line(tmp_path):
    bad = write(
        tmp_path / "d" / "gbk.txt", "first line\n第二行\n".encode() + "第三行\n".encode("gbk")
    )
    msg = error_for(tmp_path / "d")
    assert f"{bad}:3:" in msg and "UTF-8" in msg and "iconv" in msg


def test_malformed_json_line(tmp_path):
    bad = write(tmp_path / "d" / "docs.jsonl", b'{"text": "ok"}\n{"text": "broken\n')
    msg = error_for(tmp_path / "d")
    assert f"{bad}:2:" in msg and "JSON" in msg


def test_record_without_text_field(tmp_path):
    bad = write(tmp_path / "d" / "docs.jsonl", b'{"text": "ok"}\n\n{"content": "x"}\n')
    msg = error_for(tmp_path / "d")
    assert f"{bad}:3:" in msg and '"text"' in msg


def test_json_array_file_is_read(tmp_path):
    write(tmp_path / "d" / "docs.json", '[{"text": "甲"}, {"text": "b"}]'.encode())
    dataset, report = load_text_dataset(str(tmp_path / "d"), "--train_file_dir")
    assert dataset["text"] == ["甲", "b"] and report.read == 2


@pytest.mark.slow
def test_stage_prints_one_sentence_and_exits_2(tiny_model, tmp_path):
    write(tmp_path / "d" / "docs.jsonl", b'{"text": "ok"}\nnot json\n')
    proc = subprocess.run(
        [
            sys.executable,
            "stages/pt.py",
            "--model_name_or_path",
            str(tiny_model),
            "--train_file_dir",
            str(tmp_path / "d"),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "docs.jsonl:2:" in errors[0]
    assert not (tmp_path / "out").exists(), "nothing should be written before the data is valid"


def test_when_nothing_fits_the_error_counts_what_was_read_and_dropped(tiny_model):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from pipeline.data.chat_dataset import build_chat_dataset
    from pipeline.data.templates import resolve_template
    from tests.helpers import DATA

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = resolve_template("qwen", tokenizer)
    sft_args = SimpleNamespace(
        data_format="auto",
        skip_invalid_samples=False,
        multi_turn_mode="all",
        train_on_inputs=False,
        model_max_length=8,
    )
    with pytest.raises(
        UserError,
        match=r"\d+ conversations read, no sample kept \(\d+ samples dropped: prompt \+ "
        r"first trained answer longer than --model_max_length 8\)",
    ):
        build_chat_dataset(
            str(DATA / "sft"),
            "--train_file_dir",
            template,
            tokenizer,
            sft_args,
            SimpleNamespace(preprocessing_num_workers=None),
        )


@pytest.mark.parametrize(
    "record, message",
    [
        (
            '{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
            "user message has no content",
        ),
        (
            '{"messages": [{"role": "user", "content": null}, '
            '{"role": "assistant", "content": "a"}]}',
            "user message has no content",
        ),
        (
            '{"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}',
            "user message has no content",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, '
            '{"role": "assistant", "content": null}]}',
            "assistant message has neither content nor tool_calls",
        ),
    ],
)
def test_null_or_missing_contents_name_the_file_and_line(tmp_path, record, message):
    from pipeline.data.conversations import read_conversations

    path = write(
        tmp_path / "chats.jsonl",
        (
            '{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", '
            '"content": "fine"}]}\n' + record + "\n"
        ).encode(),
    )
    with pytest.raises(UserError, match=f"{path}:2: .*{message}"):
        read_conversations(str(tmp_path), "--train_file_dir", "auto", False)
