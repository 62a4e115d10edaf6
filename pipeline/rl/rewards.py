"""Rewards for the RL stages: the one reward-model scorer, rule rewards, and finding the reward
model.

`RewardScorer` reads a reward model (AutoModelForSequenceClassification, one logit) at the last
token of each whole conversation, rendered as the RM stage trained it; PPO, GRPO/RLOO and the
evaluation helpers all score through it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.data.prompts import Prompt, render_text
from pipeline.errors import UserError
from pipeline.model.integrity import check_folder_whole, read_json_file
from pipeline.model.merge import merge_adapter
from pipeline.rl.frozen import AdapterOff, Frozen, Separate

logger = logging.getLogger(__name__)


class RewardScorer:
    """Scores of rendered conversations by the reward model (pipeline/rl/frozen.py: its own weights,
    or the value model with its adapter off): right-padded, no special tokens added (the text holds
    them)."""

    def __init__(self, reward: Frozen, tokenizer):
        if not isinstance(reward, (Separate, AdapterOff)):  # a bare model: say which form it takes
            raise TypeError(
                f"RewardScorer reads a Separate or AdapterOff reward model, got {reward!r:.60}"
            )
        self.reward, self.tokenizer = reward, tokenizer

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.tokenizer.padding_side = "right"
        with self.reward.use() as model:
            batch = self.tokenizer(
                texts, return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            return model(**batch).logits[:, 0].float()


def exact_match_reward(answers: list[str], references: list[str]) -> list[float]:
    """1.0 where the answer equals the reference (surrounding whitespace ignored), else 0.0."""
    return [float(a.strip() == r.strip()) for a, r in zip(answers, references)]


RULE_REWARDS = {"exact_match": exact_match_reward}


def total_rewards(
    prompts: list[Prompt],
    answers: list[str],
    funcs: list[str],
    template,
    scorer: RewardScorer | None,
    device,
) -> torch.Tensor:
    """Summed rewards of each answer: the reward model reads the whole conversation as the template
    renders it."""
    total = torch.zeros(len(answers), device=device)
    if "model" in funcs:
        texts = [
            render_text(template, p.messages + [{"role": "assistant", "content": a}], p.tools)
            for p, a in zip(prompts, answers)
        ]
        total += scorer(texts).to(device)
    for name in funcs:
        if name != "model":
            total += torch.tensor(
                RULE_REWARDS[name](answers, [p.reference for p in prompts]), device=device
            )
    return total


def reward_model_folder(path: str, output_dir: str, is_main: bool) -> str:
    """A merged reward model folder: the path itself, or an RM adapter merged once into
    output_dir."""
    adapter_config = Path(path, "adapter_config.json")
    if not adapter_config.is_file():
        return path
    merged = Path(output_dir, "reward_model_merged")
    if is_main and not (merged / "config.json").is_file():
        check_folder_whole(path, "--reward_model_name_or_path")
        base = read_json_file(adapter_config, "--reward_model_name_or_path")[
            "base_model_name_or_path"
        ]
        logger.info("reward model %s is an adapter: merging it into %s once", path, base)
        merge_adapter(base, path, str(merged))
    if dist.is_initialized():
        dist.barrier()
    return str(merged)


def check_same_vocab(policy_tokenizer, reward_tokenizer) -> None:
    if policy_tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        raise UserError(
            "the value model starts from the reward model and reads the policy's tokens, "
            "so both need the "
            "same tokenizer; train the RM from this SFT model (or its merged output)."
        )
