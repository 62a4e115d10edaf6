"""Samples longer than --model_max_length: SFT cuts after the last whole turn that fits or drops the
sample, never trains an answer cut short or without the token that ends it, and counts both in the
data summary; preference pairs (KTO answers) and RL prompts that do not fit are dropped whole and
counted; KTO's summary counts records read and the answers made from them."""

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from pipeline.data.chat_dataset import build_chat_dataset
from pipeline.data.masking import (
    IGNORE_INDEX,
    Dropped,
    Encoded,
    cut_to_whole_turns,
    encode_samples,
    too_long,
)
from pipeline.data.preference_dataset import build_preference_dataset
from pipeline.data.prompts import load_prompts
from pipeline.data.templates import (
    apply_template_to_tokenizer,
    get_template,
    resolve_template,
    template_names,
)
from tests.official_families import FAMILIES, family_tokenizer

LONG = " ".join(["red and blue"] * 12)
CHAT = [
    {"role": "user", "content": "What color is ka-bo?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And lo-ri?"},
    {"role": "assistant", "content": LONG},
    {"role": "user", "content": "And mi-ta?"},
    {"role": "assistant", "content": "green"},
]
# every project template, and --template_name auto with each official template it trains as it
# renders
TEMPLATES = template_names() + [
    f"auto-{f}" for f in sorted(FAMILIES) if FAMILIES[f].get("exact", True)
]


def tokenizer_and_template(tiny_model, name: str):
    if name.startswith("auto-"):
        tokenizer = family_tokenizer(tiny_model, name.removeprefix("auto-"))
        template = resolve_template("auto", tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        template = resolve_template(name, tokenizer)
    stops = set(apply_template_to_tokenizer(tokenizer, template))
    if (
        not template.turn_end
    ):  # GLM, Baichuan2: an answer before another turn is ended by that turn's first token
        spec = get_template(name)
        heads = (spec.user, spec.observation_open or spec.observation, spec.generation_prompt)
        stops |= {tokenizer(h, add_special_tokens=False).input_ids[0] for h in heads if h}
    return tokenizer, template, stops


def trained_spans(sample) -> list[list[int]]:
    spans, current = [], []
    for tok, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            current.append(tok)
        elif current:
            spans, current = spans + [current], []
    return spans + [current] if current else spans


def ends_a_turn(tokenizer, ids: list[int], stops: set[int]) -> bool:
    """The last token, but for trailing whitespace (the newline after <|im_end|>), ends a turn."""
    while ids and not tokenizer.decode(ids[-1:]).strip():
        ids = ids[:-1]
    return bool(ids) and ids[-1] in stops


def check_cut(tokenizer, stops, whole, sample, max_length, train_on_inputs):
    """A sample made under max_length is its whole form, its whole form cut after a whole turn, or
    dropped."""
    if isinstance(sample, Dropped):
        assert sample == Dropped(too_long(max_length)) and len(whole.input_ids) > max_length
        return 0
    n = len(sample.input_ids)
    assert (
        n <= max_length
        and sample.input_ids == whole.input_ids[:n]
        and sample.labels == whole.labels[:n]
    )
    assert sample.truncated == (n < len(whole.input_ids))
    spans = trained_spans(sample)
    assert spans, "a kept sample trains something"
    if train_on_inputs:
        assert ends_a_turn(tokenizer, sample.input_ids, stops), tokenizer.decode(
            sample.input_ids[-4:]
        )
    else:  # every trained answer ends with the token that ends its turn
        assert all(span[-1] in stops for span in spans), [tokenizer.decode(s[-3:]) for s in spans]
    return int(sample.truncated)


@pytest.mark.parametrize("train_on_inputs", [False, True], ids=["answers", "train_on_inputs"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_a_cut_sample_ends_after_a_whole_turn(tiny_model, name, train_on_inputs):
    tokenizer, template, stops = tokenizer_and_template(tiny_model, name)
    # a template that trains each answer in its own sample (Yuan2's history, R1's reasoning) has no
    # turn to cut after
    one_per_sample = len(encode_samples(template, tokenizer, {"messages": CHAT})) > 1
    cut = 0
    for mode in ("all", "last", "split"):
        wholes = encode_samples(template, tokenizer, {"messages": CHAT}, mode, train_on_inputs)
        assert all(isinstance(w, Encoded) and not w.truncated for w in wholes)
        if not train_on_inputs:
            assert all(span[-1] in stops for w in wholes for span in trained_spans(w)), name
        longest = max(len(w.input_ids) for w in wholes)
        for max_length in range(8, longest + 1, 2):
            samples = encode_samples(
                template, tokenizer, {"messages": CHAT}, mode, train_on_inputs, max_length
            )
            assert len(samples) == len(wholes)
            cut += sum(
                check_cut(tokenizer, stops, w, s, max_length, train_on_inputs)
                for w, s in zip(wholes, samples)
            )
    assert cut > 0 or one_per_sample, "some sample was cut after a whole turn rather than dropped"


def test_modes_cut_or_drop_the_long_answer(tiny_model):
    tokenizer, template, stops = tokenizer_and_template(tiny_model, "qwen")
    conv = {"messages": CHAT[:4]}  # a short first answer, a long second one
    [first, _] = encode_samples(template, tokenizer, conv, "split")
    max_length = len(first.input_ids) + 5  # the first turn fits, the second answer does not
    [everything] = encode_samples(template, tokenizer, conv, "all", max_length=max_length)
    assert everything.truncated and everything.input_ids == first.input_ids
    assert tokenizer.decode([t for t in everything.labels if t != IGNORE_INDEX]) == "red<|im_end|>"
    # the last answer alone is trained: cutting before it leaves nothing, so the sample is dropped
    assert encode_samples(template, tokenizer, conv, "last", max_length=max_length) == [
        Dropped(too_long(max_length))
    ]
    kept, dropped = encode_samples(template, tokenizer, conv, "split", max_length=max_length)
    assert (
        kept.input_ids == first.input_ids
        and not kept.truncated
        and dropped == Dropped(too_long(max_length))
    )
    # not even the first answer fits: dropped, never cut inside it
    conv = {"messages": [CHAT[0], {"role": "assistant", "content": LONG}]}
    assert encode_samples(template, tokenizer, conv, "all", max_length=20) == [
        Dropped(too_long(20))
    ]
    assert encode_samples(
        template, tokenizer, conv, "all", max_length=20, train_on_inputs=True
    ) == [Dropped(too_long(20))]


def test_no_cut_between_the_tool_calls_of_one_message(tiny_model):
    """ChatGLM3 writes each call of a message as its own assistant turn: a cut there would train one
    call of two."""
    tokenizer, template, stops = tokenizer_and_template(tiny_model, "chatglm3")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    calls = [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}}
        for c in ("Paris", "Rome")
    ]
    chat = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rainy"},
        {"role": "assistant", "content": "Sunny; rainy."},
    ]
    conv = {"messages": chat, "tools": tools}
    [whole] = encode_samples(template, tokenizer, conv)
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    second_call = [i for i, t in enumerate(whole.input_ids) if t == assistant][1]
    assert encode_samples(template, tokenizer, conv, max_length=second_call + 1) == [
        Dropped(too_long(second_call + 1))
    ]
    observation = whole.input_ids.index(tokenizer.convert_tokens_to_ids("<|observation|>"))
    [both] = encode_samples(template, tokenizer, conv, max_length=observation + 1)
    assert (
        both.truncated and both.input_ids == whole.input_ids[: observation + 1]
    )  # both calls, ended by the result tag
    assert [span[-1] for span in trained_spans(both)] == [whole.input_ids[observation]]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return str(path.parent)


@pytest.mark.parametrize("name", ["qwen", "chatglm3", "auto-llama-3.3-instruct"])
def test_sft_summary_counts_cut_and_dropped_samples(tiny_model, tmp_path, name):
    tokenizer, template, stops = tokenizer_and_template(tiny_model, name)
    short, two_turns = CHAT[:2], CHAT[:4]
    first_long = [CHAT[0], {"role": "assistant", "content": LONG}]
    [whole_two] = encode_samples(template, tokenizer, {"messages": two_turns})
    [first_turn, _] = encode_samples(template, tokenizer, {"messages": two_turns}, "split")
    max_length = len(first_turn.input_ids) + 4
    assert len(whole_two.input_ids) > max_length
    folder = write_jsonl(
        tmp_path / "d" / "c.jsonl", [{"messages": m} for m in (short, two_turns, first_long)]
    )
    args = SimpleNamespace(
        data_format="auto",
        skip_invalid_samples=False,
        multi_turn_mode="all",
        train_on_inputs=False,
        model_max_length=max_length,
    )
    dataset, report = build_chat_dataset(
        folder,
        "--train_file_dir",
        template,
        tokenizer,
        args,
        SimpleNamespace(preprocessing_num_workers=None),
    )
    assert len(dataset) == report.kept == 2 and report.read == 3
    assert report.sample_dropped == {too_long(max_length): 1}
    assert report.changed == {cut_to_whole_turns(max_length): 1}
    summary = report.summary("--train_file_dir samples")
    assert (
        f"3 conversations read, 2 samples kept, 1 samples dropped ({too_long(max_length)}), "
        f"1 samples {cut_to_whole_turns(max_length)}"
    ) in summary
    cut = dataset[1][
        "input_ids"
    ]  # the first turn, closed by its end token (GLM: the next user tag)
    assert (
        cut == whole_two.input_ids[: len(cut)]
        and len(first_turn.input_ids) - 1 <= len(cut) <= max_length
    )
    for row in dataset:
        spans = trained_spans(SimpleNamespace(input_ids=row["input_ids"], labels=row["labels"]))
        assert spans and all(span[-1] in stops for span in spans)


PAIR = {"question": "What color is ka-bo?", "response_chosen": "red", "response_rejected": "blue"}


def preference_files(tmp_path):
    return write_jsonl(
        tmp_path / "p" / "p.jsonl",
        [
            PAIR,
            {**PAIR, "response_rejected": "red"},  # identical: dropped when read
            {**PAIR, "response_rejected": LONG},  # chosen fits, rejected does not
            {
                "prompt": "What color is lo-ri?",
                "completion": "blue",
                "label": True,
            },  # unpaired (KTO only)
        ],
    )


def test_a_pair_with_a_long_answer_is_dropped_whole_and_counted(tiny_model, tmp_path):
    tokenizer, template, stops = tokenizer_and_template(tiny_model, "qwen")
    folder = write_jsonl(
        tmp_path / "p" / "p.jsonl",
        [PAIR, {**PAIR, "response_chosen": LONG}, {**PAIR, "response_rejected": LONG}],
    )
    for whole in (False, True):  # DPO (prompt + answer) and RM (whole conversations)
        dataset, report = build_preference_dataset(
            folder, "--train_file_dir", template, tokenizer, 64, whole_conversations=whole
        )
        assert len(dataset) == report.kept == 1 and report.read == 3
        assert report.summary("x") == (
            "x: 1 files, 3 records read, 1 pairs kept, "
            "2 pairs dropped (longer than --model_max_length 64)"
        )
        row = dataset[0]
        assert all(
            ends_a_turn(tokenizer, row[k], stops) for k in ("chosen_ids", "rejected_ids")
        )  # never cut


def test_kto_summary_counts_records_read_and_answers_made(tiny_model, tmp_path):
    tokenizer, template, stops = tokenizer_and_template(tiny_model, "qwen")
    dataset, report = build_preference_dataset(
        preference_files(tmp_path), "--train_file_dir", template, tokenizer, 64, unpaired=True
    )
    # 4 records: 1 identical pair dropped; 2 pairs split into 4 answers + 1 unpaired answer; the
    # long one dropped
    assert (report.read, report.records_kept, report.samples, report.kept, len(dataset)) == (
        4,
        3,
        5,
        4,
        4,
    )
    assert report.summary("--train_file_dir") == (
        "--train_file_dir: 1 files, 4 records read, 1 records dropped (chosen equals rejected), "
        "5 answers made from "
        "the 3 records kept, 4 answers kept, 1 answers dropped (longer than --model_max_length 64)"
    )
    assert sorted(dataset["label"]) == [False, True, True, True]
    assert all(ids[-1] in stops for ids in dataset["completion_ids"])


def test_kto_stage_logs_records_and_answers(tiny_model, tmp_path, caplog):
    from stages import dpo

    dpo.main(
        [
            "--model_name_or_path",
            str(tiny_model),
            "--template_name",
            "qwen",
            "--train_file_dir",
            preference_files(tmp_path),
            "--validation_split_percentage",
            "0",
            "--output_dir",
            str(tmp_path / "kto"),
            "--loss_type",
            "kto",
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            "1",
            "--use_peft",
            "False",
            "--model_max_length",
            "64",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--seed",
            "0",
        ]
    )
    assert (
        "--train_file_dir: 1 files, 4 records read, 1 records dropped (chosen equals rejected), "
        "5 answers made from the 3 records kept, 4 answers kept, 1 answers dropped "
        "(longer than --model_max_length 64)"
    ) in caplog.text


def test_rl_prompts_longer_than_the_budget_are_dropped_whole_and_counted(tiny_model, tmp_path):
    tokenizer, template, _ = tokenizer_and_template(tiny_model, "qwen")
    folder = write_jsonl(
        tmp_path / "q" / "q.jsonl",
        [
            {"messages": CHAT[:2]},
            {
                "messages": [
                    {"role": "user", "content": LONG},
                    {"role": "assistant", "content": "a"},
                ]
            },
        ],
    )
    prompts, report = load_prompts(folder, "--train_file_dir", template, tokenizer, 64)
    assert report.read == 2 and report.kept == 1 and len(prompts) == 1
    assert report.dropped == {
        "prompt longer than 64 tokens (--model_max_length - --max_new_tokens)": 1
    }
    rendered = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert (
        prompts[0].ids == tokenizer(rendered, add_special_tokens=False).input_ids
    )  # not cut from either side
