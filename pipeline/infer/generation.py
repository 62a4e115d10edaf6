"""The one generation path: chat, batch answers, held-out evaluation and the RL rollouts all call
`generate`, so a model answers the same way wherever it is asked.

Answers end at the first stop token (the template's end-of-turn ids in the generation config), which
is kept; everything after it is padding with a zero mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from pipeline.errors import UserError
from pipeline.model.stops import response_mask, stop_ids_of


@dataclass
class Generated:
    """Generated tokens of a batch: (batch, new tokens) tensors, padded after each answer's stop
    token."""

    responses: torch.Tensor
    mask: torch.Tensor  # 1 up to and including the first stop token, 0 after it
    ended: torch.Tensor  # (batch,) bool: a stop token came before the token budget ran out
    nonfinite: bool = (
        False  # some step's logits held NaN/inf (see FiniteLogits); the tokens are not the model's
    )


class NonFiniteLogits(UserError):
    """The model produced NaN/inf logits: its weights or activations are broken (a diverged run,
    fp16 overflow). One sentence for the chat command; the server answers it with a 500."""


class FiniteLogits(LogitsProcessor):
    """Sampling from NaN/inf logits ends in a CUDA device-side assert that kills the process. This
    processor notes such rows on the device (no sync per token) and gives them a flat distribution
    instead, so the generation finishes and the caller decides: `generate` raises NonFiniteLogits,
    the RL loop counts the step."""

    def __init__(self):
        self.seen = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # -inf is a legitimate mask (suppressed tokens); NaN, +inf or a row masked entirely are not
        bad = (
            torch.isnan(scores).any(-1)
            | torch.isposinf(scores).any(-1)
            | torch.isneginf(scores).all(-1)
        )
        self.seen = bad.any() if self.seen is None else self.seen | bad.any()
        return torch.where(bad[:, None], torch.zeros_like(scores), scores)


def sampling_config(
    base: GenerationConfig,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
) -> GenerationConfig:
    """`base` (stop and pad ids) with a token budget; temperature 0 is greedy decoding."""
    config = GenerationConfig.from_dict(base.to_dict())
    sample = temperature > 0
    config.update(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        use_cache=True,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=(config.top_k if top_k is None else top_k) if sample else None,
    )
    return config


# generation settings that reshape the sampling distribution beyond temperature and top-p: a
# model's generation_config.json often sets some (Qwen2.5: repetition_penalty 1.05)
RESHAPING = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "min_p", "top_h", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
    "min_length", "min_new_tokens", "guidance_scale", "watermarking_config", "num_beams",
    "num_beam_groups", "diversity_penalty", "penalty_alpha", "dola_layers", "constraints",
    "force_words_ids",
)  # fmt: skip


# explicit values of the RESHAPING settings that leave the distribution as it is, for a
# generation config handed to another library's trainer (trl's GRPO/RLOO): transformers would fill
# an unset one from the model's generation_config
NEUTRAL = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "min_length": 0, "min_new_tokens": 0, "guidance_scale": 1.0,
    "num_beams": 1, "num_beam_groups": 1, "diversity_penalty": 0.0,
}  # fmt: skip


def neutral_sampling_kwargs(own: GenerationConfig, where: str) -> dict:
    """NEUTRAL, for a model whose generation_config sets no reshaping setting without a neutral
    value (banned words, forced tokens, ...): those are refused, naming `where` to turn to."""
    unset = [n for n in RESHAPING if n not in NEUTRAL and getattr(own, n, None) not in (None, [])]
    if unset:
        raise UserError(
            f"the model's generation_config.json sets {', '.join(unset)}, which would reshape "
            "the rollouts' sampling away from the distribution the update scores; "
            f"{where}, or remove them from generation_config.json for the RL run"
        )
    return dict(NEUTRAL)


@contextmanager
def plain_sampling(model, config: GenerationConfig) -> Iterator[None]:
    """RL rollouts: sample from softmax(logits / temperature) (and the top-p the flags give), the
    distribution whose log-probabilities the update reads. The RESHAPING settings are cleared in
    `config` and, while generating, in the model's own generation_config, which transformers
    reads for every setting a config leaves unset; they come back afterwards."""
    owner = getattr(model, "module", model)  # a DeepSpeed engine's model
    owner = owner.get_base_model() if hasattr(owner, "get_base_model") else owner  # PEFT's
    own = owner.generation_config
    kept = {name: getattr(own, name, None) for name in RESHAPING}
    for name in RESHAPING:
        setattr(config, name, None)
        setattr(own, name, None)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(own, name, value)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    allow_nonfinite: bool = False,
    **kwargs,
) -> Generated:
    """Continue left-padded prompts; `kwargs` go to `model.generate` (a streamer, stopping
    criteria).

    NaN/inf logits raise NonFiniteLogits, unless `allow_nonfinite` (then `Generated.nonfinite` says
    so)."""
    guard = FiniteLogits()
    processors = LogitsProcessorList([guard, *kwargs.pop("logits_processor", [])])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        logits_processor=processors,
        **kwargs,
    )
    nonfinite = bool(guard.seen is not None and guard.seen.item())
    if nonfinite and not allow_nonfinite:
        raise NonFiniteLogits(
            "the model produced NaN/inf logits while generating: "
            "its weights or activations are not "
            "finite (a diverged training run, or fp16 overflow: try bfloat16 or float32)"
        )
    responses = out[:, input_ids.shape[1] :]
    mask, ended = response_mask(responses, stop_ids_of(config))
    return Generated(
        torch.where(mask.bool(), responses, config.pad_token_id), mask, ended, nonfinite
    )
