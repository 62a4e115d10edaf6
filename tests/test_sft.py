"""SFT stage: learns the synthetic task (held-out exact match through the saved chat template),
trains every seed format with its family's template, and saves a tokenizer that carries the
template."""

import importlib.util
import json
import logging
import subprocess
import sys

import pytest
from transformers import AutoTokenizer, GenerationConfig

from pipeline.data.conversations import read_conversations
from pipeline.data.masking import encode
from pipeline.data.templates import get_template, resolve_template
from pipeline.eval.evaluate import exact_match
from stages import sft
from tests.helpers import DATA, REPO, lora_b_norms

COMMON = [
    "--per_device_train_batch_size",
    "16",
    "--logging_steps",
    "10",
    "--save_steps",
    "1000",
    "--report_to",
    "none",
    "--seed",
    "0",
    "--model_max_length",
    "256",
]


def run_sft(model, out, *extra):
    logging.getLogger("pipeline").propagate = True  # let caplog see the stage's log
    sft.main(["--model_name_or_path", str(model), "--output_dir", str(out), *COMMON, *extra])
    return out


@pytest.fixture(scope="module")
def heldout():
    convs, _ = read_conversations(str(DATA / "sft_eval"), "--validation_file_dir")
    return [c for c in convs if len(c["messages"]) == 2]


@pytest.mark.slow
def test_sft_learns_the_task_and_saves_the_template(tiny_model, tmp_path, heldout, caplog):
    before = (
        exact_match(str(tiny_model), heldout)
        if AutoTokenizer.from_pretrained(tiny_model).chat_template
        else 0.0
    )
    out = run_sft(
        tiny_model,
        tmp_path / "sft",
        "--template_name",
        "qwen",
        "--train_file_dir",
        str(DATA / "sft"),
        "--validation_file_dir",
        str(DATA / "sft_eval"),
        "--use_peft",
        "False",
        "--learning_rate",
        "3e-3",
        "--max_steps",
        "150",
    )
    assert "Sanity check" in caplog.text
    after = exact_match(str(out), heldout)
    assert before == 0.0 and after >= 0.6, after
    # the saved tokenizer renders exactly what training used, and generation stops on <|im_end|>
    tokenizer = AutoTokenizer.from_pretrained(out)
    conv = heldout[0]["messages"]
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    assert tokenizer.chat_template == get_template("qwen").chat_template
    assert (
        tokenizer(text, add_special_tokens=False).input_ids
        == encode(resolve_template("auto", tokenizer), tokenizer, conv).input_ids
    )
    assert (
        tokenizer.convert_tokens_to_ids("<|im_end|>")
        in GenerationConfig.from_pretrained(out).eos_token_id
    )
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] < 1.0


FAMILY_FILES = {
    "sharegpt_chat.jsonl": "vicuna",
    "messages_tools.jsonl": "glm4",
    "chatglm3_tools.json": "chatglm3",
    "alpaca_instructions.json": "alpaca",
}


@pytest.mark.parametrize("filename", sorted(FAMILY_FILES))
def test_each_seed_format_trains_with_its_family_template(tiny_model, tmp_path, filename):
    data = tmp_path / "data"
    data.mkdir()
    (data / filename).write_bytes((DATA / "examples" / "sft" / filename).read_bytes())
    out = run_sft(
        tiny_model,
        tmp_path / "out",
        "--template_name",
        FAMILY_FILES[filename],
        "--train_file_dir",
        str(data),
        "--validation_split_percentage",
        "0",
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-3",
    )
    state = json.loads((out / "trainer_state.json").read_text())
    norms = lora_b_norms(out / "adapter_model.safetensors")
    assert (
        state["global_step"] == 3 and norms and min(norms) > 0
    )  # every LoRA B moved off its zero init


@pytest.mark.slow
def test_lora_sft_merge_keeps_the_template(tiny_model, tmp_path):
    out = run_sft(
        tiny_model,
        tmp_path / "lora",
        "--template_name",
        "llama3",
        "--train_file_dir",
        str(DATA / "sft"),
        "--validation_split_percentage",
        "0",
        "--max_steps",
        "2",
    )
    merged = tmp_path / "merged"
    subprocess.run(
        [
            sys.executable,
            "merge_peft_adapter.py",
            "--base_model",
            str(tiny_model),
            "--tokenizer_path",
            str(tiny_model),
            "--lora_model",
            str(out),
            "--output_dir",
            str(merged),
        ],
        cwd=REPO,
        check=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(merged)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(conv, tokenize=False).startswith(
        "<|begin_of_text|><|start_header_id|>user"
    )
    assert (
        tokenizer.convert_tokens_to_ids("<|eot_id|>")
        in GenerationConfig.from_pretrained(merged).eos_token_id
    )


def test_split_mode_and_dropped_samples_are_counted(tiny_model, tmp_path, caplog):
    run_sft(
        tiny_model,
        tmp_path / "split",
        "--template_name",
        "chatml",
        "--train_file_dir",
        str(DATA / "examples" / "sft"),
        "--validation_split_percentage",
        "0",
        "--max_steps",
        "1",
        "--multi_turn_mode",
        "split",
        "--model_max_length",
        "40",
    )
    log = caplog.text
    assert (
        "14 conversations read, 23 samples made from the 14 conversations kept, 9 samples kept, 14 "
        "samples dropped (prompt + first trained answer longer than --model_max_length 40)"
    ) in log


def quick(tiny_model, out, *extra):
    return run_sft(
        tiny_model,
        out,
        "--template_name",
        "chatml",
        "--train_file_dir",
        str(DATA / "sft"),
        "--validation_split_percentage",
        "0",
        "--max_steps",
        "2",
        "--logging_steps",
        "1",
        *extra,
    )


def first_loss(out):
    return next(
        h["loss"]
        for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "loss" in h
    )


@pytest.mark.slow
def test_dora_and_prefix_tuning_train(tiny_model, tmp_path):
    dora = quick(tiny_model, tmp_path / "dora", "--use_dora", "True")
    assert json.loads((dora / "adapter_config.json").read_text())["use_dora"] is True
    prefix = quick(
        tiny_model, tmp_path / "prefix", "--peft_type", "prefix_tuning", "--num_virtual_tokens", "4"
    )
    config = json.loads((prefix / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
    proc = subprocess.run(
        [
            sys.executable,
            "merge_peft_adapter.py",
            "--base_model",
            str(tiny_model),
            "--lora_model",
            str(prefix),
            "--output_dir",
            str(tmp_path / "m"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "cannot be merged" in proc.stderr


def test_neftune_changes_the_training_forward(tiny_model, tmp_path):
    plain = quick(tiny_model, tmp_path / "plain", "--use_peft", "False")
    noisy = quick(tiny_model, tmp_path / "noisy", "--use_peft", "False", "--neft_alpha", "50")
    assert first_loss(noisy) != pytest.approx(first_loss(plain), abs=1e-6)


def test_rope_scaling_extends_the_context(tiny_model, tmp_path):
    out = quick(
        tiny_model,
        tmp_path / "rope",
        "--use_peft",
        "False",
        "--rope_scaling",
        "linear",
        "--model_max_length",
        "2048",
    )
    config = json.loads((out / "config.json").read_text())
    assert (
        config["rope_parameters"]["rope_type"] == "linear"
        and config["rope_parameters"]["factor"] == 2.0
    )
    assert config["max_position_embeddings"] == 2048


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rope_scaling", "linear"], "set --model_max_length above 1024"),
        pytest.param(
            ["--flash_attn", "True"],
            "needs the flash-attn package",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("flash_attn") is not None,
                reason="flash-attn is installed here",
            ),
        ),
        (["--shift_attn", "True"], "not supported"),
    ],
)
def test_unavailable_features_are_rejected_clearly(tiny_model, tmp_path, flags, message):
    from pipeline.errors import UserError

    with pytest.raises(UserError, match=message):
        quick(tiny_model, tmp_path / "x", *flags)


@pytest.mark.parametrize("flag", ["--load_in_8bit", "--qlora"])
def test_quantized_sft_trains(tiny_model, tmp_path, flag):
    out = quick(tiny_model, tmp_path / "q", flag, "True")
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    norms = lora_b_norms(out / "adapter_model.safetensors")
    assert norms and min(norms) > 0  # the adapter on the quantized base was trained


@pytest.mark.parametrize("flag", ["--load_in_8bit", "--qlora"])
def test_quantized_base_keeps_its_unquantized_weights_in_bf16(tiny_model, tmp_path, flag):
    """The weights a quantized load leaves unquantized (embeddings, output head, norms) stay in the
    bf16 they were loaded in, frozen; only the adapters are float32 (peft's own preparation would
    cast them all to float32: +2 GiB on Llama-3-8B). Under checkpointing every adapter weight still
    gets a gradient."""
    import torch

    from pipeline.model.loading import load_model, load_tokenizer

    model_args, _, peft_args, _, _ = sft.parse(
        [
            *("--model_name_or_path", str(tiny_model), "--train_file_dir", str(DATA / "sft")),
            *("--output_dir", str(tmp_path / "q"), flag, "True", "--torch_dtype", "bfloat16"),
        ]
    )
    model = load_model(
        model_args, peft_args, load_tokenizer(model_args), gradient_checkpointing=True
    )
    model.train()
    plain = {
        n: p for n, p in model.named_parameters() if p.dtype in (torch.float32, torch.bfloat16)
    }
    frozen = {n: p for n, p in plain.items() if not p.requires_grad}
    adapters = {n: p for n, p in plain.items() if p.requires_grad}
    assert any("embed_tokens" in n for n in frozen) and any("norm" in n for n in frozen)
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}, {
        n: p.dtype for n, p in frozen.items() if p.dtype != torch.bfloat16
    }
    assert adapters and all("lora_" in n for n in adapters)
    assert {p.dtype for p in adapters.values()} == {torch.float32}
    ids = torch.randint(0, 100, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in adapters.values())
    # lora_B starts at zero, so only its gradient is nonzero at the first step
    assert all(p.grad.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)


def test_packing_flags(tiny_model, tmp_path, caplog):
    """--packing is on by default and --packing_length sets the row size; combinations that would
    change what a sample computes are refused, and the automatic default turns packing off for
    them."""
    quick(tiny_model, tmp_path / "packed", "--packing_length", "300", "--loss_chunk_size", "7")
    assert "packed whole into" in caplog.text and "rows of <= 300 tokens" in caplog.text
    caplog.clear()
    quick(tiny_model, tmp_path / "plain", "--packing", "False")
    assert "packed whole into" not in caplog.text
    from pipeline.errors import UserError

    base = [
        "--model_name_or_path",
        str(tiny_model),
        "--train_file_dir",
        str(DATA / "sft"),
        "--output_dir",
        str(tmp_path / "x"),
        "--model_max_length",
        "256",
    ]
    for flags, message in [
        (
            ["--packing", "True", "--peft_type", "prefix_tuning"],
            "cannot be combined with --peft_type",
        ),
        (["--packing", "True", "--neft_alpha", "5"], "cannot be combined with --neft_alpha"),
        (["--packing_length", "100"], "must hold the longest sample"),
        (["--loss_chunk_size", "0"], "must be positive"),
    ]:
        with pytest.raises(UserError, match=message):
            sft.parse(base + flags)
    assert (
        sft.parse(base + ["--neft_alpha", "5"])[3].packing is False
    )  # the default follows the combination
    assert sft.parse(base)[3].packing is True


def test_gradient_checkpointing_is_on_by_default_except_for_prefix_tuning(tiny_model, tmp_path):
    from pipeline.errors import UserError
    from stages import sft

    base = [
        "--model_name_or_path",
        str(tiny_model),
        "--train_file_dir",
        str(DATA / "sft"),
        "--output_dir",
        str(tmp_path / "o"),
        "--template_name",
        "qwen",
    ]
    assert sft.parse(base)[-1].gradient_checkpointing is True
    assert (
        sft.parse(base + ["--gradient_checkpointing", "False"])[-1].gradient_checkpointing is False
    )
    prefix = base + ["--peft_type", "prefix_tuning"]
    assert (
        sft.parse(prefix)[-1].gradient_checkpointing is False
    )  # virtual tokens do not survive the recompute
    with pytest.raises(UserError, match="cannot be combined with --peft_type prefix_tuning"):
        sft.parse(prefix + ["--gradient_checkpointing", "True"])


def test_use_liger_kernel_is_refused_without_a_gpu_or_the_package(tiny_model, tmp_path):
    import torch

    from pipeline.errors import UserError
    from stages import sft

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the flag applies")
    base = [
        "--model_name_or_path",
        str(tiny_model),
        "--train_file_dir",
        str(DATA / "sft"),
        "--output_dir",
        str(tmp_path / "o"),
        "--template_name",
        "qwen",
    ]
    assert sft.parse(base)[-1].use_liger_kernel is False  # the default is on only on a CUDA GPU
    with pytest.raises(UserError, match="--use_liger_kernel needs a CUDA GPU"):
        sft.parse(base + ["--use_liger_kernel", "True"])


def test_a_reasoning_template_trains_under_auto_and_the_saved_model_renders_the_training_prompt(
    tiny_model, tmp_path
):
    """Qwen3.5's official template (tests/official_templates) with thinking off: the variables reach
    every render in training and are saved as the template's defaults, so the saved model's plain
    apply_chat_template builds the prompt training used, and its generation config stops on
    <|im_end|>."""
    import shutil

    from tests.official_families import family_tokenizer

    model = tmp_path / "qwen35-tiny"
    shutil.copytree(tiny_model, model)
    family_tokenizer(tiny_model, "qwen3.5").save_pretrained(model)
    data = tmp_path / "data"
    data.mkdir()
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"What is {n} + {n}?"},
                {"role": "assistant", "content": f"It is {2 * n}."},
            ]
        }
        for n in range(8)
    ]
    (data / "chats.jsonl").write_text(
        "\n".join(json.dumps(c) for c in chats) + "\n", encoding="utf-8"
    )
    out = run_sft(
        model,
        tmp_path / "out",
        "--template_name",
        "auto",
        "--chat_template_kwargs",
        '{"enable_thinking": false}',
        "--train_file_dir",
        str(data),
        "--validation_split_percentage",
        "0",
        "--max_steps",
        "2",
    )
    saved = AutoTokenizer.from_pretrained(out)
    prompt = saved.apply_chat_template(
        chats[0]["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    trained = family_tokenizer(tiny_model, "qwen3.5").apply_chat_template(
        chats[0]["messages"][:1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert prompt == trained
    assert (
        saved.convert_tokens_to_ids("<|im_end|>")
        in GenerationConfig.from_pretrained(out).eos_token_id
    )
