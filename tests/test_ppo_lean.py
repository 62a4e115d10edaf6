"""The PPO loop reads log-probabilities, entropies and the held-out KL from hidden states in chunks,
never the [batch, answer, vocabulary] logits, and runs the rollout rows end to end without their
padding: at every answer token the numbers and gradients equal those computed from the padded
batch's logits."""

from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.rl import ppo_math
from pipeline.rl.rollout import (
    Trajectory,
    chunked_full_kl,
    response_hidden,
    token_logprobs_and_entropy,
)


def full_logits(model, traj):
    positions = (traj.mask.cumsum(1) - 1).clamp(min=0)
    out = model(
        input_ids=traj.ids, attention_mask=traj.mask, position_ids=positions, use_cache=False
    )
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
def test_chunked_logprobs_entropy_and_gradients_equal_the_full_logits(
    tiny_model, lora, chunk, monkeypatch
):
    monkeypatch.setattr("pipeline.rl.rollout.LOGIT_CHUNK", chunk)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if lora:
        model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    traj = trajectory(model.config.vocab_size)
    temperature = 0.7

    logits = full_logits(model, traj)
    want_logp = ppo_math.token_logprobs(logits, traj.responses, temperature)
    want_entropy = ppo_math.entropy(logits, temperature)
    (want_logp * traj.response_mask).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    logp, entropy = token_logprobs_and_entropy(model, traj, temperature)
    real = traj.response_mask.bool()  # padding-free: a column after a row's stop token has no state
    assert torch.allclose(logp[real], want_logp[real], atol=1e-5) and torch.allclose(
        entropy[real], want_entropy[real], atol=1e-5
    )
    assert not entropy.requires_grad
    (logp * traj.response_mask).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, want_grads[name], atol=1e-5), name

    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        want_kl = ppo_math.full_kl(full_logits(model, traj), full_logits(ref, traj))
        kl = chunked_full_kl(
            *response_hidden(model, traj), *response_hidden(ref, traj), chunk=chunk
        )
    assert torch.allclose(kl[real], want_kl[real], atol=1e-5)


def test_the_model_is_asked_for_one_position_of_logits_only(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    traj = trajectory(model.config.vocab_size)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        token_logprobs_and_entropy(model, traj, 1.0)
        # the first call checks once that the model's logits are its head on its final states:
        # 16 positions of one row, the model's own logits and the head's
        vocab = model.config.vocab_size
        assert seen[:3] == [(1, 1, vocab), (1, 14, vocab), (1, 14, vocab)], seen
        seen.clear()
        token_logprobs_and_entropy(model, traj, 1.0)
    # the model's own call: one flattened row (no padding), 1 position; then the answer positions
    # (3 x 8) through the head, for the log-probabilities and for the entropies
    assert seen == [(1, 1, vocab), (24, vocab), (24, vocab)], seen


def test_values_are_scored_at_the_answer_states_only(tiny_model):
    from transformers import AutoModelForSequenceClassification

    from pipeline.rl.models import ValueModel
    from pipeline.rl.rollout import values

    classifier = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, dtype=torch.float32
    )
    value = ValueModel(classifier)
    traj = trajectory(classifier.config.vocab_size)
    positions = (traj.mask.cumsum(1) - 1).clamp(min=0)
    real = traj.response_mask.bool()
    with torch.no_grad():
        everywhere = value(traj.ids, traj.mask, positions)[:, traj.query_len - 1 : -1]
        assert torch.allclose(values(value, traj, packed=False), everywhere, atol=1e-6)
        assert torch.allclose(
            values(value, traj)[real], everywhere[real], atol=1e-5
        )  # padding-free


@pytest.mark.parametrize("lora", [False, True])
def test_padding_free_update_equals_the_padded_one(tiny_model, lora):
    """The PPO update's policy and value passes without padding: the same log-probs, values and
    gradients at every answer token as the padded batch, with prompts of different lengths and
    answers that stopped early."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.rl.models import ValueModel
    from pipeline.rl.rollout import values

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    classifier = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, dtype=torch.float32
    )
    if lora:
        policy = get_peft_model(
            policy, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        classifier = get_peft_model(
            classifier,
            LoraConfig(
                r=4,
                target_modules=["q_proj", "v_proj"],
                task_type="SEQ_CLS",
                init_lora_weights=False,
            ),
        )
    value = ValueModel(classifier)
    traj = trajectory(policy.config.vocab_size)
    traj.mask[1, :1] = 0  # three prompt lengths
    real = traj.response_mask.bool()
    results = {}
    for packed in (False, True):
        logp = token_logprobs_and_entropy(policy, traj, 0.9, with_entropy=False, packed=packed)[0]
        v = values(value, traj, packed=packed)
        ((logp * real).sum() + (v * real).square().sum()).backward()
        grads = {
            n: p.grad.clone()
            for model in (policy, classifier)
            for n, p in model.named_parameters()
            if p.grad is not None
        }
        policy.zero_grad(set_to_none=True), classifier.zero_grad(set_to_none=True)
        results[packed] = logp.detach()[real], v.detach()[real], grads
    (lp0, v0, g0), (lp1, v1, g1) = results[False], results[True]
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(v0, v1, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name


def test_static_rollout_cache_generates_what_the_dynamic_one_does(tiny_model):
    """--rollout_cache static pads the prompts to the prompt budget and a short batch to the batch
    size (one compiled shape on a GPU) and decodes with a fixed-size cache: greedy answers equal the
    dynamic cache's, and the filler rows are dropped. auto is dynamic on the CPU."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from pipeline.data.prompts import Prompt
    from pipeline.rl.rollout import Rollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [
        Prompt([], "", None, tokenizer(t).input_ids)
        for t in ("What color is ka-bo?", "Hello there, who")
    ]
    targs = SimpleNamespace(
        device=torch.device("cpu"),
        bf16=False,
        fp16=False,
        process_index=0,
        world_size=1,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=3,
    )
    answers = {}
    for cache in ("dynamic", "static", "auto"):
        args = SimpleNamespace(
            max_new_tokens=6, model_max_length=70, temperature=1.0, top_p=1.0, rollout_cache=cache
        )
        rollouts = Rollouts(model, None, None, tokenizer, None, args, targs)
        assert rollouts.cache_kind() == ("static" if cache == "static" else "dynamic")
        traj = rollouts.generate(prompts, sample=False)
        assert traj.query_len == (64 if cache == "static" else max(len(p.ids) for p in prompts))
        assert traj.ids.shape[0] == len(traj.answers) == 2
        answers[cache] = (traj.responses.tolist(), traj.answers)
    assert answers["static"] == answers["dynamic"] == answers["auto"]
    assert rollouts.static_shape(1, 30) == (3, 64) and rollouts.static_shape(4, 30) == (4, 64)


def test_the_varlen_kernel_serves_the_update_through_forward_and_recomputation(
    tiny_model, monkeypatch
):
    """On a GPU the padding-free passes use the varlen attention kernel (here its CPU stand-in).
    With gradient checkpointing the backward pass recomputes the forward, so the kernel must stay
    selected over the whole update: inside packed_attention the gradients equal the padded batch's;
    a backward after leaving it recomputes with another attention and is refused by torch (the H200
    failure this guards against)."""
    from torch.utils.checkpoint import CheckpointError

    from pipeline.model import attention
    from pipeline.rl import rollout
    from pipeline.rl.models import prepare_for_rl

    monkeypatch.setattr(rollout, "torch_varlen_available", lambda: True)
    monkeypatch.setitem(attention.KERNEL, "fn", attention.reference_varlen)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    prepare_for_rl(policy, gradient_checkpointing=True)
    policy.train()
    traj = trajectory(policy.config.vocab_size)
    real = traj.response_mask.bool()
    used = []
    monkeypatch.setitem(
        attention.KERNEL, "fn", lambda *a: used.append(1) or attention.reference_varlen(*a)
    )

    grads = {}
    for packed in (False, True):
        with (
            rollout.packed_attention(policy) if packed else nullcontext()
        ):  # the padded batch: SDPA with its mask
            logp = token_logprobs_and_entropy(policy, traj, 1.0, with_entropy=False, packed=packed)[
                0
            ]
            (logp * real).sum().backward()
        grads[packed] = {
            n: p.grad.float().clone() for n, p in policy.named_parameters() if p.grad is not None
        }
        policy.zero_grad(set_to_none=True)
    assert (
        used and policy.config._attn_implementation == "sdpa"
    )  # the kernel ran; the model is given back as it was
    for name, g in grads[False].items():
        assert torch.allclose(g, grads[True][name], atol=0.05, rtol=0.05), name  # bf16

    logp = token_logprobs_and_entropy(policy, traj, 1.0, with_entropy=False)[
        0
    ]  # packed, context left after forward
    with pytest.raises(CheckpointError):
        (logp * real).sum().backward()


def test_auto_picks_the_static_cache_on_a_gpu(tiny_model):
    """--rollout_cache auto on a CUDA device (only its type is read here): static for a bf16 policy
    (LoRA's frozen base) and for float32 weights under bf16 autocast (full training's masters,
    decoded from a bf16 copy); dynamic on the CPU."""
    import warnings
    from types import SimpleNamespace

    from pipeline.rl.rollout import Rollouts

    args = SimpleNamespace(
        max_new_tokens=6, model_max_length=70, temperature=1.0, top_p=1.0, rollout_cache="auto"
    )
    kinds = {}
    for dtype in (torch.bfloat16, torch.float32):
        for device in ("cuda", "cpu"):
            model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
            targs = SimpleNamespace(
                device=torch.device(device),
                bf16=True,
                fp16=False,
                process_index=0,
                world_size=1,
                per_device_train_batch_size=2,
                per_device_eval_batch_size=2,
            )
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # torch.autocast("cuda") on a machine without CUDA warns
                kinds[dtype, device] = Rollouts(
                    model, None, None, None, None, args, targs
                ).cache_kind()
    assert kinds == {
        (torch.bfloat16, "cuda"): "static",
        (torch.float32, "cuda"): "static",
        (torch.bfloat16, "cpu"): "dynamic",
        (torch.float32, "cpu"): "dynamic",
    }


def test_float32_masters_decode_from_a_half_copy_refreshed_before_each_rollout(tiny_model):
    """Full training (float32 weights under bf16 autocast) with the static cache decodes from a bf16
    copy of the weights: its greedy answers are those of the policy cast to bf16, the copy is made
    once, and a change of the masters (an update) reaches the next rollout, in place (a compiled
    decode reads fixed addresses)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from pipeline.data.prompts import Prompt
    from pipeline.rl.rollout import Rollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [
        Prompt([], "", None, tokenizer(t).input_ids)
        for t in ("What color is ka-bo?", "Hello there, who")
    ]
    targs = SimpleNamespace(
        device=torch.device("cpu"),
        bf16=True,
        fp16=False,
        process_index=0,
        world_size=1,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
    )
    args = SimpleNamespace(
        max_new_tokens=6, model_max_length=70, temperature=1.0, top_p=1.0, rollout_cache="static"
    )

    def answers_of(model):
        rollouts = Rollouts(model, None, None, tokenizer, None, args, targs)
        return rollouts, rollouts.generate(prompts, sample=False).responses.tolist()

    def cast_params(model):
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        return model

    torch.manual_seed(0)
    master = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rollouts, answers = answers_of(master)
    assert rollouts.half_copy is not None and next(master.parameters()).dtype == torch.float32
    assert (
        answers
        == answers_of(
            cast_params(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
        )[1]
    )

    copy_weight = rollouts.half_copy.model.lm_head.weight
    address = copy_weight.data_ptr()
    with torch.no_grad():
        for p in master.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # a large update: the greedy answers change
    changed = rollouts.generate(prompts, sample=False).responses.tolist()
    moved = cast_params(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
    moved.load_state_dict({k: v.to(torch.bfloat16) for k, v in master.state_dict().items()})
    assert changed != answers and changed == answers_of(moved)[1]
    assert (
        rollouts.half_copy.model.lm_head.weight is copy_weight and copy_weight.data_ptr() == address
    )
    assert torch.equal(copy_weight, master.lm_head.weight.to(torch.bfloat16))


def test_the_held_out_evaluation_batches_by_per_device_eval_batch_size(tiny_model):
    """--per_device_eval_batch_size sets the evaluation's batches (5 prompts at 2 a batch: 3
    rollouts), not the training batch size."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from pipeline.data.prompts import Prompt
    from pipeline.rl.rollout import Rollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [
        Prompt([], "", "red", tokenizer(f"What color is ka-bo {i}?").input_ids) for i in range(5)
    ]
    args = SimpleNamespace(
        max_new_tokens=3,
        model_max_length=70,
        temperature=1.0,
        top_p=1.0,
        rollout_cache="dynamic",
        reward_func_list=["exact_match"],
    )
    sizes = {}
    for eval_batch in (2, 5):
        targs = SimpleNamespace(
            device=torch.device("cpu"),
            bf16=False,
            fp16=False,
            process_index=0,
            world_size=1,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=eval_batch,
        )
        rollouts = Rollouts(model, None, None, tokenizer, None, args, targs)
        seen, generate = [], rollouts.generate
        rollouts.generate = lambda batch, sample, seen=seen, generate=generate: (
            seen.append(len(batch)) or generate(batch, sample)
        )
        assert rollouts.evaluate(prompts)["eval_samples"] == 5
        sizes[eval_batch] = seen
    assert sizes == {2: [2, 2, 1], 5: [5]}


def test_quantized_weights_decode_as_they_are_not_through_a_half_copy(tiny_model):
    """A policy whose parameters are not plain floating tensors (bitsandbytes' packed 4/8-bit
    weights) keeps decoding from itself: casting packed bytes to bf16 would make numbers of them."""
    from types import SimpleNamespace

    from pipeline.rl.rollout import Rollouts

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    packed = model.model.layers[0].mlp.down_proj
    packed.weight = torch.nn.Parameter(
        torch.zeros(packed.weight.shape, dtype=torch.uint8), requires_grad=False
    )
    targs = SimpleNamespace(
        device=torch.device("cpu"),
        bf16=True,
        fp16=False,
        process_index=0,
        world_size=1,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
    )
    args = SimpleNamespace(
        max_new_tokens=4, model_max_length=70, temperature=1.0, top_p=1.0, rollout_cache="static"
    )
    rollouts = Rollouts(model, None, None, None, None, args, targs)
    assert rollouts.decoder(static=True) is model and rollouts.half_copy is None


def test_rollouts_sample_the_distribution_the_update_scores(tiny_model):
    """The update reads log-probabilities of softmax(logits / temperature): sampling must not
    also apply the model's own generation settings that reshape it (a generation_config.json's
    repetition penalty, min_p, banned words, a minimum length); greedy evaluation keeps them, and
    the model's settings are back after a rollout."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from pipeline.data.prompts import Prompt
    from pipeline.rl.rollout import Rollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    # the model's own settings allow one token only: every other id is a banned word
    allowed = 7
    banned = [[t] for t in range(model.config.vocab_size) if t != allowed]
    model.generation_config.bad_words_ids = banned
    model.generation_config.repetition_penalty = 1.3
    prompts = [Prompt([], "", None, tokenizer("What color is ka-bo?").input_ids)] * 3
    targs = SimpleNamespace(
        device=torch.device("cpu"), bf16=False, fp16=False, process_index=0, world_size=1,
        per_device_train_batch_size=3, per_device_eval_batch_size=3,
    )  # fmt: skip
    args = SimpleNamespace(
        max_new_tokens=8, model_max_length=70, temperature=1.0, top_p=1.0, rollout_cache="dynamic"
    )
    rollouts = Rollouts(model, None, None, tokenizer, None, args, targs)
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])  # transformers never bans a stop
    torch.manual_seed(0)
    sampled = rollouts.generate(prompts, sample=True)
    tokens = set(sampled.responses[sampled.response_mask.bool()].tolist())
    assert tokens - {allowed} - stops  # the banned words were not applied to the rollout
    assert model.generation_config.bad_words_ids == banned
    assert model.generation_config.repetition_penalty == 1.3
    greedy = rollouts.generate(prompts, sample=False)
    assert set(greedy.responses[greedy.response_mask.bool()].tolist()) <= {allowed} | stops


def test_trls_rollouts_get_explicit_neutral_sampling_settings(tiny_model):
    """--rl_engine trl: trl builds the rollout config and transformers fills every unset setting
    from the model's generation_config; the stage hands it explicit neutral values, and refuses a
    model setting that has none (banned words)."""
    from transformers import GenerationConfig

    from pipeline.errors import UserError
    from pipeline.infer.generation import neutral_sampling_kwargs

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.generation_config.repetition_penalty, model.generation_config.min_p = 1.3, 0.2
    kwargs = neutral_sampling_kwargs(model.generation_config, "use --rl_engine own")
    config, _ = model._prepare_generation_config(
        GenerationConfig(do_sample=True, top_k=0, max_new_tokens=4, **kwargs)
    )
    assert config.repetition_penalty == 1.0 and config.min_p == 0.0
    model.generation_config.bad_words_ids = [[5]]
    with pytest.raises(UserError, match="sets bad_words_ids.*use --rl_engine own"):
        neutral_sampling_kwargs(model.generation_config, "use --rl_engine own")
