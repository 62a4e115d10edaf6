"""The seed documents' tool-calling data, trained and then asked for at inference in the seed's own
form.

GLM-4's demo (seed 003: tools on the system message, the call as JSON text in the assistant's
content, an "observation" role), ChatGLM3's demo (seed 000: "tools" beside "conversations", a "tool"
message holding a call's name and parameters and its observation, per-message loss) and the same
chats in OpenAI's form (tool_calls, role "tool"): the ids SFT trains
(read_conversations -> encode_samples) equal the ids that the saved tokenizer's
`apply_chat_template(messages, tools=tools)` gives for the messages as the seed writes them, for the
whole conversation and for each answer's prompt (add_generation_prompt=True). The tokenizer is the
one the training stage saves: apply_template_to_tokenizer, save_pretrained, AutoTokenizer."""

import copy
import json
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from pipeline.data.conversations import CALL_STEPS, InvalidSample, normalize, read_conversations
from pipeline.data.masking import IGNORE_INDEX, Encoded, encode_samples
from pipeline.data.templates import (
    chat_template_jinja,
    field_template_names,
    get_template,
    render,
    resolve_template,
)

SEEDS = Path(__file__).parent / "data"
GLM4_SEED = json.loads(
    (SEEDS / "glm4_seed_tool_chat.jsonl").read_text(encoding="utf-8").splitlines()[0]
)
CHATGLM3_SEED = json.loads((SEEDS / "chatglm3_seed_tool_chat.json").read_text(encoding="utf-8"))[0]


def glm4_openai() -> dict:
    """Seed 003's chat in OpenAI's form: tools beside the messages, the call as tool_calls
    (arguments as JSON text, as OpenAI's API sends them), the result as role "tool"."""
    messages = copy.deepcopy(GLM4_SEED["messages"])
    tools = messages[0].pop("tools")
    call = json.loads(messages[2]["content"])
    messages[2] = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
            }
        ],
    }
    messages[3]["role"] = "tool"
    return {"messages": messages, "tools": tools}


def chatglm3_openai(mixed: bool = False) -> dict:
    """Seed 000's chat in OpenAI's form (tools wrapped, calls as tool_calls with arguments as a
    mapping, results as role "tool"); `mixed`: still ChatGLM3's conversations form, only its first
    call written OpenAI's way (an assistant message with tool_calls, then a "tool" message with only
    content)."""
    turns = CHATGLM3_SEED["conversations"]
    first_call = next(k for k, t in enumerate(turns) if t["role"] == "tool")
    out = []
    for k, turn in enumerate(turns):
        if turn["role"] != "tool" or (mixed and k != first_call):
            out.append(copy.deepcopy(turn))
            continue
        obs = turn["observation"]
        out += [
            {
                "role": "assistant",
                "content": "",
                **({"loss": turn["loss"]} if "loss" in turn else {}),
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": turn["name"], "arguments": turn["parameters"]},
                    }
                ],
            },
            {
                "role": "tool",
                "content": obs if isinstance(obs, str) else json.dumps(obs, ensure_ascii=False),
            },
        ]
    if mixed:
        return {"tools": CHATGLM3_SEED["tools"], "conversations": out}
    return {
        "messages": out,
        "tools": [{"type": "function", "function": t} for t in CHATGLM3_SEED["tools"]],
    }


def inference_form(record: dict) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools a user passes to apply_chat_template for a record, exactly as the
    record writes them."""
    return record.get("messages") or record["conversations"], record.get("tools")


def answers(messages: list[dict]) -> list[int]:
    """Where an answer starts, in the seed form: each assistant message and each ChatGLM3 "tool"
    message (its call)."""
    return [
        k
        for k, m in enumerate(messages)
        if m["role"] == "assistant" or (m["role"] == "tool" and "observation" in m)
    ]


@pytest.fixture()
def saved(tiny_model, tmp_path):
    """(training tokenizer, template, the tokenizer as the training stage saves and inference loads
    it)."""

    def make(name: str):
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        template = resolve_template(name, tokenizer)
        tokenizer.save_pretrained(tmp_path / name)
        return tokenizer, template, AutoTokenizer.from_pretrained(tmp_path / name)

    return make


def train(record: dict, folder: Path) -> dict:
    """The record as SFT reads it from a data file."""
    folder.mkdir()
    (folder / "chat.json").write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    [conv], _ = read_conversations(str(folder), "--train_file_dir")
    return conv


def chat_ids(tokenizer, messages, tools, generation: bool) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=generation,
            tokenize=True,
            return_dict=False,
        )
    )


def assert_trains_as_inference_asks(record: dict, name: str, saved, folder: Path) -> None:
    tokenizer, template, loaded = saved(name)
    conv = train(record, folder)
    samples = [s for s in encode_samples(template, tokenizer, conv) if isinstance(s, Encoded)]
    messages, tools = inference_form(record)
    whole = chat_ids(loaded, messages, tools, False)
    close = (
        [loaded.convert_tokens_to_ids(template.final_turn_end)]
        if template.final_turn_end and not template.turn_end
        else []
    )
    assert samples[-1].input_ids == whole + close, loaded.decode(whole)
    for k in answers(messages):
        prompt = chat_ids(loaded, messages[:k], tools, True)
        trained = messages[k].get("loss", True)
        if (
            not trained and len(samples) > 1
        ):  # a template that rewrites history trains each answer alone
            continue
        # the sample that trains answer k (or, untrained, holds it) starts with exactly its prompt's
        # ids
        assert any(
            s.input_ids[: len(prompt)] == prompt
            and len(s.labels) > len(prompt)
            and (s.labels[len(prompt)] != IGNORE_INDEX) == trained
            for s in samples
        ), (k, loaded.decode(prompt))


@pytest.mark.parametrize(
    "name, record",
    [
        ("glm4", GLM4_SEED),
        ("glm4", glm4_openai()),
        ("glm4", CHATGLM3_SEED),
        ("glm4", chatglm3_openai()),
        ("chatglm3", CHATGLM3_SEED),
        ("chatglm3", chatglm3_openai()),
        ("chatglm3", chatglm3_openai(mixed=True)),
    ],
    ids=[
        "glm4-seed003",
        "glm4-openai",
        "glm4-seed000",
        "glm4-seed000-openai",
        "chatglm3-seed000",
        "chatglm3-openai",
        "chatglm3-seed000-one-call-openai",
    ],
)
def test_seed_tool_chat_trains_as_the_saved_template_renders_it(saved, tmp_path, name, record):
    assert_trains_as_inference_asks(record, name, saved, tmp_path / "data")


TOOL_TEMPLATES = [
    n
    for n in field_template_names()
    if get_template(n).tools_system is not None
    and "{kwargs}" not in (get_template(n).tool_call_turn or "")
]


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
@pytest.mark.parametrize("seed", ["seed003", "seed000"])
def test_every_tool_template_reads_the_seed_forms(saved, tmp_path, name, seed):
    """The saved template of every project template that writes tools reads the seeds' own forms as
    training does."""
    assert_trains_as_inference_asks(
        GLM4_SEED if seed == "seed003" else CHATGLM3_SEED, name, saved, tmp_path / "data"
    )


def test_chatglm3_writes_the_tool_list_as_given_and_unwraps_openai_tools(saved):
    """ChatGLM3 dumps its tool list as the data gives it ({name, description, parameters});
    OpenAI-wrapped tools are written as their function dicts, in training and in the saved template
    alike."""
    _, _, loaded = saved("chatglm3")
    messages, tools = inference_form(CHATGLM3_SEED)
    want = (
        "You have access to the following tools:\n"
        + json.dumps(tools, indent=4, ensure_ascii=False)
        + "<|system|>"
    )
    wrapped = [{"type": "function", "function": t} for t in tools]
    for given in (tools, wrapped):
        text = loaded.apply_chat_template(messages, tools=given, tokenize=False)
        assert want in text
        conv = normalize({"tools": given, "conversations": messages})
        assert render("chatglm3", conv["messages"], tools=conv["tools"]) + "</s>" == text + "</s>"


def test_chatglm3_refuses_arguments_it_cannot_write_as_keywords(saved):
    """Jinja cannot parse JSON: ChatGLM3's saved template refuses a call whose arguments are JSON
    text (OpenAI's wire form, or GLM-4's call written as content) in one sentence instead of writing
    tool_call() empty."""
    _, _, loaded = saved("chatglm3")
    for record in (glm4_openai(), GLM4_SEED):
        messages, tools = inference_form(record)
        with pytest.raises(jinja2.TemplateError, match="give each call its arguments as a mapping"):
            loaded.apply_chat_template(messages, tools=tools, tokenize=False)
    messages, tools = inference_form(glm4_openai())
    messages[2]["tool_calls"][0]["function"]["arguments"] = " {} "
    assert "tool_call()" in loaded.apply_chat_template(messages, tools=tools, tokenize=False)


# content of the assistant message before the observation -> read as a call, or refused
GLM4_CALLS = {
    '{"name": "f", "arguments": {"a": [1, 2]}}': "call",
    '{"name":"f","arguments":{"a":"x, y"}}': "call",
    '  {\n  "name" : "f" ,\n  "parameters" : {"a": {"b": "}"}}\n}\n': "call",
    '{"name": "f", "arguments": {}}': "call",
    '{"name": "f", "arguments": {"a": "\\u4e2d"}}': "call",
    '{"arguments": {"a": 1}, "name": "f"}': "refused",
    '{"name": "f", "arguments": "{\\"a\\": 1}"}': "refused",
    '{"name": "f", "arguments": {"a": 1}, "id": "x"}': "refused",
    '{"name": "f", "arguments": {"a": 1}} trailing': "refused",
    '{"name": "f", "arguments": {"a": 1}': "refused",
    '{"name": "f\\u0041", "arguments": {"a": 1}}': "refused",
    "I will look that up.": "refused",
}


@pytest.mark.parametrize("content", sorted(GLM4_CALLS))
def test_glm4_call_text_reads_the_same_in_training_and_in_the_saved_template(saved, content):
    """A call written as JSON text is read by the same string steps in both (conversations.text_call
    and the Jinja): a layout the saved template cannot cut apart is refused in training, never
    trained differently."""
    _, _, loaded = saved("glm4")
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": content},
        {"role": "observation", "content": "r"},
        {"role": "assistant", "content": "done"},
    ]
    if GLM4_CALLS[content] == "refused":
        with pytest.raises(InvalidSample):
            normalize({"messages": messages})
        return
    conv = normalize({"messages": messages})
    call = conv["messages"][1]["tool_calls"][0]["function"]
    assert conv["messages"][1]["content"] == "" and call["name"] == "f"
    for generation, part in ((False, messages), (True, messages[:3])):
        ours = render("glm4", conv["messages"][: len(part)], add_generation_prompt=generation)
        assert (
            loaded.apply_chat_template(part, tokenize=False, add_generation_prompt=generation)
            == ours
        )


def test_the_saved_template_cuts_calls_by_the_readers_steps():
    """The Jinja's step list is conversations.CALL_STEPS, written out (Python's list repr is Jinja's
    literal)."""
    assert str(list(CALL_STEPS)) in chat_template_jinja("glm4")
