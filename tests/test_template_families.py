"""Every official template the tests hold (tests/official_templates/, sources in SOURCES.md) on
every kind of conversation a user brings: each either trains exactly what inference sees, or is
refused in one sentence naming the fix. Nothing differs silently.

Exactly means, for every answer: the sample holds the ids `apply_chat_template(messages[:i], tools,
add_generation_prompt=True, tokenize=True)` gives, nothing of them trained; then the answer,
trained, its text and tool calls present, ending with a token the saved generation config stops on.
The messages reach the template as the reader gives them (normalize), with call arguments in the
form the template reads."""

import json

import pytest
from transformers import AutoTokenizer

from pipeline.data.conversations import normalize
from pipeline.data.masking import IGNORE_INDEX, Encoded, encode_samples
from pipeline.data.rendering import _template_choice, standard_messages
from pipeline.data.templates import apply_template_to_tokenizer, resolve_template
from pipeline.errors import UserError
from tests.official_families import all_families, family_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def _call(args, call_id, wire=False):
    return {
        "role": "assistant",
        "content": None if wire else "",
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": args},
            }
        ],
    }


def conversation(kind: str, call_id: str = "abc123XYZ") -> dict:
    """The record a user writes, in the messages format (the reader normalizes it)."""
    tool = {
        "role": "tool",
        "tool_call_id": call_id,
        "name": "get_weather",
        "content": "sunny, 21 C",
    }
    ask = {"role": "user", "content": "Weather in Paris?"}
    done = {"role": "assistant", "content": "Sunny and 21 C."}
    records = {
        "plain": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello, how can I help?"},
        ],
        "multi_system": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What color is ka-gi?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And ka-mo?"},
            {"role": "assistant", "content": "orange"},
        ],
        "unicode": [
            {"role": "user", "content": "你好，天气怎么样？ 🌤️ café"},
            {"role": "assistant", "content": "今天晴朗 ☀️, très bien."},
        ],
        "tool_object": [ask, _call({"city": "Paris"}, call_id), tool, done],
        "tool_string": [ask, _call('{"city": "Paris"}', call_id), tool, done],
        "tool_wire": [
            ask,
            _call('{"city": "Paris"}', call_id, wire=True),
            {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
            done,
        ],
        "reasoning": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "reasoning_content": "Add two and two.", "content": "4"},
        ],
        "reasoning_inline": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nAdd two and two.\n</think>\n\n4"},
        ],
    }
    return {"messages": records[kind], **({"tools": TOOLS} if kind.startswith("tool") else {})}


KINDS = [
    "plain",
    "multi_system",
    "unicode",
    "tool_object",
    "tool_string",
    "tool_wire",
    "reasoning",
    "reasoning_inline",
]
TOOL_KINDS = ("tool_object", "tool_string", "tool_wire")
# Kimi-K2 writes a call by its id, in this form
CALL_IDS = dict.fromkeys(["kimi-k2", "kimi-k2-thinking"], "functions.get_weather:0")
# what each family refuses, by the words of its one-sentence refusal; everything else trains exactly
TOOLS_IGNORED = "ignores tool definitions"
NO_SYSTEM = "rejects a conversation: System role not supported"
ALTERNATE = "rejects a conversation: Conversation roles must alternate"
REASONING_DROPPED = "drops the reasoning of answer"
CALLS_DROPPED = "does not write the tool call"
ELSEWHERE = "after a prompt other than the one it builds"
WRITES_REASONING = {
    "deepseek-r1",
    "glm-4.5",
    "glm-4.7-flash",
    "gpt-oss",
    "minimax-m2",
    "nemotron-3-nano",
    "qwen3",
    "qwen3-thinking-2507",
    "qwen3.5",
    "qwq",
    "seed-oss",
}  # a reasoning_content field reaches the trained text
NO_TOOLS = {
    "deepseek-r1",
    "deepseek-v3",
    "deepseek-v3.1",
    "ernie-4.5",
    "exaone-3.5",
    "glm-4-9b-chat",
    "internlm3",
    "olmo-2",
    "phi-3.5-mini",
    "phi-4",
    "phi-4-mini",
    "phi-4-reasoning",
    "yi-1.5-chat",
}
# tools= is never written (Phi-4-mini and GLM-4 read them from the system message only)
REFUSED = {
    **{
        family: dict.fromkeys(TOOL_KINDS, CALLS_DROPPED)  # their templates never write tool_calls
        for family in ("granite-3.1", "granite-3.3", "lfm2", "smollm3")
    },
    "aya-expanse": dict.fromkeys(TOOL_KINDS, ALTERNATE),
    "mistral-nemo-2407": {"multi_system": ELSEWHERE},
    "falcon3": dict.fromkeys(TOOL_KINDS, ELSEWHERE),  # writes a call inside the user turn
    "gemma-2-it": {"multi_system": NO_SYSTEM, **dict.fromkeys(TOOL_KINDS, ALTERNATE)},
    "gemma-3-it": dict.fromkeys(TOOL_KINDS, ALTERNATE),
    "mistral-7b-instruct-v0.3": {
        "multi_system": ELSEWHERE
    },  # the system prompt moves once an answer follows
    "deepseek-v3.1": {
        "reasoning_inline": REASONING_DROPPED
    },  # unless thinking is on (see the test below)
}
for _family in NO_TOOLS:
    REFUSED.setdefault(_family, {}).update(dict.fromkeys(TOOL_KINDS, TOOLS_IGNORED))


def refused(family: str, kind: str) -> str | None:
    if kind == "reasoning" and family not in WRITES_REASONING:
        return REASONING_DROPPED
    return REFUSED.get(family, {}).get(kind)


def reference_prompt(tokenizer, template, messages, tools) -> list[int]:
    """What inference tokenizes for the answer after messages: the template's own render, tokenized
    by transformers (the messages in the form the template reads)."""
    form = standard_messages(messages, template)
    lifted = template.message_tools and any(m.get("tools") for m in form)
    return list(
        tokenizer.apply_chat_template(
            form,
            tools=None if lifted else tools,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            chat_template=_template_choice(tokenizer, tools),
            **template.kwargs,
        )
    )


def trained_run(sample: Encoded, start: int) -> list[int]:
    end = start
    while end < len(sample.labels) and sample.labels[end] != IGNORE_INDEX:
        end += 1
    return sample.input_ids[start:end]


def check_exact(tokenizer, template, conv: dict, stop_ids: list[int]) -> None:
    samples = encode_samples(template, tokenizer, conv)
    messages, tools = conv["messages"], conv.get("tools")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = reference_prompt(tokenizer, template, messages[:i], tools)
        found = [
            s
            for s in samples
            if s.input_ids[: len(prompt)] == prompt
            and len(s.labels) > len(prompt)
            and s.labels[len(prompt)] != IGNORE_INDEX
        ]
        assert found, f"no sample trains answer {i} right after the ids of its generation prompt"
        run = trained_run(found[0], len(prompt))
        text = tokenizer.decode(run)
        assert run[-1] in stop_ids, (
            f"answer {i} ends with {tokenizer.decode(run[-1:])!r}, not a stop token"
        )
        assert (m.get("content") or "").split("</think>")[-1].strip()[-6:] in text, text
        for call in m.get("tool_calls") or []:
            assert call["function"]["name"] in text or call.get("id", "") in text, text
        if m.get("reasoning_content") or "</think>" in (m.get("content") or ""):
            assert "Add two and two." in text, text
        assert set(found[0].labels[: len(prompt)]) <= {IGNORE_INDEX} or i != min(
            k for k, x in enumerate(messages) if x["role"] == "assistant"
        ), "the first prompt is never trained"


@pytest.mark.parametrize("family", all_families())
def test_every_official_template_trains_exactly_or_refuses_in_one_sentence(tiny_model, family):
    tokenizer = family_tokenizer(tiny_model, family)
    template = resolve_template("auto", tokenizer)
    stop_ids = apply_template_to_tokenizer(tokenizer, template)
    for kind in KINDS:
        conv = normalize(conversation(kind, CALL_IDS.get(family, "abc123XYZ")))
        expected = refused(family, kind)
        if expected:
            with pytest.raises(UserError, match=expected):
                encode_samples(template, tokenizer, conv)
        else:
            check_exact(tokenizer, template, conv, stop_ids)


def outcome_table(tiny_model) -> dict:
    """The outcomes as they are now (scripts use it to review a change): family -> kind -> refusal
    or 'exact'."""
    table = {}
    for family in all_families():
        tokenizer = family_tokenizer(tiny_model, family)
        template = resolve_template("auto", tokenizer)
        stop_ids = apply_template_to_tokenizer(tokenizer, template)
        for kind in KINDS:
            conv = normalize(
                json.loads(json.dumps(conversation(kind, CALL_IDS.get(family, "abc123XYZ"))))
            )
            try:
                check_exact(tokenizer, template, conv, stop_ids)
                table.setdefault(family, {})[kind] = "exact"
            except (UserError, AssertionError) as e:
                table.setdefault(family, {})[kind] = f"{type(e).__name__}: {str(e)[:160]}"
    return table


def test_saved_template_reproduces_the_training_prompt(tiny_model, tmp_path):
    """With --chat_template_kwargs, the saved tokenizer renders the prompt training used, with no
    argument."""
    tokenizer = family_tokenizer(tiny_model, "qwen3.5")
    template = resolve_template("auto", tokenizer, '{"enable_thinking": false}')
    apply_template_to_tokenizer(tokenizer, template)
    conv = normalize(conversation("plain"))
    [sample] = encode_samples(template, tokenizer, conv)
    tokenizer.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    prompt = list(
        saved.apply_chat_template(
            conv["messages"][:1], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    assert sample.input_ids[: len(prompt)] == prompt and "</think>" in saved.decode(prompt)
    assert sample.labels[len(prompt)] != IGNORE_INDEX and set(sample.labels[: len(prompt)]) == {
        IGNORE_INDEX
    }


@pytest.mark.parametrize(
    "family, written", [("phi-4-mini", json.dumps(TOOLS)), ("glm-4-9b-chat", TOOLS)]
)
def test_tools_on_the_system_message_reach_templates_that_read_them_there(
    tiny_model, family, written
):
    """Phi-4-mini's template writes tools only from the system message's "tools" text (its card's
    format), GLM-4's from a list there (the GLM-4 demo's format); Phi-4-mini writes calls only as
    the assistant's own text, so structured tool_calls, which it would lose, are refused."""
    tokenizer = family_tokenizer(tiny_model, family)
    template = resolve_template("auto", tokenizer)
    assert template.message_tools
    call = '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>'
    record = {
        "messages": [
            {"role": "system", "content": "You call tools.", "tools": written},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": call},
        ]
    }
    conv = normalize(record)
    check_exact(tokenizer, template, conv, apply_template_to_tokenizer(tokenizer, template))
    [sample] = encode_samples(template, tokenizer, conv)
    first_trained = next(k for k, x in enumerate(sample.labels) if x != IGNORE_INDEX)
    assert "get_weather" in tokenizer.decode(
        sample.input_ids[:first_trained]
    )  # the tools, in the prompt
    if family == "phi-4-mini":
        assert "<|tool|>" + json.dumps(TOOLS) + "<|/tool|>" in tokenizer.decode(sample.input_ids)
        record = conversation("tool_object")
        record["messages"].insert(
            0, {"role": "system", "content": "You call tools.", "tools": written}
        )
        with pytest.raises(UserError, match=CALLS_DROPPED):
            encode_samples(template, tokenizer, normalize(record))


def test_deepseek_v31_gets_call_arguments_as_text_and_trains_reasoning_with_thinking_on(tiny_model):
    """Its template concatenates arguments as text (a mapping fails), so calls written either way
    train; it writes no tools= (described in the system message instead); with thinking on, the
    generation prompt pre-fills <think> and the reasoning written in content is trained after it."""
    tokenizer = family_tokenizer(tiny_model, "deepseek-v3.1")
    template = resolve_template("auto", tokenizer)
    assert template.args_as_text
    stop_ids = apply_template_to_tokenizer(tokenizer, template)
    for kind in TOOL_KINDS:
        record = conversation(kind)
        del record["tools"]
        record["messages"].insert(
            0, {"role": "system", "content": "## Tools\nget_weather(city): the weather."}
        )
        check_exact(tokenizer, template, normalize(record), stop_ids)
        [sample] = encode_samples(template, tokenizer, normalize(record))
        assert '<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>' in tokenizer.decode(
            sample.input_ids
        )
    thinking = resolve_template(
        "auto", family_tokenizer(tiny_model, "deepseek-v3.1"), '{"thinking": true}'
    )
    conv = normalize(conversation("reasoning_inline"))
    check_exact(
        thinking.tokenizer,
        thinking,
        conv,
        apply_template_to_tokenizer(thinking.tokenizer, thinking),
    )


def test_a_token_straddling_prompt_and_answer_is_trained_as_inference_sees_it(tiny_model):
    """ERNIE-4.5's prompt ends 'Assistant: ' and the answer follows: tokenized together, the space
    joins the answer's first word. The sample holds the prompt's own ids, then the answer's."""
    tokenizer = family_tokenizer(tiny_model, "ernie-4.5")
    template = resolve_template("auto", tokenizer)
    conv = normalize(conversation("multi_system"))
    samples = encode_samples(template, tokenizer, conv)
    whole = list(tokenizer.apply_chat_template(conv["messages"], tokenize=True, return_dict=False))
    assert all(
        sample.input_ids != whole[: len(sample.input_ids)] for sample in samples[1:]
    )  # the merged ids
    check_exact(tokenizer, template, conv, apply_template_to_tokenizer(tokenizer, template))


def test_every_end_of_turn_token_is_a_stop(tiny_model):
    """gpt-oss ends an answer with <|return|> and a tool call with <|call|>; GLM-4.7 has no end
    token: the next role tag (<|user|> or <|observation|>) ends a turn."""
    gpt = family_tokenizer(tiny_model, "gpt-oss")
    assert {"<|return|>", "<|call|>"} <= set(resolve_template("auto", gpt).stop)
    glm = family_tokenizer(tiny_model, "glm-4.7-flash")
    assert {"<|endoftext|>", "<|user|>", "<|observation|>"} <= set(
        resolve_template("auto", glm).stop
    )


def test_a_tool_message_keeps_its_name_for_the_template(tiny_model):
    """Kimi-K2 writes a tool result under the tool's name: the reader keeps the field the template
    reads."""
    tokenizer = family_tokenizer(tiny_model, "kimi-k2")
    template = resolve_template("auto", tokenizer)
    [sample] = encode_samples(
        template, tokenizer, normalize(conversation("tool_object", CALL_IDS["kimi-k2"]))
    )
    assert "<|im_system|>get_weather<|im_middle|>" in tokenizer.decode(sample.input_ids)


def test_granite_33_tool_calls_are_refused_not_trained_as_empty_turns(tiny_model):
    tokenizer = family_tokenizer(tiny_model, "granite-3.3")
    template = resolve_template("auto", tokenizer)
    with pytest.raises(
        UserError,
        match=r"does not write the tool call\(s\) get_weather of answer 1 \(it renders "
        r"'<\|end_of_text\|>'\), so the model would learn to stop instead of calling",
    ):
        encode_samples(template, tokenizer, normalize(conversation("tool_object")))


def test_a_record_the_template_cannot_train_stops_the_run_or_is_dropped_and_counted(
    tiny_model, tmp_path
):
    """Every conversation is checked while it is encoded: without --skip_invalid_samples the first
    one that cannot train exactly stops the run naming it; with it, it is dropped and the summary
    counts it."""
    from pipeline.args import DataArguments, SFTArguments
    from pipeline.data.chat_dataset import build_chat_dataset

    data = tmp_path / "data"
    data.mkdir()
    records = [conversation("plain"), conversation("tool_object"), conversation("multi_system")]
    (data / "chats.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8"
    )
    tokenizer = family_tokenizer(
        tiny_model, "granite-3.3"
    )  # it drops tool calls: record 2 cannot train
    template = resolve_template("auto", tokenizer)
    apply_template_to_tokenizer(tokenizer, template)
    data_args = DataArguments(train_file_dir=str(data))
    with pytest.raises(UserError, match=r"^conversation 2: .*does not write the tool call"):
        build_chat_dataset(
            str(data), "--train_file_dir", template, tokenizer, SFTArguments(), data_args
        )
    kept, report = build_chat_dataset(
        str(data),
        "--train_file_dir",
        template,
        tokenizer,
        SFTArguments(skip_invalid_samples=True),
        data_args,
    )
    assert (
        len(kept) == 2
        and "1 samples dropped (the template cannot train it as inference renders it"
        in report.summary("train")
    )


@pytest.mark.parametrize("family", all_families())
def test_preview_ends_in_a_table_or_one_sentence_never_a_traceback(
    tiny_model, tmp_path, family, capsys
):
    from pipeline.tools.preview import main

    tokenizer = family_tokenizer(tiny_model, family)
    tokenizer.save_pretrained(tmp_path / "tok")
    for kind in KINDS:
        record = tmp_path / f"{kind}.jsonl"
        record.write_text(
            json.dumps(conversation(kind, CALL_IDS.get(family, "abc123XYZ"))) + "\n",
            encoding="utf-8",
        )
        try:
            main(["--file", str(record), "--tokenizer_name_or_path", str(tmp_path / "tok")])
            assert "label" in capsys.readouterr().out
        except UserError as e:
            assert refused(family, kind), f"{kind}: {e}"
