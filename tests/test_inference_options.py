"""Inference as the seed documents do it: 4/8-bit weights with bitsandbytes (answers on this
machine, and one sentence where bitsandbytes is missing), --rope_scaling carried into the loaded
model's config and its rotary embedding, the flags on chat and serve, and `exit` / `quit` / `stop`
leaving the interactive chat."""

import io
import json
import os
import site
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.errors import UserError
from pipeline.infer import chat_model as chat
from pipeline.infer import cli
from tests.helpers import REPO

QUESTION = [{"role": "user", "content": "What color is ka-bo?"}]


def run(*args: str, cwd: Path, pythonpath: list[str] | None = None, stdin: str | None = None):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), *(pythonpath or []), os.environ.get("PYTHONPATH", "")]
        ),
    }
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )


def last_logits(model: chat.ChatModel, messages: list[dict] = QUESTION) -> torch.Tensor:
    with torch.no_grad():
        return model.model(**model.encode([messages])).logits[0, -1].float()


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model, its B matrices moved off zero (a stand-in for training)."""
    torch.manual_seed(
        0
    )  # before peft draws the A matrices: the same adapter whatever ran before (test order)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


# ---------------------------------------------------------------- 4/8-bit


def test_quantization_flags_parse_as_in_training():
    parse = cli.build_parser().parse_args
    assert parse(["--load_in_4bit"]).load_in_4bit is True
    assert parse(["--load_in_4bit", "True", "outputs/sft"]).load_in_4bit is True
    args = parse(["--load_in_8bit", "false", "--model", "m"])
    assert args.load_in_8bit is False and args.load_in_4bit is False
    with pytest.raises(UserError, match="--load_in_4bit and --load_in_8bit exclude each other"):
        chat.LoadOptions(load_in_4bit=True, load_in_8bit=True)
    proc = run(
        "-m", "pipeline.chat", "--model", "m", "--load_in_4bit", "True", "--load_in_8bit", cwd=REPO
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip()
        == "error: --load_in_4bit and --load_in_8bit exclude each other; choose one."
    )


@pytest.mark.parametrize(
    "options, layer",
    [
        (chat.LoadOptions(load_in_4bit=True), bnb.nn.Linear4bit),
        (chat.LoadOptions(load_in_8bit=True), bnb.nn.Linear8bitLt),
    ],
)
def test_quantized_weights_answer(tiny_model, adapter, options, layer):
    full = chat.load_chat_model(str(tiny_model), "qwen")
    quantized = chat.load_chat_model(str(tiny_model), "qwen", options=options)
    assert isinstance(quantized.model.model.layers[0].mlp.down_proj, layer)
    want, got = last_logits(full), last_logits(quantized)
    assert (
        not torch.equal(got, want)
        and torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.98
    )
    completion = quantized.generate([QUESTION], chat.Sampling(max_new_tokens=4))[0]
    assert completion.completion_tokens >= 1 and isinstance(completion.text, str)
    # an adapter on the quantized base (QLoRA-style inference)
    lora = chat.load_chat_model(str(adapter), "qwen", options=options)
    assert isinstance(lora.model, PeftModel) and isinstance(
        lora.model.base_model.model.model.layers[0].mlp.down_proj, layer
    )
    reference = chat.load_chat_model(str(adapter), "qwen")
    want, got = last_logits(reference), last_logits(lora)
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.98
    assert (
        torch.nn.functional.cosine_similarity(got, last_logits(quantized), dim=0) < 0.999
    )  # the adapter applies


def test_quantization_refused_where_bitsandbytes_cannot(tiny_model, tmp_path):
    """An interpreter whose packages are this one's but bitsandbytes: the flag is refused in one
    sentence, before anything loads."""
    packages = tmp_path / "site-packages"
    packages.mkdir()
    for entry in Path(site.getsitepackages()[0]).iterdir():
        if not entry.name.lower().startswith("bitsandbytes"):
            (packages / entry.name).symlink_to(entry)
    proc = run(
        "-S",
        "-m",
        "pipeline.chat",
        "--model",
        str(tiny_model),
        "--template_name",
        "qwen",
        "--prompt",
        "hi",
        "--load_in_4bit",
        cwd=tmp_path,
        pythonpath=[str(packages)],
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --load_in_4bit: bitsandbytes cannot quantize on this machine (")
    )
    assert proc.stderr.strip().endswith(
        "); drop the flag, or install bitsandbytes for this device."
    )
    assert "Loading weights" not in proc.stderr


# ---------------------------------------------------------------- RoPE scaling


def test_rope_scaling_reaches_the_loaded_model(tiny_model, adapter):
    plain = chat.load_chat_model(str(tiny_model), "qwen")
    linear = chat.load_chat_model(
        str(tiny_model),
        "qwen",
        options=chat.LoadOptions(rope_scaling="linear", model_max_length=4096),
    )
    assert linear.model.config.rope_parameters == {
        "rope_theta": 10000.0,
        "rope_type": "linear",
        "factor": 4.0,
    }
    assert (
        linear.model.config.max_position_embeddings == 4096
        and linear.model.model.rotary_emb.rope_type == "linear"
    )
    assert not torch.allclose(
        last_logits(linear), last_logits(plain), atol=1e-4
    )  # positions are interpolated
    assert linear.generate([QUESTION], chat.Sampling(max_new_tokens=4))[0].completion_tokens >= 1
    # dynamic (the seed documents' choice at inference), by default to twice the context; on an
    # adapter's base
    dynamic = chat.load_chat_model(
        str(adapter), "qwen", options=chat.LoadOptions(rope_scaling="dynamic")
    )
    config = dynamic.model.base_model.model.config
    assert (
        config.rope_parameters["rope_type"] == "dynamic" and config.rope_parameters["factor"] == 2.0
    )
    assert config.max_position_embeddings == 2048
    unscaled = chat.load_chat_model(str(adapter), "qwen")
    long = [
        {"role": "user", "content": "word " * 1100}
    ]  # past the 1024 positions, where dynamic scaling starts
    assert torch.allclose(last_logits(dynamic), last_logits(unscaled), atol=1e-5)
    assert not torch.allclose(last_logits(dynamic, long), last_logits(unscaled, long), atol=1e-4)
    assert dynamic.generate([long], chat.Sampling(max_new_tokens=4))[0].completion_tokens >= 1
    yarn = chat.load_chat_model(
        str(tiny_model), "qwen", options=chat.LoadOptions(rope_scaling="yarn")
    )
    assert yarn.model.config.rope_parameters["original_max_position_embeddings"] == 1024


def test_rope_scaling_flags_are_checked(tiny_model):
    with pytest.raises(
        UserError, match="--model_max_length is the context --rope_scaling stretches to"
    ):
        chat.LoadOptions(model_max_length=4096)
    with pytest.raises(UserError, match="set --model_max_length above 1024 \\(got 512\\)"):
        chat.load_chat_model(
            str(tiny_model),
            "qwen",
            options=chat.LoadOptions(rope_scaling="linear", model_max_length=512),
        )
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--rope_scaling", "ntk"])


def test_chat_command_takes_the_flags(adapter, tmp_path):
    """The command line: an adapter on a 4-bit base, RoPE stretched, one answer printed."""
    proc = run(
        "-m",
        "pipeline.chat",
        str(adapter),
        "--template_name",
        "qwen",
        "--prompt",
        "hi",
        "--max_new_tokens",
        "4",
        "--load_in_4bit",
        "True",
        "--rope_scaling",
        "linear",
        "--model_max_length",
        "2048",
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout.endswith("\n"), proc.stderr[-3000:]


# ---------------------------------------------------------------- serve


def test_serve_takes_the_flags(tiny_model, adapter, tmp_path):
    """pipeline.serve loads through the same function: an adapter whose recorded base is gone, on
    --base_model, in 4-bit, with RoPE stretched to 2048 positions, answers a prompt the unstretched
    1024 would refuse."""
    moved = tmp_path / "lora"
    moved.mkdir()
    for name in ("adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (moved / name).write_bytes((adapter / name).read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")})
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.serve",
            "--model",
            str(moved),
            "--base_model",
            str(tiny_model),
            "--template_name",
            "qwen",
            "--port",
            "0",
            "--load_in_4bit",
            "--rope_scaling",
            "linear",
            "--model_max_length",
            "2048",
            "--max_new_tokens",
            "4",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "http://" in line, proc.stderr.read()[-3000:] if proc.poll() is not None else line
        url = line.split(" on ")[1].split()[0]
        body = {
            "model": str(moved),
            "messages": [{"role": "user", "content": "word " * 750}],
            "max_tokens": 4,
        }
        request = urllib.request.Request(
            f"{url}/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{e.code}: {e.read().decode()}") from e
        assert (
            1024 < answer["usage"]["prompt_tokens"] < 2048
            and answer["usage"]["completion_tokens"] >= 1
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- leaving the interactive chat


@pytest.mark.parametrize("word", ["exit", "quit", "stop"])
def test_exit_quit_and_stop_leave_the_chat(tiny_model, monkeypatch, capsys, word):
    model = chat.load_chat_model(str(tiny_model), "qwen")
    sampling = chat.Sampling(max_new_tokens=4)

    def interact(lines: str) -> str:
        monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
        cli.interact(model, sampling, None)
        return capsys.readouterr().out

    one = interact("hello\n")
    assert (
        one.endswith("\n") and interact("hello\nhi there\n") != one
    )  # a second message is answered
    assert interact(f"hello\n{word}\nhi there\n") == one  # ... but not after the word


def test_quit_leaves_the_chat_command(tiny_model, tmp_path):
    proc = run(
        "-m",
        "pipeline.chat",
        "--model",
        str(tiny_model),
        "--template_name",
        "qwen",
        "--max_new_tokens",
        "4",
        cwd=tmp_path,
        stdin="quit\nhello\n",
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr[-3000:]
    assert "`exit`, `quit` or `stop` leaves" in proc.stderr
