"""Stop tokens, in one place: the ids that end an assistant turn under a chat template.

A stage that trains a chat model writes them into the model's generation config
(`set_generation_stops`), so the saved folder stops where its template ends a turn; everything that
generates reads them back from there (`stop_ids_of`): chat, serving, held-out evaluation and the RL
rollouts, which cut each answer after its first stop (`response_mask`). Inference on a folder may
add a template's own (`with_template_stops`: a base model that stops on EOS only, chatted with under
--template_name).
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig


def template_stop_ids(tokenizer, stops: list[str]) -> list[int]:
    """The ids of a template's stop strings that the tokenizer has, or its EOS when it has none of
    them."""
    vocab = tokenizer.get_vocab()
    return [vocab[s] for s in stops if s in vocab] or [tokenizer.eos_token_id]


def set_generation_stops(model, stop_ids: list[int], pad_token_id: int) -> None:
    """Make generation stop on the template's end-of-turn tokens (saved in
    generation_config.json)."""
    from pipeline.model.adapters import (
        unwrap,  # peft: imported by training, not by chat and serving
    )

    config = unwrap(model).generation_config
    config.eos_token_id = stop_ids
    config.pad_token_id = pad_token_id


def stop_ids_of(config: GenerationConfig) -> list[int]:
    ids = config.eos_token_id
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def with_template_stops(config: GenerationConfig, tokenizer, stops: list[str]) -> list[int]:
    """A folder's stop ids plus those of the template it is chatted with (a base model stops on EOS
    only)."""
    vocab = tokenizer.get_vocab()
    ids = [*stop_ids_of(config), *(vocab[s] for s in stops if s in vocab)]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids or [tokenizer.eos_token_id]


def response_mask(
    responses: torch.Tensor, stop_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask: 1 up to and including the first stop token, ended: whether a stop token came) of
    generated ids."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    ended = is_stop.any(1)
    first = torch.where(
        ended,
        is_stop.float().argmax(1),
        torch.full_like(ended, responses.shape[1], dtype=torch.long),
    )
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions[None] <= first[:, None]).long(), ended
