"""README's method x stage table, checked cell by cell on the tiny model: each method either trains
one step on each stage and saves a model that loads, or is refused in one sentence before any work.
(ZeRO-2/3 cells are the DeepSpeed tests': test_zero3_lora.py, test_ppo_deepspeed.py,
test_zero_resume.py; fp16 is test_fp16.py plus the recorded GPU run.)"""

import json
import re

import pytest

from pipeline.errors import UserError
from stages import dpo, grpo, ppo, pt, rm, sft
from tests.helpers import DATA

METHODS = {
    "full": ["--use_peft", "False"],
    "lora": ["--use_peft", "True"],
    "qlora": ["--use_peft", "True", "--qlora", "True"],
    "prefix": [
        "--use_peft",
        "True",
        "--peft_type",
        "prefix_tuning",
        "--num_virtual_tokens",
        "4",
        "--gradient_checkpointing",
        "False",
    ],
}
# what each cell does: "trains", or a pattern of the one-sentence refusal
EXPECTED = {
    (stage, method): "trains"
    for stage in ("pt", "sft", "rm", "dpo", "ppo", "grpo")
    for method in METHODS
}
EXPECTED.update(
    {
        (
            stage,
            "prefix",
        ): r"--peft_type prefix_tuning is for SFT; the RL stages train LoRA/QLoRA adapters"
        for stage in ("ppo", "grpo")
    }
)
EXPECTED[("rm", "prefix")] = r"--peft_type prefix_tuning cannot train a reward model .* use LoRA"


def argv(stage: str, model, reward_model, out) -> list[str]:
    common = [
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--seed",
        "0",
    ]
    if stage == "pt":
        return [
            *common,
            "--train_file_dir",
            str(DATA / "pt"),
            "--validation_split_percentage",
            "0",
            "--block_size",
            "64",
            "--per_device_train_batch_size",
            "2",
        ]
    chat = [
        *common,
        "--template_name",
        "qwen",
        "--model_max_length",
        "128",
        "--validation_split_percentage",
        "0",
    ]
    if stage == "sft":
        return [*chat, "--train_file_dir", str(DATA / "sft"), "--per_device_train_batch_size", "2"]
    if stage in ("rm", "dpo"):
        return [
            *chat,
            "--train_file_dir",
            str(DATA / "reward"),
            "--per_device_train_batch_size",
            "2",
        ]
    rl = [
        *chat,
        "--train_file_dir",
        str(DATA / "sft"),
        "--max_new_tokens",
        "4",
        "--per_device_train_batch_size",
        "4",
    ]
    if stage == "ppo":
        return [*rl, "--reward_model_name_or_path", str(reward_model)]
    return [*rl, "--algorithm", "grpo", "--reward_funcs", "exact_match", "--num_generations", "2"]


MAINS = {
    "pt": pt.main,
    "sft": sft.main,
    "rm": rm.main,
    "dpo": dpo.main,
    "ppo": ppo.main,
    "grpo": grpo.main,
}


@pytest.mark.parametrize("stage, method", sorted(EXPECTED), ids=lambda v: v)
def test_each_method_trains_on_each_stage_or_is_refused_in_one_sentence(
    stage, method, tiny_model, reward_model, tmp_path
):
    out = tmp_path / "out"
    expected = EXPECTED[(stage, method)]
    if expected != "trains":
        with pytest.raises(UserError) as refused:
            MAINS[stage](argv(stage, tiny_model, reward_model, out) + METHODS[method])
        message = str(refused.value)
        assert re.search(expected, message) and message.endswith(".") and ". " not in message, (
            message
        )
        assert not out.exists() or not any(out.iterdir())
        return
    MAINS[stage](argv(stage, tiny_model, reward_model, out) + METHODS[method])
    saved = {p.name for p in out.iterdir()}
    weights = {"adapter_model.safetensors", "model.safetensors"} & saved or {
        n for n in saved if n.endswith(".safetensors") or n.endswith(".bin")
    }
    assert weights, saved
    if method != "full":
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == ("PREFIX_TUNING" if method == "prefix" else "LORA")
