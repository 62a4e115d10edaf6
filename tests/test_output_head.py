"""The losses that apply the output head themselves (PT/SFT's chunked loss, PPO's log-probabilities)
train the logits the model serves: its logit transform after the head (Gemma 2's soft cap, Cohere's
scale, Granite's scaling) is applied, a mixture of experts' router loss is added as the model's own
forward adds it, an unknown transform is refused, and the final states are read without keeping
every layer's (which accelerate's mixed precision copies to float32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM as Auto
from transformers import (
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    TrainingArguments,
)

from pipeline.errors import UserError
from pipeline.model.head import check_head, final_hidden, output_head
from pipeline.rl import ppo_math
from pipeline.rl.rollout import token_logprobs_and_entropy
from pipeline.train.causal_lm import CausalLMTrainer
from pipeline.train.losses import causal_lm_loss_sum

SHAPE = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    initializer_range=0.5,  # logits large enough for a soft cap or a scale to matter
)
TRANSFORMED = {
    "gemma2 soft cap": lambda: Gemma2Config(**SHAPE, final_logit_softcapping=0.5),
    "cohere logit scale": lambda: CohereConfig(**SHAPE, logit_scale=4.0),
    "granite logits scaling": lambda: GraniteConfig(**SHAPE, logits_scaling=0.25),
}


def batch(vocab, rows=2, length=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    return ids, labels


def model_of(config):
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    return Auto.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("family", sorted(TRANSFORMED))
def test_chunked_loss_equals_the_models_own_loss(family):
    model = model_of(TRANSFORMED[family]())
    ids, labels = batch(model.config.vocab_size)
    want = model(input_ids=ids, labels=labels).loss
    hidden, outputs = final_hidden(model, input_ids=ids)
    loss_sum, count = causal_lm_loss_sum(hidden, labels, output_head(model), chunk_size=5)
    assert torch.allclose(loss_sum / count, want, atol=1e-5), (loss_sum / count, want)
    # without the transform the loss is another one: the test sees the transform
    plain_sum, _ = causal_lm_loss_sum(hidden, labels, model.get_output_embeddings())
    assert (plain_sum / count - want).abs() > 1e-2


@pytest.mark.parametrize("family", sorted(TRANSFORMED))
def test_ppo_log_probabilities_read_the_transformed_logits(family):
    from tests.test_ppo_lean import full_logits, trajectory

    model = model_of(TRANSFORMED[family]())
    traj = trajectory(model.config.vocab_size)
    want = ppo_math.token_logprobs(full_logits(model, traj), traj.responses, 0.7)
    logp, _ = token_logprobs_and_entropy(model, traj, 0.7, with_entropy=False, packed=False)
    real = traj.response_mask.bool()
    assert torch.allclose(logp[real], want[real], atol=1e-5)


class ScaledAfterHead(LlamaForCausalLM):
    """A model whose own code scales its logits after the head, read from no config field the
    project knows (as a model's remote code may)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


def test_an_unknown_transform_after_the_head_is_refused(tmp_path):
    config = LlamaConfig(**SHAPE)
    torch.manual_seed(0)
    model = ScaledAfterHead(config)
    ids, _ = batch(config.vocab_size)
    with pytest.raises(UserError, match="not its output head applied"):
        check_head(model, ids, output_head(model))
    plain = LlamaForCausalLM(config)
    check_head(plain, ids, output_head(plain))  # a model whose logits are its head's passes
    assert plain.training  # and is left in the mode it was in


def trainer_for(model, tmp_path, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)
    return CausalLMTrainer(model=model, args=args)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_router_loss_is_weighted_as_the_models_own_forward_weighs_it(tmp_path, accumulation):
    """A mixture of experts' router loss joins the training loss with the config's coefficient,
    once per optimizer step whatever the accumulation steps; the evaluation loss is the language
    model's alone (its perplexity)."""
    config = MixtralConfig(
        **SHAPE, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True
    )
    config.router_aux_loss_coef = 0.5
    model = model_of(config)
    ids, labels = batch(config.vocab_size)
    mask = torch.ones_like(ids)
    want = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert want.aux_loss > 0
    language = want.loss - 0.5 * want.aux_loss  # the model's own loss holds coefficient x aux
    trainer = trainer_for(model, tmp_path, gradient_accumulation_steps=accumulation)
    count = (labels[:, 1:] != -100).sum()
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=count)
    assert torch.allclose(loss, language + 0.5 * want.aux_loss / accumulation, atol=1e-5)
    assert torch.allclose(trainer.compute_loss(model, inputs), language, atol=1e-5)


def test_jetmoe_names_its_router_coefficient_otherwise(tmp_path):
    from transformers import JetMoeConfig

    config = JetMoeConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
        kv_channels=8, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        output_router_logits=True, aux_loss_coef=0.5,
    )  # fmt: skip
    model = model_of(config)
    ids, labels = batch(config.vocab_size)
    want = model(input_ids=ids, labels=labels)
    count = (labels[:, 1:] != -100).sum()
    loss = trainer_for(model, tmp_path).compute_loss(
        model, {"input_ids": ids, "labels": labels}, num_items_in_batch=count
    )
    assert torch.allclose(loss, want.loss, atol=1e-5), (loss, want.loss)


def test_llama4_text_models_read_their_decoder():
    from transformers import Llama4TextConfig

    model = model_of(Llama4TextConfig(**SHAPE, num_local_experts=2))
    ids, labels = batch(model.config.vocab_size)
    hidden, _ = final_hidden(model, input_ids=ids)
    loss_sum, count = causal_lm_loss_sum(hidden, labels, output_head(model))
    assert torch.allclose(loss_sum / count, model(input_ids=ids, labels=labels).loss, atol=1e-5)


def test_a_diverged_model_is_left_to_the_runs_own_non_finite_handling():
    model = model_of(LlamaConfig(**SHAPE))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    ids, _ = batch(model.config.vocab_size)
    check_head(model, ids, output_head(model))  # no "unknown transform" sentence


def test_mixed_precision_keeps_no_float32_copy_of_every_layers_states(tmp_path):
    model = model_of(LlamaConfig(**SHAPE))
    trainer = trainer_for(model, tmp_path, bf16=True)
    prepared = trainer.accelerator.prepare_model(model)
    ids, labels = batch(model.config.vocab_size)
    loss, outputs = trainer.compute_loss(
        prepared, {"input_ids": ids, "labels": labels}, return_outputs=True, num_items_in_batch=10
    )
    assert torch.isfinite(loss)
    # accelerate's wrapper casts what the forward returns to float32: one position's logits only
    assert outputs.hidden_states is None
    assert outputs.logits.shape[1] == 1 and outputs.logits.dtype == torch.float32
