"""--template_name auto trains with the tokenizer's own chat template
(pipeline/data/rendering.py): ids equal what `apply_chat_template` gives, labels cover exactly
each answer and the token ending its turn, and templates that rewrite history (Qwen3's thinking)
train each answer in the text inference builds for it. The official templates are stored in
tests/official_templates/ (SOURCES.md names where each comes from)."""

import pytest
from transformers import AutoTokenizer

from pipeline.data.masking import IGNORE_INDEX, encode_samples
from pipeline.data.preference_dataset import split_texts
from pipeline.data.rendering import TokenizerTemplate
from pipeline.data.templates import apply_template_to_tokenizer, get_template, resolve_template
from pipeline.errors import UserError
from tests.official_families import FAMILIES, OFFICIAL, family_tokenizer

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
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is ka-gi?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And ka-mo?"},
    {"role": "assistant", "content": "orange"},
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "Sunny and 21 C."},
]


def trained_text(tokenizer, sample) -> list[str]:
    """The trained stretches of a sample, decoded."""
    runs, current = [], []
    for tok, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            current.append(tok)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def ids(tokenizer, messages, tools=None, **kw):
    out = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=False, **kw
    )
    return list(out)


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if FAMILIES[f].get("exact", True)))
def test_auto_trains_the_official_template_exactly(tiny_model, family):
    spec = FAMILIES[family]
    tokenizer = family_tokenizer(tiny_model, family)
    template = resolve_template("auto", tokenizer)
    assert isinstance(template, TokenizerTemplate)
    assert apply_template_to_tokenizer(tokenizer, template)[-1] == tokenizer.convert_tokens_to_ids(
        spec["end"]
    )
    chat = CHAT[:3] if spec.get("system", True) else CHAT[1:3]
    [sample] = encode_samples(template, tokenizer, {"messages": chat})
    assert sample.input_ids == ids(tokenizer, chat)
    prompt = ids(tokenizer, chat[:-1], add_generation_prompt=True)
    assert sample.input_ids[: len(prompt)] == prompt
    assert set(sample.labels[: len(prompt)]) == {IGNORE_INDEX}
    assert "".join(trained_text(tokenizer, sample)).endswith(spec["end"])


def test_an_official_template_whose_answers_do_not_follow_their_prompt_names_the_project_template(
    tiny_model,
):
    """Mistral v0.3 drops the system prompt once an answer follows it: no render holds an answer
    after its generation prompt, so auto stops and names the project template that trains after the
    official prompts."""
    tokenizer = family_tokenizer(tiny_model, "mistral-7b-instruct-v0.3")
    with pytest.raises(UserError, match="mistral_v0_3 and deepseek_r1 follow"):
        encode_samples(resolve_template("auto", tokenizer), tokenizer, {"messages": CHAT[:3]})


def test_llama3_multi_turn_and_tools_train_answers_and_calls_only(tiny_model):
    tokenizer = family_tokenizer(tiny_model, "llama-3.3-instruct")
    template = resolve_template("auto", tokenizer)
    [sample] = encode_samples(template, tokenizer, {"messages": CHAT})
    assert sample.input_ids == ids(tokenizer, CHAT)
    text = tokenizer.decode(sample.input_ids)
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024" in text
    assert trained_text(tokenizer, sample) == ["red<|eot_id|>", "orange<|eot_id|>"]
    [tool_sample] = encode_samples(template, tokenizer, {"messages": TOOL_CHAT, "tools": TOOLS})
    assert tool_sample.input_ids == ids(tokenizer, TOOL_CHAT, TOOLS)
    assert "Environment: ipython" in tokenizer.decode(tool_sample.input_ids)
    assert trained_text(tokenizer, tool_sample) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "Sunny and 21 C.<|eot_id|>",
    ]


def test_qwen3_thinking_history_trains_each_answer_in_its_inference_text(tiny_model):
    tokenizer = family_tokenizer(tiny_model, "qwen3")
    template = resolve_template("auto", tokenizer)
    chat = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"},
    ]
    samples = encode_samples(template, tokenizer, {"messages": chat})
    assert (
        len(samples) == 2
    )  # the full render drops the first answer's thinking: one sample per answer
    for sample, i in zip(samples, (1, 3)):
        assert sample.input_ids == ids(tokenizer, chat[: i + 1])
        prompt = ids(tokenizer, chat[:i], add_generation_prompt=True)
        assert (
            sample.input_ids[: len(prompt)] == prompt
        )  # exactly the prompt inference builds for this answer
        [answer] = trained_text(tokenizer, sample)
        assert answer.startswith("<think>") and answer.endswith("<|im_end|>")
    assert "add them" not in tokenizer.decode(
        samples[1].input_ids
    )  # earlier thinking left out, as at inference


def test_preference_pairs_use_the_own_template_prompt(tiny_model):
    tokenizer = family_tokenizer(tiny_model, "llama-3.3-instruct")
    template = resolve_template("auto", tokenizer)
    prompt_text, answer_text = split_texts(template, CHAT[:2], "red")
    assert prompt_text == tokenizer.apply_chat_template(
        CHAT[:2], tokenize=False, add_generation_prompt=True
    )
    assert answer_text == "red<|eot_id|>"


def test_auto_with_a_saved_project_template_trains_what_the_project_template_does(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    project = resolve_template("llama3", tokenizer)  # saves the project's Jinja on the tokenizer
    own = resolve_template("auto", tokenizer)
    conv = {"messages": CHAT}
    [a], [b] = encode_samples(project, tokenizer, conv), encode_samples(own, tokenizer, conv)
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_project_qwen_tool_prompt_equals_the_official_qwen_template(tiny_model):
    """Qwen2.5 and Qwen3 write tools, calls and results alike (Qwen3 adds thinking only to answers
    after the last user turn): a prompt ending in two tool results, one user turn holding both,
    single braces in the tool instructions."""
    from pipeline.data.templates import render

    official = family_tokenizer(tiny_model, "qwen3")
    chat = (
        [{"role": "system", "content": "Be brief."}]
        + TOOL_CHAT[:3]
        + [{"role": "tool", "content": "windy"}]
    )
    want = official.apply_chat_template(
        standard(chat), tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert "</tool_response>\n<tool_response>\nwindy" in want and '{"name": <function-name>' in want
    assert render("qwen", chat, tools=TOOLS, add_generation_prompt=True) == want


def standard(messages):
    from pipeline.data.rendering import standard_messages

    return standard_messages(messages)


@pytest.mark.parametrize("messages", [CHAT, CHAT[1:], CHAT[1:3]])
def test_project_llama3_1_equals_the_official_template(tiny_model, messages):
    from pipeline.data.templates import render

    official = family_tokenizer(tiny_model, "llama-3.3-instruct")
    for gen in (False, True):
        chat = messages[:-1] if gen else messages
        want = official.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert render("llama3_1", chat, add_generation_prompt=gen) == want


def test_sft_stage_with_auto_keeps_the_official_template_and_its_stop_token(tiny_model, tmp_path):
    import json
    import shutil

    from stages import sft
    from tests.helpers import DATA

    model = tmp_path / "llama33"
    shutil.copytree(tiny_model, model)
    tokenizer = family_tokenizer(tiny_model, "llama-3.3-instruct")
    tokenizer.save_pretrained(model)
    out = tmp_path / "out"
    sft.main(
        [
            "--model_name_or_path",
            str(model),
            "--train_file_dir",
            str(DATA / "sft"),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--report_to",
            "none",
            "--use_peft",
            "False",
            "--do_eval",
            "False",
            "--save_strategy",
            "no",
            "--validation_split_percentage",
            "0",
        ]
    )
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in (
        stops if isinstance(stops, list) else [stops]
    )


@pytest.mark.parametrize("messages", [CHAT[1:], CHAT[1:3]])
def test_project_gemma_equals_the_official_gemma_2_template(tiny_model, messages):
    from pipeline.data.templates import render

    official = family_tokenizer(tiny_model, "gemma-2-it")
    for gen in (False, True):
        chat = messages[:-1] if gen else messages
        assert render("gemma", chat, add_generation_prompt=gen) == official.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=gen
        )


def test_split_conversations_are_counted_in_the_data_summary(tiny_model, tmp_path):
    import json
    from types import SimpleNamespace

    from pipeline.data.chat_dataset import build_chat_dataset

    tokenizer = family_tokenizer(tiny_model, "qwen3")
    chat = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    (tmp_path / "chats.jsonl").write_text(
        json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": CHAT}) + "\n"
    )
    sft_args = SimpleNamespace(
        data_format="auto",
        skip_invalid_samples=False,
        multi_turn_mode="all",
        train_on_inputs=False,
        model_max_length=512,
    )
    dataset, report = build_chat_dataset(
        str(tmp_path),
        "--train_file_dir",
        resolve_template("auto", tokenizer),
        tokenizer,
        sft_args,
        SimpleNamespace(preprocessing_num_workers=None),
    )
    # Qwen3 writes an (empty) thinking block only into answers after the last user turn, so both
    # two-answer chats render their first answer differently once a second follows: each becomes two
    # samples
    assert len(dataset) == 4 and report.read == 2 and report.samples == 4 and report.kept == 4
    assert (
        "2 conversations read, 4 samples made from the 2 conversations kept, 4 samples kept"
        in report.summary("x")
    )


# -------------------------------------------------------- project templates equal the official ones


def two_results():
    """A tool conversation with two results in a row (call ids for the families that number their
    calls)."""
    call = {
        "type": "function",
        "id": "abc123XYZ",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call, dict(call, id="def456UVW")]},
        {"role": "tool", "content": "sunny", "tool_call_id": "abc123XYZ"},
        {"role": "tool", "content": "21 C", "tool_call_id": "def456UVW"},
        {"role": "assistant", "content": "Sunny and 21 C."},
    ]


PROJECT_CASES = {
    "multi_turn_system": (CHAT, None),
    "multi_turn": (CHAT[1:], None),
    "one_turn": (CHAT[1:3], None),
    "tools": (TOOL_CHAT, TOOLS),
    "tools_two_results": (two_results(), TOOLS),
    "thinking": (
        [
            CHAT[1],
            {"role": "assistant", "content": "<think>\nka-gi is red\n</think>\n\nred"},
            CHAT[3],
            {"role": "assistant", "content": "<think>\nka-mo\n</think>\n\norange"},
        ],
        None,
    ),
}
# project template -> the official template it equals; deepseek_r1 and mistral_v0_3 equal theirs in
# every prompt (the official ones render a finished conversation in a text no prompt leads to; see
# their template files)
PROJECT_EQUALS = [
    ("qwen3", "qwen3"),
    ("llama3_1", "llama-3.3-instruct"),
    ("gemma", "gemma-2-it"),
    ("gemma", "gemma-3-it"),
    ("phi4", "phi-4"),
    ("deepseek3", "deepseek-v3"),
    ("deepseek_r1", "deepseek-r1"),
    ("mistral_v0_3", "mistral-7b-instruct-v0.3"),
]
PROMPTS_ONLY = {"deepseek_r1", "mistral_v0_3"}


def official_render(family, messages, tools, gen):
    """The official template's text, or None where the official template refuses the
    conversation."""
    from transformers.utils.chat_template_utils import render_jinja_template

    spec = FAMILIES[family]
    try:
        texts, _ = render_jinja_template(
            [standard(messages)],
            tools=tools,
            add_generation_prompt=gen,
            chat_template=(OFFICIAL / f"{family}.jinja").read_text(),
            bos_token=spec["bos"] or "",
            eos_token=spec["eos"],
        )
    except (
        Exception
    ):  # raise_exception(...) in the template: the format does not define this conversation
        return None
    return texts[0]


@pytest.mark.parametrize("name, family", PROJECT_EQUALS)
@pytest.mark.parametrize("case", sorted(PROJECT_CASES))
def test_project_template_renders_the_official_text(name, family, case):
    """For every conversation the official template accepts: each answer's prompt (with the
    generation prompt) and the whole conversation render byte for byte alike."""
    from pipeline.data.templates import render

    messages, tools = PROJECT_CASES[case]
    if tools and not FAMILIES[family].get("tools", True):
        with pytest.raises(UserError, match="does not write tool definitions"):
            render(name, messages, tools=tools)
        return
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if name not in PROMPTS_ONLY:
        ends.append(len(messages))
    checked = 0
    for end in ends:
        gen = end < len(messages)
        want = official_render(family, messages[:end], tools, gen)
        if want is None:
            continue
        assert render(name, messages[:end], add_generation_prompt=gen, tools=tools) == want, (
            end,
            gen,
        )
        checked += 1
    if not checked:
        pytest.skip(f"the official {family} template refuses the {case} conversation")


@pytest.mark.parametrize(
    "name, family", [("mistral_v0_3", "mistral-7b-instruct-v0.3"), ("deepseek_r1", "deepseek-r1")]
)
def test_prompt_exact_project_templates_train_each_answer_after_the_official_prompt(
    tiny_model, name, family
):
    """Each answer is trained after exactly the official generation prompt; R1's answer keeps its
    reasoning (the model must learn to write it), Mistral's is ' answer</s>'."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = resolve_template(name, tokenizer)
    official = family_tokenizer(tiny_model, family)
    chat = PROJECT_CASES["thinking"][0]
    chat = [CHAT[0]] + chat if name == "mistral_v0_3" else chat
    samples = encode_samples(template, tokenizer, {"messages": chat})
    assert len(samples) == 2
    for sample, i in zip(samples, [i for i, m in enumerate(chat) if m["role"] == "assistant"]):
        prompt = official.apply_chat_template(
            standard(chat[:i]), tokenize=False, add_generation_prompt=True
        )
        text = tokenizer.decode(sample.input_ids)
        [answer] = trained_text(tokenizer, sample)
        assert text == prompt + answer
        if name == "deepseek_r1":
            assert answer == chat[i]["content"].removeprefix("<think>\n") + "<｜end▁of▁sentence｜>"
        else:
            assert answer == " " + chat[i]["content"] + "</s>"


def test_a_template_that_ignores_tools_is_refused(tiny_model):
    """Gemma's templates drop tool definitions without a word; training calls to unseen tools is
    refused."""
    tokenizer = family_tokenizer(tiny_model, "gemma-2-it")
    template = resolve_template("auto", tokenizer)
    chat = [TOOL_CHAT[0], {"role": "assistant", "content": '{"name": "get_weather"}'}]
    with pytest.raises(UserError, match="ignores tool definitions"):
        encode_samples(template, tokenizer, {"messages": chat, "tools": TOOLS})
    assert len(encode_samples(template, tokenizer, {"messages": chat})) == 1


@pytest.mark.parametrize("name", ["qwen3", "mistral_v0_3", "deepseek_r1"])
def test_sft_stage_trains_with_a_jinja_project_template_and_saves_it(tiny_model, tmp_path, name):
    import json

    from stages import sft

    chats = [
        {"messages": [{"role": "system", "content": "Be brief."}] + CHAT[1:]},
        {"messages": PROJECT_CASES["thinking"][0]},
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = tmp_path / "out"
    sft.main(
        [
            "--model_name_or_path",
            str(tiny_model),
            "--train_file_dir",
            str(tmp_path / "data"),
            "--output_dir",
            str(out),
            "--template_name",
            name,
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--report_to",
            "none",
            "--use_peft",
            "False",
            "--do_eval",
            "False",
            "--save_strategy",
            "no",
            "--validation_split_percentage",
            "0",
        ]
    )
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == get_template(name).chat_template
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert saved.convert_tokens_to_ids(get_template(name).stop[0]) in (
        stops if isinstance(stops, list) else [stops]
    )


def test_a_prompt_message_asked_to_train_trains_its_turn_or_is_refused(tiny_model):
    """`"loss": true` on a user message trains that turn's text (what the template adds for it),
    under a template of fields and under the tokenizer's own template alike; a template that writes
    the message differently once later turns follow (Yuan2 joins history) has no such text, and the
    record is refused in one sentence instead of trained without its asked-for turn."""
    from pipeline.data.masking import IGNORE_INDEX, encode, encode_samples
    from pipeline.errors import UserError

    conv = [dict(m) for m in CHAT]
    first_user = next(i for i, m in enumerate(conv) if m["role"] == "user")
    conv[first_user]["loss"] = True
    official = family_tokenizer(tiny_model, "llama-3.3-instruct")
    for name, tokenizer in (
        ("qwen", AutoTokenizer.from_pretrained(tiny_model)),
        ("auto", official),
    ):
        template = resolve_template(name, tokenizer)
        enc = encode(template, tokenizer, conv)
        ids = [i for i, k in zip(enc.input_ids, enc.labels) if k != IGNORE_INDEX]
        trained, plain = tokenizer.decode(ids), encode(template, tokenizer, CHAT)
        assert conv[first_user]["content"] in trained, name
        assert sum(k != IGNORE_INDEX for k in enc.labels) > sum(
            k != IGNORE_INDEX for k in plain.labels
        )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    yuan2 = resolve_template("yuan2", tokenizer)
    with pytest.raises(UserError, match=rf"message {first_user + 1} \(user\) asks to be trained"):
        encode_samples(yuan2, tokenizer, {"messages": conv})
    # a later question, which Yuan2 joins into the history of the next: refused as well, never
    # trained together with the history written before it
    later = [dict(m) for m in CHAT]
    second_user = [i for i, m in enumerate(later) if m["role"] == "user"][1]
    later[second_user]["loss"] = True
    with pytest.raises(UserError, match=rf"message {second_user + 1} \(user\) asks to be trained"):
        encode_samples(yuan2, tokenizer, {"messages": later})
