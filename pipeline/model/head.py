"""The model's last hidden states and its output head, for the losses that apply the head
themselves, a chunk of positions at a time (PT and SFT's loss, PPO's log-probabilities), so that
[tokens, vocabulary] logits never exist.

Two things the model's own forward does that such a loss must do too:
- read the decoder's final states, not every layer's: `output_hidden_states=True` keeps them all
  in the outputs, where accelerate's mixed-precision wrapper casts each to float32 (4 GiB on an 8B
  model at 8k tokens a step, and the copies' time);
- transform the head's logits as the model does after it: Gemma 2's soft cap, Cohere's logit scale,
  Granite's logits scaling. A loss that skips it trains other logits than the model serves with.
"""

from __future__ import annotations

import weakref

import torch

from pipeline.errors import UserError

_CHECKED: weakref.WeakSet = weakref.WeakSet()  # the models check_head has passed


def final_hidden(model, **inputs) -> tuple[torch.Tensor, object]:
    """(the decoder's output: the states the output head reads, the model's own outputs) from one
    forward that computes one position's logits. The states are read by a hook on the decoder,
    whatever wraps the model (PEFT, DDP, DeepSpeed)."""
    from pipeline.model.adapters import unwrap

    base = unwrap(getattr(model, "module", model))
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    for name in (getattr(base, "base_model_prefix", ""), "model", "transformer"):
        if isinstance(decoder, torch.nn.Module) and decoder is not base:
            break
        decoder = getattr(base, name, None)  # e.g. Llama 4's text model: its prefix names no module
    if not isinstance(decoder, torch.nn.Module) or decoder is base:
        raise UserError(
            f"{type(base).__name__} has no decoder module under its output head; the project's "
            "loss reads the decoder's final states."
        )
    seen: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda _m, _a, out: seen.append(out[0]))
    try:
        outputs = model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return seen[-1], outputs


def logit_transform(config) -> tuple[float | None, float]:
    """(soft cap, scale) the model applies to its head's logits, read from the config fields the
    transformers models read: logits -> cap * tanh(scale * logits / cap)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = text.logits_scaling
        scale = scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / scaling
    return (cap or None), (1.0 if scale is None else float(scale))


class OutputHead(torch.nn.Module):
    """The model's output head with its logit transform: what the chunked losses call on a chunk
    of final states. `linear` stays the model's own module (its hooks, its LoRA or sharding)."""

    def __init__(self, linear: torch.nn.Module, cap: float | None, scale: float):
        super().__init__()
        self.linear, self.cap, self.scale = linear, cap, scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap is not None:
            logits = self.cap * torch.tanh(logits / self.cap)
        return logits


def output_head(model) -> torch.nn.Module:
    """The head a chunked loss applies: the model's own when its logits are the head's, else the
    head wrapped in the model's transform."""
    from pipeline.model.adapters import unwrap

    base = unwrap(getattr(model, "module", model))
    linear = base.get_output_embeddings()
    cap, scale = logit_transform(base.config)
    return linear if cap is None and scale == 1.0 else OutputHead(linear, cap, scale)


@torch.no_grad()
def check_head(model, input_ids: torch.Tensor, head: torch.nn.Module) -> None:
    """Once per model: refuse a model whose logits are not its head applied to its decoder's final
    states (a transform after the head this project does not know, e.g. in a model's own remote
    code): a chunked loss would train other logits than the model serves with. One forward of a
    few tokens, the model in eval mode (no dropout) for it."""
    from pipeline.model.adapters import unwrap

    base = unwrap(getattr(model, "module", model))
    if base in _CHECKED:
        return
    ids = input_ids[:1, :16]
    was_training = model.training
    model.eval()
    try:
        hidden, _ = final_hidden(model, input_ids=ids)
        served = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    ours = head(hidden.to(served.device)).float()
    if not (torch.isfinite(served).all() and torch.isfinite(ours).all()):
        return  # a diverged model: the run's own non-finite handling speaks; checked next time
    gap = (ours - served).abs().max().item()
    if not gap <= 2e-2 * served.abs().max().item() + 1e-3:
        name = type(getattr(model, "module", model)).__name__
        raise UserError(
            f"{name}'s logits are not its output head applied to its final hidden states "
            f"(largest difference {gap:.3g}): it transforms them in a way this project's loss "
            "does not reproduce, and training would change other logits than it serves with."
        )
    _CHECKED.add(base)
