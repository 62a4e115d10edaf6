"""No data is skipped without a word: data folders are read through symbolic links (each folder and
file once), and what cannot be read (a folder that cannot be listed, a file that cannot be opened, a
dangling or looping link, a pipe) stops the run with one sentence naming it; JSON past what Python
parses (nesting 100,000 deep, a 5,000-digit integer, half a character) is a `file:line:` error, not
a traceback. Through the readers the stages call, and one real stage."""

import csv
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from pipeline.data.files import find_files, iter_json_records, load_text_dataset
from pipeline.data.json_text import MAX_JSON_DEPTH, parse_json
from pipeline.errors import UserError

DEEP = "[" * 100_000 + "]" * 100_000
LONG_INT = "7" * 5000


def docs(path: Path, n: int, word: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'{{"text": "{word} {i}"}}\n' for i in range(n)))
    return path


def error_for(directory: Path) -> str:
    with pytest.raises(UserError) as info:
        load_text_dataset(str(directory), "--train_file_dir")
    return str(info.value)


def linked_tree(tmp_path: Path) -> Path:
    """d/a.jsonl (8 documents) and d/link -> ../real (32 documents in real/b.jsonl)."""
    docs(tmp_path / "d" / "a.jsonl", 8, "here")
    docs(tmp_path / "real" / "b.jsonl", 32, "linked")
    (tmp_path / "d" / "link").symlink_to("../real", target_is_directory=True)
    return tmp_path / "d"


def test_a_symlinked_subfolder_is_read_and_hidden_entries_are_still_skipped(tmp_path):
    d = linked_tree(tmp_path)
    docs(d / ".cache" / "junk.jsonl", 1, "hidden").write_text(
        "not json\n"
    )  # hidden folder: not read
    (d / ".gone.jsonl").symlink_to("nowhere.jsonl")  # hidden dangling link: not looked at
    dataset, report = load_text_dataset(str(d), "--train_file_dir")
    assert (report.files, report.read, report.kept) == (2, 40, 40)
    assert sorted(dataset["text"]) == sorted(
        [f"here {i}" for i in range(8)] + [f"linked {i}" for i in range(32)]
    )
    assert find_files(str(d), "--train_file_dir") == [d / "a.jsonl", d / "link" / "b.jsonl"]


def test_a_folder_or_file_reached_twice_is_read_once_and_the_log_says_so(tmp_path, caplog):
    d = linked_tree(tmp_path)
    (d / "same").symlink_to("../real", target_is_directory=True)
    (d / "again.jsonl").symlink_to("a.jsonl")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.files"):
        _, report = load_text_dataset(str(d), "--train_file_dir")
    assert report.read == 40 and report.files == 2
    assert f"{d / 'same'} is the same folder as {d / 'link'}" in caplog.text
    assert f"{d / 'again.jsonl'} is the same file as {d / 'a.jsonl'}" in caplog.text


def test_a_link_back_into_a_folder_that_holds_it_is_refused(tmp_path):
    d = linked_tree(tmp_path)
    (d / "link" / "loop").symlink_to(
        "../d", target_is_directory=True
    )  # d/link/loop -> d: reading never ends
    msg = error_for(d)
    assert msg.startswith(f"{d / 'link' / 'loop'} links back to {d}, a folder that holds it")
    assert "remove the link" in msg


@pytest.mark.parametrize(
    "make, says",
    [
        (
            lambda d: (d / "gone.jsonl").symlink_to("moved/away.jsonl"),
            "is a symbolic link to moved/away.jsonl, which does not exist",
        ),
        (
            lambda d: (d / "self.jsonl").symlink_to("self.jsonl"),
            "cannot be followed or read (Too many levels of symbolic links)",
        ),
        (lambda d: os.mkfifo(d / "pipe.jsonl"), "is neither a file nor a folder"),
    ],
    ids=["dangling link", "link cycle", "named pipe"],
)
def test_what_cannot_be_read_is_refused_naming_it(tmp_path, make, says):
    d = linked_tree(tmp_path)
    make(d)
    msg = error_for(d)
    assert str(d) in msg and says in msg and "\n" not in msg


# ---------------------------------------------------------------- permissions
# (root reads everything: drop it)


@pytest.fixture
def shared_dir():
    """A folder any user may enter (pytest's tmp_path is private to its owner); emptied even where
    chmod 000 was."""
    path = Path(tempfile.mkdtemp(prefix="pipeline-perm-"))
    path.chmod(0o755)
    yield path
    for folder, dirs, files in os.walk(path):  # top down: a folder is opened up before it is listed
        for entry in (os.path.join(folder, name) for name in dirs + files):
            if not os.path.islink(entry):
                os.chmod(entry, stat.S_IRWXU)
    shutil.rmtree(path)


def unprivileged(fn) -> str:
    """fn() in a forked child without root's power to read anything (uid/gid 65534 when the tests
    run as root, the test's own user otherwise): "ok: <result>", "UserError: <sentence>", or
    "<Exception>: <message>"."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, and os._exit
        os.close(read_end)
        try:
            if os.geteuid() == 0:
                try:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                except OSError as e:
                    raise RuntimeError(
                        f"skip: cannot drop root's privileges here ({e.strerror})"
                    ) from e
            result = f"ok: {fn()!r}"
        except UserError as e:
            result = f"UserError: {e}"
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test with it
            result = f"{type(e).__name__}: {e}"
        os.write(write_end, result.encode("utf-8", "backslashreplace"))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    if result.startswith("RuntimeError: skip: "):
        pytest.skip(result.removeprefix("RuntimeError: skip: "))
    return result


def test_a_folder_that_cannot_be_listed_is_refused(shared_dir):
    docs(shared_dir / "a.jsonl", 8, "here")
    docs(shared_dir / "locked" / "b.jsonl", 32, "locked")
    (shared_dir / "locked").chmod(0)
    result = unprivileged(lambda: find_files(str(shared_dir), "--train_file_dir"))
    assert result == (
        f"UserError: --train_file_dir: the folder {shared_dir / 'locked'} cannot be listed "
        "(Permission denied); give the user running this read and execute permission on it "
        "(chmod a+rx) or move it out of --train_file_dir."
    )


def test_a_file_that_cannot_be_read_is_refused(shared_dir):
    docs(shared_dir / "a.jsonl", 8, "here")
    locked = docs(shared_dir / "sub" / "b.jsonl", 32, "locked")
    locked.chmod(0)
    result = unprivileged(lambda: find_files(str(shared_dir), "--train_file_dir"))
    assert result == (
        f"UserError: {locked} cannot be read (Permission denied); "
        "make it readable (chmod a+r) or move it away."
    )
    result = unprivileged(
        lambda: list(iter_json_records(locked))
    )  # the readers that take one file (convert, chat)
    assert result.startswith(f"UserError: {locked} cannot be read (Permission denied)")


# ---------------------------------------------------------------- JSON past what Python parses


@pytest.mark.parametrize(
    "line, says",
    [
        (
            DEEP,
            f"objects and lists nested more than {MAX_JSON_DEPTH} deep "
            f"(column {MAX_JSON_DEPTH + 1}); flatten",
        ),
        (
            '{"text": "x", "n": ' + LONG_INT + "}",
            "an integer of 5000 digits, more than the 4300 Python reads (column 20); "
            "write such a number as a string",
        ),
        (
            '{"text": "half \\ud83d of a face"}',
            "a lone UTF-16 surrogate escape (half of a character) in a string (column 16)",
        ),
    ],
    ids=["deep", "long integer", "lone surrogate"],
)
def test_json_lines_past_what_python_parses_name_file_and_line(tmp_path, line, says):
    bad = tmp_path / "d" / "docs.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "fine"}\n' + line + "\n")
    msg = error_for(tmp_path / "d")
    assert msg.startswith(f"{bad}:2: {says}") and "\n" not in msg


@pytest.mark.parametrize(
    "text, says",
    [
        (
            '[{"text": "fine"},\n' + DEEP + "]",
            f"{{path}}:2: objects and lists nested more than {MAX_JSON_DEPTH} deep",
        ),
        (
            '[{"text": "fine"},\n\n {"text": "x", "n": -' + LONG_INT + "}]",
            "{path}:3: an integer of 5000 digits",
        ),
    ],
    ids=["deep", "long integer"],
)
def test_json_array_files_past_what_python_parses_name_file_and_line(tmp_path, text, says):
    bad = tmp_path / "d" / "docs.json"
    bad.parent.mkdir()
    bad.write_text(text)
    assert error_for(tmp_path / "d").startswith(says.format(path=bad))


def test_sft_records_go_through_the_same_reader(tmp_path):
    from pipeline.data.conversations import read_conversations

    bad = tmp_path / "d" / "chat.jsonl"
    bad.parent.mkdir()
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], '
        '"id": ' + LONG_INT + "}\n"
    )
    with pytest.raises(UserError, match=f"^{bad}:1: an integer of 5000 digits"):
        read_conversations(str(tmp_path / "d"), "--train_file_dir")


def test_parse_json_is_one_sentence_for_any_json_text():
    for text, says in (
        (DEEP, "nested more than"),
        (LONG_INT, "5000 digits"),
        ('"\\udc00"', "surrogate"),
        ("{", "not valid JSON"),
    ):
        with pytest.raises(UserError, match=f"^the tools of record 3: .*{says}"):
            parse_json(text, "the tools of record 3")
    assert parse_json('{"a": [1, "\\ud83d\\ude00"]}', "x") == {"a": [1, "\U0001f600"]}


# ---------------------------------------------------------------- other readers of user files


def test_a_preference_margin_past_float_range_is_an_invalid_record(tmp_path):
    from pipeline.data.preferences import read_preferences

    bad = tmp_path / "d" / "pairs.jsonl"
    bad.parent.mkdir()
    bad.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1' + "0" * 400 + "}\n"
    )
    with pytest.raises(UserError, match=f'^{bad}:1: "margin" must be a finite number, got 1000'):
        read_preferences(str(tmp_path / "d"), "--train_file_dir")


def test_tool_call_arguments_given_as_json_text_are_written_as_keywords():
    """ChatGLM3 writes a call's arguments as Python keywords: arguments given as JSON text (as
    OpenAI clients send them) are read as their object, as training reads them."""
    from pipeline.data.templates import render

    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    assert "city='Paris'" in render("chatglm3", messages)


def test_tool_call_arguments_that_are_not_an_object_are_one_sentence():
    from pipeline.data.templates import render

    for arguments in ("not json", "[" * 2000 + "]" * 2000):
        messages = [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": arguments}}
                ],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
        with pytest.raises(
            UserError, match=r"as a mapping, not as JSON text \(the call weather\)$"
        ):
            render("chatglm3", messages)


def test_convert_refuses_a_csv_field_past_the_csv_limit_naming_the_line(tmp_path):
    from pipeline.tools.convert import convert

    bad = tmp_path / "data.csv"
    with bad.open("w", newline="") as f:
        csv.writer(f).writerows([["question", "answer"], ["q", "a"], ["q", "x" * 200_000]])
    with pytest.raises(
        UserError, match=f"^{bad}:3: not readable as CSV \\(field larger than field limit"
    ):
        convert(str(bad), str(tmp_path / "out.jsonl"), "csv")


def test_report_refuses_a_results_file_past_what_python_parses(tmp_path):
    from pipeline.eval.report import build_report

    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "train_results.json").write_text("{}")
    (tmp_path / "pt" / "eval_results.json").write_text('{"perplexity": ' + DEEP + "}")
    with pytest.raises(
        UserError, match="eval_results.json is not valid JSON \\(objects and lists nested more than"
    ):
        build_report(tmp_path)


def test_a_pipeline_config_past_what_python_parses_is_one_sentence(tmp_path):
    from pipeline.tools.pipeline_config import load

    for name, value, says in (
        ("deep", DEEP, "maximum recursion depth"),
        ("long", LONG_INT, "4300 digits"),
    ):
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"stages: {value}\n")
        with pytest.raises(
            UserError, match=f"^pipeline config {config} does not parse \\(.*{says}"
        ):
            load(str(config))


def test_the_tiny_model_corpus_reads_a_symlinked_subfolder(tmp_path):
    from pipeline.model.tiny_model import corpus

    d = linked_tree(tmp_path)
    texts = corpus(d)
    assert (d / "link" / "b.jsonl").read_text() in texts and (d / "a.jsonl").read_text() in texts
    (d / "bad.txt").write_bytes(b"fine\n\xff\n")
    with pytest.raises(UserError, match=f"^{d / 'bad.txt'}:2: byte 0xff is not valid UTF-8"):
        corpus(d)


# ---------------------------------------------------------------- a real stage


@pytest.mark.slow
def test_pt_stage_trains_on_the_documents_of_a_symlinked_subfolder(tiny_model, tmp_path, caplog):
    from stages import pt

    d = linked_tree(tmp_path)
    with caplog.at_level(logging.INFO):
        pt.main(
            [
                "--model_name_or_path",
                str(tiny_model),
                "--train_file_dir",
                str(d),
                "--validation_split_percentage",
                "0",
                "--output_dir",
                str(tmp_path / "out"),
                "--block_size",
                "16",
                "--per_device_train_batch_size",
                "2",
                "--max_steps",
                "1",
                "--use_peft",
                "False",
                "--report_to",
                "none",
                "--save_strategy",
                "no",
            ]
        )
    summary = next(
        line for line in caplog.text.splitlines() if "--train_file_dir documents: " in line
    )
    assert "2 files, 40 " in summary and "40 kept" in summary, (
        summary
    )  # d/a.jsonl's 8 and d/link/b.jsonl's 32
    assert (tmp_path / "out" / "model.safetensors").is_file()
