"""Data formats: every seed format normalizes (tool calls included); invalid records are errors with
file:line, or skipped and counted with --skip_invalid_samples."""

import json

import pytest

from pipeline.data.conversations import normalize, read_conversations
from pipeline.errors import UserError
from tests.helpers import DATA


def by_first_user(convs):
    return {next(m["content"] for m in c["messages"] if m["role"] == "user"): c for c in convs}


@pytest.fixture(scope="module")
def examples():
    convs, report = read_conversations(str(DATA / "examples" / "sft"), "--train_file_dir")
    assert report.read == report.kept == len(convs) == 14
    return by_first_user(convs)


def test_sharegpt_function_call_and_observation(examples):
    c = examples["Is it raining in Hangzhou?"]
    roles = [m["role"] for m in c["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert c["messages"][1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Hangzhou"},
    }
    assert c["tools"][0]["function"]["name"] == "get_weather"


def test_glm4_tools_on_system_and_json_call_before_observation(examples):
    c = examples["I want a book about lighthouses."]
    assert c["tools"][0]["function"]["name"] == "search_books"
    assert (
        c["messages"][2]["tool_calls"][0]["function"]["name"] == "search_books"
        and c["messages"][2]["content"] == ""
    )
    assert c["messages"][3]["role"] == "tool"


def test_openai_tool_calls(examples):
    c = examples["Weather in Oslo?"]
    assert c["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'


def test_chatglm3_tool_message_becomes_call_plus_observation(examples):
    c = examples["100 欧元是多少人民币？"]
    roles = [m["role"] for m in c["messages"]]
    assert roles == ["system", "user", "assistant", "assistant", "tool", "assistant"]
    assert c["messages"][3]["tool_calls"][0]["function"]["arguments"] == {
        "amount": 100,
        "from": "EUR",
        "to": "CNY",
    }
    assert json.loads(c["messages"][4]["content"]) == {"result": 782.5}


def test_alpaca_with_history_and_per_message_loss(examples):
    c = examples["What is crop rotation?"]
    assert [m["role"] for m in c["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    joke = examples["给我讲个冷笑话。"]
    assert joke["messages"][0]["loss"] is False and joke["messages"][1]["loss"] is True
    translate = examples["把下面的句子翻译成英文。\n雨后的空气格外清新。"]
    assert translate["messages"][1]["content"] == "The air is especially fresh after the rain."


BAD = {
    "unknown role": (
        {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]},
        "unknown role 'narrator'",
    ),
    "system not first": (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "system message must come first",
    ),
    "two systems": (
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "system", "content": "t"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "more than one system",
    ),
    "empty assistant": (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
        "assistant message is empty",
    ),
    "two users": (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "a user message cannot follow a user message",
    ),
    "starts with assistant": (
        {"messages": [{"role": "assistant", "content": "a"}]},
        "the conversation starts with an assistant message",
    ),
    "observation without call": (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "tool", "content": "r"},
                {"role": "assistant", "content": "b"},
            ]
        },
        "tool message cannot follow",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_record_names_file_and_line(tmp_path, case):
    record, reason = BAD[case]
    path = tmp_path / "d" / "chats.jsonl"
    path.parent.mkdir()
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError) as info:
        read_conversations(str(path.parent), "--train_file_dir")
    assert f"{path}:2:" in str(info.value) and reason in str(info.value)


def test_skip_invalid_counts_each_reason(tmp_path):
    path = tmp_path / "d" / "chats.jsonl"
    path.parent.mkdir()
    records = [
        BAD["unknown role"][0],
        BAD["two systems"][0],
        BAD["two systems"][0],
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    convs, report = read_conversations(str(path.parent), "--train_file_dir", skip_invalid=True)
    assert len(convs) == 1 and report.read == 4 and report.kept == 1
    assert report.dropped == {
        "unknown role 'narrator' in conversations": 1,
        "more than one system message": 2,
    }
    assert "3 dropped" not in report.summary(
        "x"
    ) and "2 dropped (more than one system message)" in report.summary("x")


def test_forced_format_and_unknown_shape():
    with pytest.raises(Exception, match="unknown record shape"):
        normalize({"text": "plain"})
    conv = normalize({"instruction": "i", "output": "o"}, "alpaca")
    assert conv["messages"][-1] == {"role": "assistant", "content": "o"}


def test_converter_alpaca_qa_csv_to_sharegpt(tmp_path):
    from pipeline.tools.convert import convert

    out = tmp_path / "alpaca.jsonl"
    assert (
        convert(str(DATA / "examples" / "sft" / "alpaca_instructions.json"), str(out), "alpaca")
        == 3
    )
    first = json.loads(out.read_text().splitlines()[2])
    assert (
        first["system"] == "Answer briefly."
        and [t["from"] for t in first["conversations"]] == ["human", "gpt"] * 2
    )
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q1", "answer": "a1"}\n')
    convert(str(qa), str(tmp_path / "qa_out.jsonl"), "qa")
    assert json.loads((tmp_path / "qa_out.jsonl").read_text()) == {
        "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]
    }
    table = tmp_path / "t.csv"
    table.write_text("instruction,input,output\nTranslate,你好,Hello\n", encoding="utf-8")
    convert(str(table), str(tmp_path / "csv_out.jsonl"), "csv")
    record = json.loads((tmp_path / "csv_out.jsonl").read_text())
    assert record["conversations"][0]["value"] == "Translate\n你好"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: cannot convert"):
        convert(str(bad), str(tmp_path / "never.jsonl"), "qa")


def test_preview_prints_the_table(tiny_model, capsys):
    from pipeline.tools.preview import main

    main(
        [
            "--file",
            str(DATA / "examples" / "sft" / "messages_tools.jsonl"),
            "--template_name",
            "glm4",
            "--tokenizer_name_or_path",
            str(tiny_model),
            "--index",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert (
        "[gMASK]<sop><|system|>" in out
        and "<|assistant|>search_books" in out
        and "'<|observation|>'" in out
    )


ADVERTISEGEN = {"content": "类型#裙*颜色#蓝色*风格#清新", "summary": "这条蓝色的裙子清新自然。"}


def test_advertisegen_records_are_read_as_a_question_and_its_answer():
    conv = normalize(ADVERTISEGEN)
    assert conv["messages"] == [
        {"role": "user", "content": ADVERTISEGEN["content"]},
        {"role": "assistant", "content": ADVERTISEGEN["summary"]},
    ]


def test_named_columns_read_any_two_field_record(tmp_path):
    from pipeline.data.conversations import column_format

    fmt = column_format("auto", "ask", "reply")
    assert normalize({"ask": "q", "reply": "a", "id": 3}, fmt)["messages"][1] == {
        "role": "assistant",
        "content": "a",
    }
    with pytest.raises(Exception, match='the field "reply" is missing'):
        normalize({"ask": "q"}, fmt)
    with pytest.raises(Exception, match='"ask" must be a string'):
        normalize({"ask": ["q"], "reply": "a"}, fmt)
    with pytest.raises(UserError, match="--prompt_column needs --response_column too"):
        column_format("auto", "ask", None)
    with pytest.raises(UserError, match="not --data_format alpaca"):
        column_format("alpaca", "ask", "reply")
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.json").write_text('{"ask": "q1", "reply": "a1"}\n{"ask": "q2"}\n')
    with pytest.raises(UserError, match=r'train.json:2: .*the field "reply" is missing'):
        read_conversations(str(folder), "--train_file_dir", fmt)
    convs, report = read_conversations(str(folder), "--train_file_dir", fmt, skip_invalid=True)
    assert len(convs) == 1 and report.read == 2


def test_converter_reads_advertisegen_and_named_columns(tmp_path):
    from pipeline.tools.convert import main

    source = tmp_path / "train.json"
    source.write_text(json.dumps(ADVERTISEGEN, ensure_ascii=False) + "\n")
    main(["--input", str(source), "--output", str(tmp_path / "out.jsonl")])
    assert (
        json.loads((tmp_path / "out.jsonl").read_text())["conversations"][1]["value"]
        == ADVERTISEGEN["summary"]
    )
    source.write_text('{"ask": "q", "reply": "a"}\n')
    main(
        [
            "--input",
            str(source),
            "--output",
            str(tmp_path / "named.jsonl"),
            "--prompt_column",
            "ask",
            "--response_column",
            "reply",
        ]
    )
    assert json.loads((tmp_path / "named.jsonl").read_text())["conversations"][0] == {
        "from": "human",
        "value": "q",
    }
