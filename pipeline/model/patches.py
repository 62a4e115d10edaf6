"""Every place the project changes a library's behaviour at run time, each named, logged once per
process (`announce`) and tested. Where a library offers an extension point the project uses that
instead (attention: transformers' AttentionInterface, pipeline/model/attention.py; training steps:
Trainer subclasses).

    unpadded_log_probs          RM/DPO --packing: the policy's `forward` (under trl's fused LM head)
                                reads a padded batch as one padding-free sequence and answers in the
                                padded layout
    unpadded_scores             the same for the reward model's score head
    separate_zero3_step_counts  DeepSpeed 0.19's ZeRO-3 universal-checkpoint load: one Adam step
                                count per parameter group, not one shared tensor
                                (tests/test_zero_resume.py)
    keep_checkpointing_choices  trl's DPO and KTO trainers pause gradient checkpointing for the
                                reference forward and turn it back on for every layer, with
                                --gradient_checkpointing_kwargs sent to torch's checkpoint (which
                                refuses every_n_layers and offload); each layer gets back its own
                                setting instead (tests/test_checkpointing_options.py)
    adapters_off_for_reference  trl's DPO and KTO reference forwards of a plain LoRA policy switch
                                its layers off directly, not through peft's walk over the whole
                                model twice a step (tests/test_reference_adapter.py)

The forward swaps replace `forward` on one model instance (as trl's fused LM head does), so DDP,
DeepSpeed and PEFT wrappers still reach it; the DeepSpeed one replaces a method of DeepSpeed's
ZeRO-3 optimizer class, once; the checkpointing and adapter ones replace helpers trl's DPO and KTO
modules import, once.
"""

from __future__ import annotations

import functools
import logging
import types
import weakref
from contextlib import contextmanager

import torch

from pipeline.data.masking import IGNORE_INDEX
from pipeline.errors import UserError
from pipeline.model.adapters import adapters_off
from pipeline.model.unpadding import flatten, keeps_rows_apart, packing_refused, restore

logger = logging.getLogger(__name__)
PATCHES = (
    "unpadded_log_probs",
    "unpadded_scores",
    "separate_zero3_step_counts",
    "keep_checkpointing_choices",
    "adapters_off_for_reference",
)
_announced: set[str] = set()


def announce(name: str, what: str) -> None:
    """One log line per patch and process, the first time it is applied."""
    if name not in _announced:
        _announced.add(name)
        logger.info("patch %s applied: %s", name, what)


LM_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def unpadded_log_probs(model: torch.nn.Module) -> None:
    """Make `model(input_ids, attention_mask, labels=..., fused_lm_head=True)` (trl's fused LM head,
    already installed) run padding-free. Its per-token fields are shifted by one (position t scores
    token t+1), so each row's last position, which in the flat sequence would score the next row's
    first token, is cleared, and the padded layout is rebuilt with the same shift."""
    inner = model.forward

    @functools.wraps(inner)
    def forward(
        self, *args, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs
    ):
        if (
            not fused_lm_head
            or attention_mask is None
            or args
            or kwargs.get("inputs_embeds") is not None
        ):
            return inner(
                *args,
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                fused_lm_head=fused_lm_head,
                **kwargs,
            )
        if not keeps_rows_apart(
            self, lambda i, p, b: inner(input_ids=i, position_ids=p, use_cache=False, **b).logits
        ):
            raise UserError(packing_refused(self))
        flat = flatten(input_ids, attention_mask)
        # a row's first token is never scored from the row before it
        flat_labels = labels.flatten()[flat.index].unsqueeze(0)
        flat_labels = flat_labels.masked_fill(flat.positions == 0, IGNORE_INDEX)
        out = inner(
            input_ids=flat.ids,
            position_ids=flat.positions,
            labels=flat_labels,
            fused_lm_head=True,
            **flat.bounds,
            **kwargs,
        )
        for name in LM_FIELDS:
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor) and value.dim() == 2:  # (1, tokens - 1)
                padded = torch.cat([value, value.new_zeros((1, 1))], dim=1)
                setattr(out, name, restore(padded, flat)[:, :-1])
        return out

    model.forward = types.MethodType(forward, model)
    announce(
        "unpadded_log_probs",
        "the policy's forward (and the reference's) runs each step's rows padding-free",
    )


def unpadded_scores(model: torch.nn.Module) -> None:
    """Make a sequence classifier's `model(input_ids, attention_mask, unpad=True)` (the reward
    model) run padding-free: the backbone reads the flattened rows and the score head only the token
    transformers' own classifier pools, each row's last one that is not the pad id."""
    if not isinstance(getattr(model, "score", None), torch.nn.Module):
        raise UserError(
            f"{type(model).__name__} has no `score` head to read packed rows through; "
            "add --packing False."
        )
    inner = model.forward

    @functools.wraps(inner)
    def forward(self, *args, input_ids=None, attention_mask=None, unpad=False, **kwargs):
        if not unpad or attention_mask is None or args:
            return inner(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        backbone = getattr(self, self.base_model_prefix)
        if not keeps_rows_apart(
            self,
            lambda i, p, b: (
                backbone(input_ids=i, position_ids=p, use_cache=False, **b).last_hidden_state
            ),
        ):
            raise UserError(packing_refused(self))
        flat = flatten(input_ids, attention_mask)
        keep = flat.keep
        hidden = backbone(
            input_ids=flat.ids, position_ids=flat.positions, use_cache=False, **flat.bounds
        ).last_hidden_state
        pad_id = self.config.get_text_config().pad_token_id
        width = torch.arange(input_ids.shape[1], device=input_ids.device)
        pooled = (
            (width * (input_ids != pad_id).int()).argmax(-1)
            if pad_id is not None
            else keep.sum(1) - 1
        )
        # flat index of row r's pooled token: the tokens of the rows before it, plus its place in
        # its row
        before = torch.cat([keep.sum(1).new_zeros(1), keep.sum(1).cumsum(0)[:-1]])
        first = keep.int().argmax(1)  # left padding: a row's tokens start after its pads
        scores = self.score(hidden[0, before + pooled - first])
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        return SequenceClassifierOutputWithPast(logits=scores)

    model.forward = types.MethodType(forward, model)
    announce("unpadded_scores", "the reward model's forward runs each step's rows padding-free")


def separate_zero3_step_counts() -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load hands every parameter group one shared Adam `step`
    tensor, which each group's optimizer step then advances in place: the bias correction runs ahead
    and the resumed run drifts (tests/test_zero_resume.py: 1.7e-4 off the uninterrupted weights,
    1.2e-7 with this). After that load each group gets its own copy."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    load = Stage3._load_universal_checkpoint
    if getattr(load, "separates_steps", False):
        return

    def load_then_separate(self, *args, **kwargs):
        load(self, *args, **kwargs)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    load_then_separate.separates_steps = True
    Stage3._load_universal_checkpoint = load_then_separate
    announce(
        "separate_zero3_step_counts",
        "DeepSpeed's ZeRO-3 universal checkpoint load: each parameter group keeps "
        "its own Adam step count (DeepSpeed 0.19 hands them one shared tensor)",
    )


_CHECKPOINTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def paused_checkpointing(model, gradient_checkpointing_kwargs=None):
    """Gradient checkpointing off for the modules that have it on, and back on for those only (the
    modules that have the switch are listed once per model, not walked at every step)."""
    if model not in _CHECKPOINTED:
        _CHECKPOINTED[model] = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    paused = [m for m in _CHECKPOINTED[model] if m.gradient_checkpointing is True]
    for module in paused:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in paused:
            module.gradient_checkpointing = True


def keep_checkpointing_choices() -> None:
    """trl's DPO and KTO trainers run the reference forward inside their
    `disable_gradient_checkpointing(model, kwargs)`, which ends with
    `model.gradient_checkpointing_enable(kwargs)`: every layer checkpointed again, and transformers'
    own options (`every_n_layers`, `offload`) handed to torch's checkpoint, which stops the run at
    the second step. Both modules get `paused_checkpointing` instead."""
    import trl.trainer.dpo_trainer as dpo
    import trl.trainer.kto_trainer as kto

    for module in (dpo, kto):
        module.disable_gradient_checkpointing = paused_checkpointing
    announce(
        "keep_checkpointing_choices",
        "trl's DPO/KTO reference forwards pause gradient checkpointing and give each layer back "
        "its own setting",
    )


def adapters_off_for_reference() -> None:
    """trl's DPO and KTO trainers compute the reference log-probs of a LoRA policy inside
    `use_adapter(model, None)`, peft's `disable_adapter()`: a walk over every module and weight at
    each call, twice a step (~11% of a 1B DPO step's host time on an H200); `adapters_off`
    (pipeline/model/adapters.py) sets a plain LoRA model's layer switches directly instead."""
    import trl.trainer.dpo_trainer as dpo
    import trl.trainer.kto_trainer as kto

    original = dpo.use_adapter

    @contextmanager
    def use_adapter(model, adapter_name):
        with original(model, adapter_name) if adapter_name is not None else adapters_off(model):
            yield

    use_adapter.replaces = original
    for module in (dpo, kto):
        if not hasattr(module.use_adapter, "replaces"):
            module.use_adapter = use_adapter
    announce(
        "adapters_off_for_reference",
        "trl's DPO/KTO reference forwards of a plain LoRA policy switch its layers off directly",
    )
