"""The four models of PPO: policy, reference, value model and reward model, with as few copies as
possible.

Policy: --model_name_or_path, full / LoRA / QLoRA. Reference: with LoRA the policy with its adapter
off (AdapterOff, pipeline/rl/frozen.py), otherwise a frozen copy (Separate). Value model:
initialized from the reward model (LoRA on it when --use_peft, whose adapter-off form is then also
the reward model: one copy of its weights; otherwise the reward model is a Separate frozen copy).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from pipeline.args import trainable_dtype
from pipeline.model.adapters import unwrap
from pipeline.model.integrity import check_folder_whole
from pipeline.model.loading import check_loaded_weights, load_model
from pipeline.rl.frozen import AdapterOff, Frozen, Separate, own_weights
from pipeline.rl.rewards import check_same_vocab, reward_model_folder


def head_dtype(head: torch.nn.Module) -> torch.dtype:
    """The dtype a head computes in: that of its trained weights (under LoRA peft's float32 copy of
    the score head, which sits beside the frozen original), else its own."""
    params = list(head.parameters())
    return next((p.dtype for p in params if p.requires_grad), params[0].dtype)


class ValueModel(torch.nn.Module):
    """Per-token values from a sequence classifier: its backbone's hidden states through its score
    head.

    The head is trained (float32 masters) while a LoRA backbone may be frozen float16: the head
    reads the states cast to its own dtype, outside autocast, so the values never depend on an
    autocast scope (without one a float16 backbone met the float32 head: "Half != float"); one
    [hidden x 1] product, so float32 costs nothing."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        base = unwrap(classifier)
        self.backbone, self.score = getattr(base, base.base_model_prefix), base.score
        self.head_dtype = head_dtype(self.score)

    def states(self, input_ids, attention_mask, position_ids, **bounds) -> torch.Tensor:
        # no cache: without one, rows laid end to end (no attention mask) attend within their own
        # row; `bounds`: the rows' cumulative starts for the varlen kernel (model/unpadding.py)
        return self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **bounds,
        ).last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return self.score(hidden.to(self.head_dtype)).squeeze(-1).float()

    def forward(self, input_ids, attention_mask, position_ids, keep_from: int = 0):
        """Values of the positions from `keep_from` on (the answer's states); the others are not
        scored."""
        return self.head(self.states(input_ids, attention_mask, position_ids)[:, keep_from:])


@dataclass
class PPOModels:
    policy: torch.nn.Module
    reference: (
        Frozen | None
    )  # None: no reference (a group algorithm with --kl_coef 0 under full training)
    value_model: (
        torch.nn.Module | None
    )  # the sequence classifier the values are read from (None: GRPO and relatives)
    reward: Frozen | None  # None: rule rewards only
    reward_tokenizer: object


def _policy_and_reference(
    model_args, peft_args, ppo_args, training_args, tokenizer, with_reference: bool
):
    """The trained policy and its reference: with LoRA the policy with its adapter off (no extra
    weights, so always there), for full training when asked a frozen copy."""
    policy = load_model(
        model_args,
        peft_args,
        tokenizer,
        head="lm",
        gradient_checkpointing=training_args.gradient_checkpointing,
        max_length=ppo_args.model_max_length,
        trainable_dtype=trainable_dtype(training_args),
    )
    if peft_args.use_peft:
        return policy, AdapterOff(policy)
    if with_reference:
        return policy, Separate(
            load_model(model_args, peft_args, tokenizer, head="lm").eval().requires_grad_(False)
        )
    return policy, None


def reward_folder(
    ppo_args, training_args, tokenizer, same_vocab: bool = True
) -> tuple[str, object]:
    """(the reward model's folder, adapters merged once; its tokenizer, checked to share the
    policy's vocabulary)."""
    rm_path = reward_model_folder(
        ppo_args.reward_model_name_or_path, training_args.output_dir, training_args.should_save
    )
    check_folder_whole(rm_path, "--reward_model_name_or_path")
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
    if same_vocab:
        # PPO's value model starts from the RM; scoring alone re-tokenizes the text with the RM's
        # tokenizer
        check_same_vocab(tokenizer, rm_tokenizer)
    return rm_path, rm_tokenizer


def frozen_reward_model(rm_path: str, dtype: torch.dtype):
    """The reward model, frozen; refused when its score head would start random (a language model's
    folder)."""
    model, info = AutoModelForSequenceClassification.from_pretrained(
        rm_path, dtype=dtype, output_loading_info=True
    )
    check_loaded_weights(rm_path, model.config, "reward", info["missing_keys"], new_head=False)
    return model.eval().requires_grad_(False)


def _placed(models: PPOModels, device) -> PPOModels:
    for model in (
        models.policy,
        own_weights(models.reference),
        models.value_model,
        own_weights(models.reward),
    ):
        # quantized weights were placed at load time; ZeRO-3 weights are built sharded (and placed)
        # by DeepSpeed
        if model is not None and not is_quantized(model) and not is_deepspeed_zero3_enabled():
            model.to(device)
    return models


def build_models(model_args, peft_args, ppo_args, training_args, tokenizer) -> PPOModels:
    policy, reference = _policy_and_reference(
        model_args, peft_args, ppo_args, training_args, tokenizer, True
    )
    rm_path, rm_tokenizer = reward_folder(ppo_args, training_args, tokenizer)
    rm_args = replace(model_args, model_name_or_path=rm_path, tokenizer_name_or_path=rm_path)
    value = load_model(
        rm_args,
        replace(peft_args, peft_path=None, modules_to_save=None),
        rm_tokenizer,
        head="reward",
        gradient_checkpointing=training_args.gradient_checkpointing,
        trainable_dtype=trainable_dtype(training_args),
    )
    reward = (
        AdapterOff(value)
        if peft_args.use_peft
        else Separate(frozen_reward_model(rm_path, value.dtype))
    )
    return _placed(PPOModels(policy, reference, value, reward, rm_tokenizer), training_args.device)


def build_group_models(model_args, peft_args, ppo_args, training_args, tokenizer) -> PPOModels:
    """GRPO and its relatives: the policy, a reference (with LoRA the policy with its adapter off;
    for full training a copy only for a KL penalty), the reward model only when --reward_funcs names
    it; no value model."""
    policy, reference = _policy_and_reference(
        model_args, peft_args, ppo_args, training_args, tokenizer, ppo_args.kl_coef > 0
    )
    reward = rm_tokenizer = None
    if "model" in ppo_args.reward_func_list:
        rm_path, rm_tokenizer = reward_folder(ppo_args, training_args, tokenizer, same_vocab=False)
        reward = Separate(frozen_reward_model(rm_path, unwrap(policy).dtype))
    return _placed(PPOModels(policy, reference, None, reward, rm_tokenizer), training_args.device)


def is_quantized(model) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def prepare_for_rl(model, gradient_checkpointing: bool, options: dict | None = None) -> None:
    """Dropout off (the sampled and the trained distributions must agree); checkpointing as the
    Trainer would, with the user's --gradient_checkpointing_kwargs (`options`: every_n_layers,
    offload, and torch's own checkpoint arguments)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if gradient_checkpointing:
        options = {"use_reentrant": False, **(options or {})}
        placement = {
            "every_n_layers": options.pop("every_n_layers", 1),
            "offload": options.pop("offload", False),
        }
        # newer transformers name it activation_checkpointing_enable; 5.17 (the floor) has only the
        # old name
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=options, **placement)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **placement)
