"""pipeline.chat: interactive chat over piped stdin streams the trained model's greedy answers,
batch files go in and out (a broken line stops with file:line), and an adapter folder answers like
base + adapter in peft."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from pipeline.data.templates import render
from pipeline.errors import UserError, run_cli
from pipeline.eval.evaluate import greedy_answers
from pipeline.infer import chat_model as chat
from pipeline.infer import cli
from pipeline.tools import synthetic
from stages import sft
from tests.helpers import DATA, REPO

HELDOUT = synthetic.split_items()[1]  # item names training never saw


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_interactive_chat_streams_the_greedy_answers(sft_model):
    a, b, c, d = HELDOUT[0], HELDOUT[5], HELDOUT[10], HELDOUT[15]
    lines = [
        synthetic.question(a),
        synthetic.question(b, "zh"),
        "clear",
        synthetic.question(c),
        "exit",
        synthetic.question(d),
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.chat",
            "--model",
            str(sft_model),
            "--max_new_tokens",
            "16",
        ],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = proc.stdout.splitlines()
    assert answers == [
        synthetic.answer(a),
        synthetic.answer(b, "zh"),
        synthetic.answer(c),
    ]  # nothing after exit
    assert "(history cleared)" in proc.stderr
    # the second turn saw the first; after `clear` the third saw only itself
    second = user(lines[0]) + [{"role": "assistant", "content": answers[0]}] + user(lines[1])
    want = [
        greedy_answers(str(sft_model), [p], batch_size=1)[0]
        for p in (user(lines[0]), second, user(lines[3]))
    ]
    assert answers == want


def test_batch_file_in_and_out(sft_model, tmp_path):
    items = HELDOUT[:6]
    records = [{"prompt": synthetic.question(i), "id": k} for k, i in enumerate(items[:4])]
    records.append(
        {"prompt": synthetic.question(items[4], "zh"), "system": "Answer with one word."}
    )
    records.append(
        {
            "messages": user(synthetic.question(items[0]))
            + [{"role": "assistant", "content": "red"}]
            + user(synthetic.question(items[5]))
        }
    )
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (tmp_path / "in.jsonl").write_text(
        "\n".join(lines[:3] + [""] + lines[3:]) + "\n", encoding="utf-8"
    )
    out = tmp_path / "out" / "answers.jsonl"
    cli.main(
        [
            "--model",
            str(sft_model),
            "--input_file",
            str(tmp_path / "in.jsonl"),
            "--output_file",
            str(out),
            "--batch_size",
            "4",
            "--max_new_tokens",
            "16",
        ]
    )
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in g.items() if k != "answer"} for g in got] == records
    answers = [g["answer"] for g in got]
    assert answers == [synthetic.answer(i) for i in items[:4]] + [
        synthetic.answer(items[4], "zh"),
        synthetic.answer(items[5]),
    ]
    prompts = [cli.record_messages(r, None) for r in records]
    assert prompts[4][0] == {"role": "system", "content": "Answer with one word."}
    assert answers == greedy_answers(str(sft_model), prompts)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"prompt": "What color is ka-bo?"', "not a valid JSON line"),
        ('{"text": "What color is ka-bo?"}', 'exactly one of "prompt"'),
        ('{"prompt": "a", "messages": []}', 'exactly one of "prompt"'),
        ('{"prompt": ["a"]}', "must be strings"),
        ('{"messages": [{"role": "bot", "content": "a"}]}', "needs a role"),
        (
            '{"messages": [{"role": "user", "content": "a"}, '
            '{"role": "assistant", "content": "b"}]}',
            "last message must be from the user",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
            '{"role": "user", "content": "c"}]}',
            "only the first message",
        ),
    ],
)
def test_a_broken_input_line_names_file_and_line(sft_model, tmp_path, capsys, bad, reason):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "What color is ka-bo?"}\n\n' + bad + "\n", encoding="utf-8")
    argv = [
        "--model",
        str(sft_model),
        "--input_file",
        str(path),
        "--output_file",
        str(tmp_path / "out.jsonl"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: cli.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:3: ") and reason in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.jsonl").exists()


def test_base_model_with_template_name(tiny_model):
    with pytest.raises(UserError, match="has no chat template; pass --template_name"):
        chat.load_chat_model(str(tiny_model))
    model = chat.load_chat_model(str(tiny_model), template_name="qwen")
    messages = user("What color is ka-bo?")
    assert model.render(messages) == render("qwen", messages, add_generation_prompt=True)
    assert (
        model.tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    )
    completion = model.generate([messages], chat.Sampling(max_new_tokens=3))[0]
    stops = model.generation_config.eos_token_id
    batch = model.tokenizer([model.render(messages)], return_tensors="pt", add_special_tokens=False)
    plain = model.model.generate(
        **batch,
        max_new_tokens=3,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=model.tokenizer.pad_token_id,
    )[0, batch["input_ids"].shape[1] :].tolist()
    end = next(
        (i for i, t in enumerate(plain) if t in stops), None
    )  # the random model: whatever greedy gives
    assert completion.finish_reason == ("length" if end is None else "stop")
    assert completion.completion_tokens == (3 if end is None else end + 1)
    assert completion.text == model.tokenizer.decode(plain[:end], skip_special_tokens=True)


def plain_peft_answers(base_dir, adapter_dir, prompts: list[list[dict]]) -> list[str]:
    """What a user gets with plain transformers + peft: base model, adapter, adapter's tokenizer and
    stop tokens."""
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir
    ).eval()
    stops = GenerationConfig.from_pretrained(adapter_dir).eos_token_id
    answers = []
    for messages in prompts:
        batch = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=stops)
        answers.append(
            tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return answers


def test_adapter_folder_answers_like_base_plus_adapter(sft_model, tmp_path):
    adapter = tmp_path / "lora"
    sft.main(
        [
            "--model_name_or_path",
            str(sft_model),
            "--template_name",
            "qwen",
            "--train_file_dir",
            str(DATA / "sft"),
            "--validation_split_percentage",
            "0",
            "--output_dir",
            str(adapter),
            "--use_peft",
            "True",
            "--lora_rank",
            "4",
            "--learning_rate",
            "2e-2",
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "8",
            "--max_train_samples",
            "32",
            "--model_max_length",
            "64",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--do_eval",
            "False",
            "--seed",
            "0",
        ]
    )
    # an adapter folder with only the adapter: tokenizer, template and stop tokens come from the
    # base
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter / name, bare / name)
    prompts = [user(synthetic.question(i)) for i in HELDOUT[:3]] + [
        user(synthetic.question(HELDOUT[3], "zh"))
    ]
    want = plain_peft_answers(sft_model, adapter, prompts)
    sampling = chat.Sampling(max_new_tokens=16)
    for folder in (adapter, bare):
        model = chat.load_chat_model(str(folder))
        assert isinstance(model.model, PeftModel)
        assert [model.generate([p], sampling)[0].text for p in prompts] == want
    # the adapter is not a no-op: it moves the logits of the model it was trained on
    batch = model.encode(prompts[:1])
    with torch.no_grad():
        tuned = model.model(**batch).logits
        with model.model.disable_adapter():
            base = model.model(**batch).logits
    assert not torch.allclose(tuned, base, atol=1e-3)
