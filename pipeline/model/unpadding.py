"""Padding-free forward passes for the pair stages (RM, DPO and its relatives).

Their batches arrive padded (chosen and rejected sequences of every pair, one row each), because the
losses read one value per row. Here the model never sees the padding: the rows' real tokens are laid end to
end in one sequence whose `position_ids` restart at 0 at every row, no attention mask is sent (so the varlen
kernel of model/attention.py, or transformers' block-diagonal mask from the position ids, keeps the rows
apart), and the per-token outputs are put back into the padded layout the losses expect. What a row
computes is unchanged; only the pad tokens' work is gone.

Each stage installs the wrapper on the model instance (`forward` replaced, as trl's fused LM head does), so
calls still pass through DDP, DeepSpeed and PEFT wrappers on their way to it.
"""

from __future__ import annotations

import functools
import types

import torch

from pipeline.data.masking import IGNORE_INDEX


def flatten(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (1, tokens), position_ids (1, tokens), keep (rows, width) bool) of a padded batch: every row's
    attended tokens in order, positions counting from 0 in each row. Rows must be contiguous (left or right
    padding)."""
    keep = attention_mask.bool()
    positions = (keep.long().cumsum(1) - 1)[keep]
    return input_ids[keep].unsqueeze(0), positions.unsqueeze(0), keep


def restore(flat: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The padded layout (rows, width, ...) of per-token values of a flattened batch (1, tokens, ...); zeros at
    pads."""
    out = flat.new_zeros(keep.shape + flat.shape[2:])
    out[keep] = flat[0]
    return out


LM_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def unpadded_log_probs(model: torch.nn.Module) -> None:
    """Make `model(input_ids, attention_mask, labels=..., fused_lm_head=True)` (trl's fused LM head, already
    installed) run padding-free. Its per-token fields are shifted by one (position t scores token t+1), so
    each row's last position, which in the flat sequence would score the next row's first token, is
    cleared, and the padded layout is rebuilt with the same shift."""
    inner = model.forward

    @functools.wraps(inner)
    def forward(self, *args, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        if not fused_lm_head or attention_mask is None or args or kwargs.get("inputs_embeds") is not None:
            return inner(*args, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                         fused_lm_head=fused_lm_head, **kwargs)
        ids, positions, keep = flatten(input_ids, attention_mask)
        flat_labels = labels[keep].unsqueeze(0).clone()
        flat_labels[positions == 0] = IGNORE_INDEX  # never scored from the row before
        out = inner(input_ids=ids, position_ids=positions, labels=flat_labels, fused_lm_head=True, **kwargs)
        for name in LM_FIELDS:
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor) and value.dim() == 2:  # (1, tokens - 1)
                padded = torch.cat([value, value.new_zeros((1, 1))], dim=1)
                setattr(out, name, restore(padded, keep)[:, :-1])
        return out

    model.forward = types.MethodType(forward, model)


def unpadded_scores(model: torch.nn.Module) -> None:
    """Make a sequence classifier's `model(input_ids, attention_mask, unpad=True)` (the reward model) run
    padding-free: the backbone reads the flattened rows and the score head only the token transformers'
    own classifier pools, each row's last one that is not the pad id."""
    if not isinstance(getattr(model, "score", None), torch.nn.Module):
        from pipeline.errors import UserError

        raise UserError(f"{type(model).__name__} has no `score` head to read packed rows through; add --packing False.")
    inner = model.forward

    @functools.wraps(inner)
    def forward(self, *args, input_ids=None, attention_mask=None, unpad=False, **kwargs):
        if not unpad or attention_mask is None or args:
            return inner(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        ids, positions, keep = flatten(input_ids, attention_mask)
        backbone = getattr(self, self.base_model_prefix)
        hidden = backbone(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        pad_id = self.config.get_text_config().pad_token_id
        width = torch.arange(input_ids.shape[1], device=input_ids.device)
        pooled = (width * (input_ids != pad_id).int()).argmax(-1) if pad_id is not None else keep.sum(1) - 1
        # flat index of row r's pooled token: the tokens of the rows before it, plus its place in its row
        before = torch.cat([keep.sum(1).new_zeros(1), keep.sum(1).cumsum(0)[:-1]])
        first = keep.int().argmax(1)  # left padding: a row's tokens start after its pads
        scores = self.score(hidden[0, before + pooled - first])
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        return SequenceClassifierOutputWithPast(logits=scores)

    model.forward = types.MethodType(forward, model)
