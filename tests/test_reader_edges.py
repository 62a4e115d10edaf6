"""Data the readers used to take silently wrong: a top-level system prompt or tools left out, an
empty question trained, a tool call's broken JSON trained verbatim, held-out data that was also
trained, a byte-order mark trained as text, a JSON array's errors at the wrong line, a CSV row cut
at a comma, RL prompts without an answer scored against an empty one."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from pipeline.data.conversations import InvalidSample, normalize, read_conversations
from pipeline.data.files import check_apart, find_files, load_text_dataset, load_train_eval
from pipeline.data.preferences import normalize_preference
from pipeline.data.prompts import NO_REFERENCE, load_prompts
from pipeline.data.templates import resolve_template
from pipeline.errors import UserError
from pipeline.tools.convert import convert

USER, ANSWER = {"role": "user", "content": "Greet me"}, {"role": "assistant", "content": "Arr!"}
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    ],
}
RESULT = {"role": "tool", "content": "sunny"}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "record",
    [
        {"system": "You are a pirate.", "messages": [USER, ANSWER]},
        {"system": "You are a pirate.", "conversations": [USER, ANSWER]},  # ChatGLM3 style
    ],
)
def test_a_top_level_system_prompt_is_kept(record):
    messages = normalize(record)["messages"]
    assert messages[0] == {"role": "system", "content": "You are a pirate."}
    assert messages[1:] == [USER, ANSWER]
    same = {**record, **{k: [{"role": "system", "content": "You are a pirate."}, USER, ANSWER]
                         for k in ("messages", "conversations") if k in record}}  # fmt: skip
    assert normalize(same)["messages"] == messages  # written twice, the same: one
    other = {**record, **{k: [{"role": "system", "content": "Be brief."}, USER, ANSWER]
                          for k in ("messages", "conversations") if k in record}}  # fmt: skip
    with pytest.raises(InvalidSample, match='top-level "system" and a different system message'):
        normalize(other)


def test_a_pair_prompt_keeps_its_system_tools_and_tool_calls():
    record = {
        "system": "You are a pirate.",
        "tools": TOOLS,
        "prompt": [USER, CALL, RESULT, {"role": "user", "content": "And tomorrow?"}],
        "chosen": "Rain.",
        "rejected": "Sun.",
    }
    pair = normalize_preference(record)
    assert pair["prompt"][0] == {"role": "system", "content": "You are a pirate."}
    assert pair["prompt"][2]["tool_calls"] == CALL["tool_calls"]
    assert pair["tools"] == TOOLS
    kto = normalize_preference(
        {"system": "S", "tools": TOOLS, "prompt": "Q", "completion": "A", "label": True},
        unpaired=True,
    )
    assert kto["prompt"][0] == {"role": "system", "content": "S"} and kto["tools"] == TOOLS


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"prompt": "Q", "chosen": {"role": "user", "content": "A"}, "rejected": "B"},
         '"chosen" is a user message'),
        ({"prompt": "Q", "chosen": [USER, ANSWER], "rejected": [USER, ANSWER]},
         '"chosen" holds 2 messages; with a "prompt", give only the answer'),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
         'no "prompt"'),
        ({"prompt": "", "chosen": "A", "rejected": "B"}, 'no "prompt"'),
        ({"prompt": "  ", "chosen": "A", "rejected": "B"}, "a user message is empty"),
    ],
)  # fmt: skip
def test_pair_records_that_cannot_be_what_they_say_are_refused_with_the_reason(record, reason):
    with pytest.raises(InvalidSample, match=reason.replace("(", r"\(")):
        normalize_preference(record)


@pytest.mark.parametrize(
    "record",
    [
        {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "A"}]},
        {"messages": [{"role": "user", "content": " \n"}, ANSWER]},
        {"instruction": "", "input": "", "output": "A"},
    ],
)
def test_an_empty_question_is_refused(record):
    with pytest.raises(InvalidSample, match="a user message is empty"):
        normalize(record)


def test_a_tool_call_whose_arguments_are_broken_json_is_refused():
    broken = json.loads(json.dumps(CALL))
    broken["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    with pytest.raises(InvalidSample, match="'weather' are a string that is not JSON"):
        normalize({"messages": [USER, broken, RESULT, ANSWER]})
    assert normalize({"messages": [USER, CALL, RESULT, ANSWER]})["messages"][1] == CALL


def test_rl_prompts_may_end_with_the_user_unless_exact_match_needs_the_answer(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = resolve_template("qwen", tokenizer)
    folder = str(
        write_jsonl(
            tmp_path / "p" / "p.jsonl",
            [
                {"messages": [USER]},  # a prompt alone
                {"messages": [USER, ANSWER, {"role": "user", "content": "Again"}]},
                {"messages": [USER, ANSWER]},
            ],
        ).parent
    )
    prompts, report = load_prompts(folder, "--train_file_dir", template, tokenizer, 256)
    assert [p.reference for p in prompts] == [None, None, "Arr!"] and report.kept == 3
    with pytest.raises(UserError, match="2 of 3 conversations end without an answer"):
        load_prompts(folder, "--train_file_dir", template, tokenizer, 256, need_reference=True)
    prompts, report = load_prompts(
        folder, "--train_file_dir", template, tokenizer, 256, "auto", True, need_reference=True
    )
    assert [p.reference for p in prompts] == ["Arr!"] and report.dropped == {NO_REFERENCE: 2}


NO_EVAL = SimpleNamespace(seed=0, eval_strategy="no", eval_on_start=False)


def data_args(train: Path, held: Path | None) -> SimpleNamespace:
    return SimpleNamespace(
        train_source=(str(train), "--train_file_dir"),
        validation_source=(str(held), "--validation_file_dir"),
        has_validation=held is not None,
        validation_split_percentage=0,
    )


def test_held_out_data_that_is_also_trained_is_refused(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"messages": [USER, ANSWER]}])
    write_jsonl(tmp_path / "d" / "part" / "more.jsonl", [{"messages": [USER, ANSWER]}])
    for held in (tmp_path / "d", tmp_path / "d" / "part"):
        with pytest.raises(UserError, match="is both training data .* and held-out data"):
            check_apart(data_args(tmp_path / "d", held))
    with pytest.raises(UserError, match="is both training data"):  # through the stages' loader
        load_train_eval(
            lambda *source: source, data_args(tmp_path / "d", tmp_path / "d"), NO_EVAL, "samples"
        )
    write_jsonl(tmp_path / "apart" / "eval.jsonl", [{"messages": [USER, ANSWER]}])
    check_apart(data_args(tmp_path / "d", tmp_path / "apart"))  # apart: nothing said


def test_held_out_records_that_repeat_training_records_are_counted_in_the_log(tmp_path, caplog):
    from datasets import Dataset

    rows = [{"input_ids": [i, i + 1, i + 2], "text": f"doc {i}"} for i in range(40)]
    sets = {
        "train": Dataset.from_list(rows),
        "held": Dataset.from_list([rows[3], rows[7], {"input_ids": [1, 2], "text": "new"}]),
    }
    for name in sets:  # the files apart (the shared-file check reads them), the records not
        write_jsonl(tmp_path / name / "a.jsonl", [{"text": name}])
    args = data_args(tmp_path / "train", tmp_path / "held")
    with caplog.at_level("WARNING"):
        load_train_eval(lambda path, flag: sets[Path(path).name], args, NO_EVAL, "samples")
    assert "2 of the 3 samples in the held-out data are also in the training data" in caplog.text
    # a split of data that repeats its records: the copies that land on both sides are counted
    caplog.clear()
    repeated = Dataset.from_list(rows + rows[:20])
    split = SimpleNamespace(
        **{**vars(data_args(tmp_path, None)), "validation_split_percentage": 25}
    )
    with caplog.at_level("WARNING"):
        train, held = load_train_eval(lambda *source: repeated, split, NO_EVAL, "samples")
    train_ids = {tuple(r["input_ids"]) for r in train}
    both = sum(tuple(r["input_ids"]) in train_ids for r in held)
    assert both > 0 and f"{both} of the {len(held)} samples in the split held out" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # nothing repeated: nothing said
        load_train_eval(lambda *source: Dataset.from_list(rows), split, NO_EVAL, "samples")
    assert "also in the training data" not in caplog.text


def test_evaluating_during_training_needs_more_than_one_sample_to_split(tmp_path):
    from datasets import Dataset

    one = Dataset.from_list([{"text": "the only sample"}])
    args = SimpleNamespace(**{**vars(data_args(tmp_path, None)), "validation_split_percentage": 1})
    train, held = load_train_eval(lambda *source: one, args, NO_EVAL, "samples")
    assert len(train) == 1 and held is None  # said in the log, nothing to stop
    steps = SimpleNamespace(seed=0, eval_strategy="steps", eval_on_start=False)
    with pytest.raises(UserError, match="cannot hold out data from 1 training samples"):
        load_train_eval(lambda *source: one, args, steps, "samples")


@pytest.mark.parametrize(
    "held", ["sft_eval.jsonl", "eval/part0.jsonl", "my-test.jsonl", "test-00000-of-00002.jsonl"]
)
def test_held_out_files_named_so_beside_training_data_are_refused(tmp_path, held):
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"messages": [USER, ANSWER]}])
    write_jsonl(tmp_path / "d" / held, [{"messages": [USER, ANSWER]}])
    with pytest.raises(UserError, match="holds held-out data"):
        find_files(str(tmp_path / "d"), "--train_file_dir")
    training = [
        "contest_questions.jsonl", "code_test_gen.jsonl", "self-eval-critique.jsonl",
        "eval_harness_prompts/a.jsonl", "test-time-scaling/a.jsonl", "web_dev_qa.jsonl",
    ]  # fmt: skip
    for name in training:  # a held-out word inside a training file's name is not its kind
        write_jsonl(tmp_path / "ok" / name, [{"messages": [USER, ANSWER]}])
    assert len(find_files(str(tmp_path / "ok"), "--train_file_dir")) == len(training)


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text(
        "\ufeff" + json.dumps({"messages": [USER, ANSWER]}) + "\n", encoding="utf-8"
    )
    (tmp_path / "c" / "b.json").write_text(
        "\ufeff" + json.dumps([{"messages": [USER, ANSWER]}]), encoding="utf-8"
    )
    conversations, _ = read_conversations(str(tmp_path / "c"), "--train_file_dir")
    assert [c["messages"] for c in conversations] == [[USER, ANSWER]] * 2
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("\ufeffFirst document.\nSecond.\n", encoding="utf-8")
    dataset, _ = load_text_dataset(str(tmp_path / "t"), "--train_file_dir", str(tmp_path / "cache"))
    assert dataset["text"] == ["First document.", "Second."]
    (tmp_path / "t" / "a.txt").write_bytes(b"One.\rTwo.\r\nThree.\r")  # CR alone ends a line too
    dataset, _ = load_text_dataset(str(tmp_path / "t"), "--train_file_dir", str(tmp_path / "cache"))
    assert dataset["text"] == ["One.", "Two.", "Three."]
    # JSON lines ended by a carriage return alone: one record a line too, and errors name that line
    record = json.dumps({"messages": [USER, ANSWER]}).encode()
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_bytes(record + b"\r" + record + b"\r\n" + record + b"\r")
    conversations, _ = read_conversations(str(tmp_path / "j"), "--train_file_dir")
    assert len(conversations) == 3
    (tmp_path / "j" / "a.jsonl").write_bytes(record + b"\r" + record[:-1] + b"\r")
    with pytest.raises(UserError, match=r"a\.jsonl:2: not a valid JSON line"):
        read_conversations(str(tmp_path / "j"), "--train_file_dir")


def test_json_files_name_the_line_of_the_bad_record(tmp_path):
    records = [{"messages": [USER, ANSWER]}] * 3 + [{"messages": [USER]}]
    path = tmp_path / "c" / "a.json"
    path.parent.mkdir()
    text = json.dumps(records, indent=2)
    path.write_text(text, encoding="utf-8")
    starts = [n for n, line in enumerate(text.splitlines(), start=1) if line == "  {"]
    bad_line = starts[3]  # the line where the fourth record opens (its item number is 4)
    assert len(starts) == 4 and bad_line > 4
    with pytest.raises(UserError, match=rf"a.json:{bad_line}: no assistant message"):
        read_conversations(str(path.parent), "--train_file_dir")
    path.write_text(json.dumps(records[0], indent=2), encoding="utf-8")  # one object, not an array
    with pytest.raises(UserError, match="holds one JSON object written over several lines"):
        read_conversations(str(path.parent), "--train_file_dir")


def test_pretraining_records_with_an_empty_text_are_counted(tmp_path):
    write_jsonl(tmp_path / "p" / "a.jsonl", [{"text": "one"}, {"text": ""}, {"text": "two"}])
    dataset, report = load_text_dataset(
        str(tmp_path / "p"), "--train_file_dir", str(tmp_path / "cache")
    )
    assert dataset["text"] == ["one", "two"]
    assert (report.read, report.kept, report.dropped) == (3, 2, {'an empty "text"': 1})


def test_a_csv_row_with_more_cells_than_the_header_is_refused(tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("question,answer\nName a big number,1,000,000\n", encoding="utf-8")
    with pytest.raises(UserError, match="in.csv:2: 4 cells under a header of 2 columns"):
        convert(str(source), str(tmp_path / "out.jsonl"), "csv")
    source.write_text('question,answer\nName a big number,"1,000,000"\n', encoding="utf-8")
    assert convert(str(source), str(tmp_path / "out.jsonl"), "csv") == 1
    out = json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))
    assert out["conversations"][1]["value"] == "1,000,000"


def test_a_data_file_whose_name_holds_a_comma_is_one_file(tmp_path):
    from pipeline.args.data import DataArguments

    odd = write_jsonl(tmp_path / "my data" / "train,v2.jsonl", [{"messages": [USER, ANSWER]}])
    for name in ("a", "b"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"messages": [USER, ANSWER]}])
    assert DataArguments(train_file=[str(odd)]).train_file == [str(odd)]
    both = DataArguments(train_file=[f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl"])  # a list
    assert both.train_file == [f"{tmp_path}/a.jsonl", f"{tmp_path}/b.jsonl"]


def test_a_split_share_beside_given_held_out_data_is_refused(tmp_path):
    from pipeline.args.data import DataArguments

    write_jsonl(tmp_path / "t" / "a.jsonl", [{"messages": [USER, ANSWER]}])
    write_jsonl(tmp_path / "v" / "a.jsonl", [{"messages": [USER, ANSWER]}])
    given = {"train_file_dir": str(tmp_path / "t"), "validation_file_dir": str(tmp_path / "v")}
    with pytest.raises(UserError, match="--validation_split_percentage 50 holds out training"):
        DataArguments(**given, validation_split_percentage=50)  # it was ignored
    assert DataArguments(**given).has_validation  # the default share: nothing to say
    assert DataArguments(**given, validation_split_percentage=0).has_validation
