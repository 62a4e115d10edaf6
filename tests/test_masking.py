"""Masking: trained tokens are the assistant contents plus the turn end; modes, loss flags,
truncation."""

import pytest
from transformers import AutoTokenizer

from pipeline.data.masking import IGNORE_INDEX, Dropped, encode, encode_samples, too_long
from pipeline.data.templates import field_template_names, get_template, resolve_template

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is ka-bo?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "lo-ri 是什么颜色?"},
    {"role": "assistant", "content": "蓝色"},
]


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    out = {}
    for name in field_template_names():
        tok = AutoTokenizer.from_pretrained(tiny_model)
        out[name] = tok, resolve_template(name, tok)  # the template, given to its tokenizer
    return out


def trained_text(tok, enc) -> str:
    return tok.decode([i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])


def expected_trained(template, answers) -> str:
    gp_rest = template.assistant.split("{content}")[0][len(template.generation_prompt) :]
    end = template.turn_end
    parts = []
    for k, a in enumerate(answers):
        closing = (
            end
            if end
            else (
                "<|user|>" if k < len(answers) - 1 and template.user.startswith("<|user|>") else ""
            )
        )
        parts.append(gp_rest + a + closing)
    text = "".join(parts)
    if not end:
        text = (
            text
            if template.user.startswith("<|user|>")
            else "".join(
                gp_rest + a + (template.user.split("{content}")[0] if k < len(answers) - 1 else "")
                for k, a in enumerate(answers)
            )
        )
        text += template.final_turn_end
    return text


@pytest.mark.parametrize("name", field_template_names())
def test_trained_tokens_are_answers_plus_turn_end(tokenizers, name):
    (tok, template), spec = tokenizers[name], get_template(name)
    enc = encode(template, tok, CONV, targets=None if spec.history_join is None else {4})
    # a history-joining format (Yuan2) writes earlier answers as history: its sample of the whole
    # conversation trains its last answer
    answers = ["red", "蓝色"] if spec.history_join is None else ["蓝色"]
    assert trained_text(tok, enc) == expected_trained(spec, answers)
    # training ids are exactly what tokenizing the saved chat template's text gives (no double BOS)
    text = tok.apply_chat_template(CONV, tokenize=False)
    closing = spec.final_turn_end if not spec.turn_end else ""
    assert enc.input_ids == tok(text + closing, add_special_tokens=False).input_ids


def test_no_double_bos(tokenizers):
    for name in ("llama3", "llama2", "mistral", "internlm2", "gemma", "deepseek"):
        tok, template = tokenizers[name]
        ids = encode(template, tok, CONV[1:3]).input_ids
        bos_id = tok.convert_tokens_to_ids("<s>" if name == "llama2" else get_template(name).bos)
        assert ids[0] == bos_id and ids.count(bos_id) == 1, name


def test_multi_turn_modes(tokenizers):
    tok, template = tokenizers["qwen"]
    conv = {"messages": CONV}
    [everything] = encode_samples(template, tok, conv, "all")
    [last] = encode_samples(template, tok, conv, "last")
    first, second = encode_samples(template, tok, conv, "split")
    assert trained_text(tok, everything) == "red<|im_end|>蓝色<|im_end|>"
    assert trained_text(tok, last) == "蓝色<|im_end|>" and last.input_ids == everything.input_ids
    assert trained_text(tok, first) == "red<|im_end|>" and len(first.input_ids) < len(
        everything.input_ids
    )
    assert (
        trained_text(tok, second) == "蓝色<|im_end|>" and second.input_ids == everything.input_ids
    )


def test_per_message_loss_and_train_on_inputs(tokenizers):
    tok, template = tokenizers["chatml"]
    conv = [dict(m) for m in CONV]
    conv[2]["loss"] = False  # first answer not trained
    conv[1]["loss"] = True  # the user question is
    text = trained_text(tok, encode(template, tok, conv))
    assert "red" not in text and "What color is ka-bo?" in text and text.endswith("蓝色<|im_end|>")
    all_enc = encode(template, tok, CONV, train_on_inputs=True)
    assert all(label != IGNORE_INDEX for label in all_enc.labels)


def test_truncation_keeps_whole_turns_and_drops_unsupervised(tokenizers):
    tok, template = tokenizers["qwen"]
    full = encode(template, tok, CONV)
    first_turn = encode(template, tok, CONV[:3])
    cut = encode(
        template, tok, CONV, max_length=len(full.input_ids) - 3
    )  # ends inside the second answer
    assert cut.input_ids == first_turn.input_ids[: len(cut.input_ids)] and cut.truncated
    assert trained_text(tok, cut) == "red<|im_end|>"
    prompt_len = encode(
        template, tok, CONV[:2] + [{"role": "assistant", "content": "x"}]
    ).labels.index(
        next(
            label
            for label in encode(
                template, tok, CONV[:2] + [{"role": "assistant", "content": "x"}]
            ).labels
            if label != IGNORE_INDEX
        )
    )
    assert encode(template, tok, CONV, max_length=prompt_len) == Dropped(too_long(prompt_len))
