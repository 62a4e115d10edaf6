"""The PPO loop reads log-probabilities, entropies and the held-out KL from hidden states in chunks, never the
[batch, answer, vocabulary] logits: the numbers and gradients equal those computed from the model's logits."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.rl import ppo_math
from pipeline.rl.rollout import Trajectory, chunked_full_kl, response_hidden, token_logprobs_and_entropy


def full_logits(model, traj):
    positions = (traj.mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=traj.ids, attention_mask=traj.mask, position_ids=positions, use_cache=False)
    return out.logits[:, traj.query_len - 1 : -1]


def trajectory(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of a shorter prompt
    mask[2, 12:] = 0  # an answer that stopped early
    return Trajectory([], ids, mask, 6, mask[:, 6:], torch.ones(3, dtype=torch.bool), [])


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_chunked_logprobs_entropy_and_gradients_equal_the_full_logits(tiny_model, lora, chunk, monkeypatch):
    monkeypatch.setattr("pipeline.rl.rollout.LOGIT_CHUNK", chunk)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    traj = trajectory(model.config.vocab_size)
    temperature = 0.7

    logits = full_logits(model, traj)
    want_logp = ppo_math.token_logprobs(logits, traj.responses, temperature)
    want_entropy = ppo_math.entropy(logits, temperature)
    (want_logp * traj.response_mask).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    logp, entropy = token_logprobs_and_entropy(model, traj, temperature)
    assert torch.allclose(logp, want_logp, atol=1e-5) and torch.allclose(entropy, want_entropy, atol=1e-5)
    assert not entropy.requires_grad
    (logp * traj.response_mask).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, want_grads[name], atol=1e-5), name

    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        want_kl = ppo_math.full_kl(full_logits(model, traj), full_logits(ref, traj))
        kl = chunked_full_kl(*response_hidden(model, traj), *response_hidden(ref, traj), chunk=chunk)
    assert torch.allclose(kl, want_kl, atol=1e-5)


def test_the_model_is_asked_for_one_position_of_logits_only(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    traj = trajectory(model.config.vocab_size)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        token_logprobs_and_entropy(model, traj, 1.0)
    # the model's own call: 1 position per row; then the answer positions (3 rows x 8) through the head
    assert seen[0] == (3, 1, model.config.vocab_size) and seen[1] == (24, model.config.vocab_size)


def test_values_are_scored_at_the_answer_states_only(tiny_model):
    from transformers import AutoModelForSequenceClassification

    from pipeline.rl.models import ValueModel
    from pipeline.rl.rollout import values

    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, dtype=torch.float32)
    value = ValueModel(classifier)
    traj = trajectory(classifier.config.vocab_size)
    positions = (traj.mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        everywhere = value(traj.ids, traj.mask, positions)
        assert torch.allclose(values(value, traj), everywhere[:, traj.query_len - 1 : -1], atol=1e-6)


def test_static_rollout_cache_with_bucketed_prompts_generates_what_the_dynamic_one_does(tiny_model):
    """--rollout_cache static pads the prompts to the prompt budget (one compiled shape on a GPU) and decodes
    with a fixed-size cache: greedy answers equal the dynamic cache's."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from pipeline.data.prompts import Prompt
    from pipeline.rl.rollout import Rollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [Prompt([], "", None, tokenizer(t).input_ids) for t in ("What color is ka-bo?", "Hello there, who")]
    targs = SimpleNamespace(device=torch.device("cpu"), bf16=False, fp16=False, process_index=0, world_size=1,
                            per_device_train_batch_size=2)
    answers = {}
    for cache in ("dynamic", "static"):
        args = SimpleNamespace(max_new_tokens=6, model_max_length=70, temperature=1.0, top_p=1.0, rollout_cache=cache)
        rollouts = Rollouts(model, None, None, None, tokenizer, None, args, targs)
        traj = rollouts.generate(prompts, sample=False)
        assert traj.query_len == (64 if cache == "static" else max(len(p.ids) for p in prompts))
        answers[cache] = (traj.responses.tolist(), traj.answers)
    assert answers["static"] == answers["dynamic"]
