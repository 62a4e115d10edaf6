"""Stage 4a', GRPO or RLOO: group-relative RL on trl's GRPOTrainer / RLOOTrainer, with the project's
prompts, template, rewards (reward model and/or rule rewards) and held-out evaluation (the same as PPO's).

No value model: each prompt gets --num_generations answers and each answer's advantage is its reward
against the group's. --ppo_epochs and --cliprange map to trl's num_iterations and epsilon, --kl_coef to
beta; the PPO-only flags (GAE, value clipping, adaptive KL...) are refused.

    python stages/grpo.py --algorithm grpo --model_name_or_path outputs/sft-merged --reward_funcs exact_match \
        --template_name qwen --train_file_dir data/sft --validation_file_dir data/sft_eval --output_dir outputs/grpo
    torchrun --nproc_per_node 8 stages/grpo.py ...      # or: bash run_grpo.sh ...
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import pipeline  # noqa: F401  first: its filters of known harmless library warnings (library_noise.py) precede trl

# isort: split
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from pipeline.args import DataArguments, ModelArguments, PeftArguments, parse_args, trainable_dtype
from pipeline.data.prompts import load_rl_prompts
from pipeline.data.templates import apply_template_to_tokenizer, resolve_template
from pipeline.errors import UserError, first_line, run_cli
from pipeline.model.adapters import unwrap
from pipeline.model.loading import load_model, load_tokenizer, set_generation_stops
from pipeline.rl.config import GROUP_RELATIVE_FLAGS, PPOArguments, RLTrainingArguments, validate_group_relative
from pipeline.rl.rewards import RULE_REWARDS, RewardScorer, reward_model_folder
from pipeline.rl.rollout import Rollouts
from pipeline.train.output_dir import claim_output_dir
from pipeline.train.run import setup_run, train_and_save


@dataclass
class GroupRelativeArguments(PPOArguments):
    algorithm: str = field(default="grpo", metadata={"help": "grpo or rloo (trl).", "choices": ("grpo", "rloo")})


def rule_reward(name: str):
    """A trl reward function over the completions of a batch, from one of the project's rule rewards."""
    def reward(prompts, completions, reference, **_):
        return RULE_REWARDS[name]([c[-1]["content"] for c in completions], reference)

    reward.__name__ = name
    return reward


def build_trainer(policy, tokenizer, prompts, ppo_args, training_args, reward_model, rm_tokenizer):
    """trl's config classes repeat flags the shared dataclasses own, so they are built from the parsed values."""
    funcs = [reward_model if f == "model" else rule_reward(f) for f in ppo_args.reward_func_list]
    processors = [rm_tokenizer if f == "model" else None for f in ppo_args.reward_func_list]
    dataset = Dataset.from_list([{"prompt": p.messages, "reference": p.reference} for p in prompts])
    shared = {f.name: getattr(training_args, f.name) for f in fields(TrainingArguments) if f.init}
    shared["remove_unused_columns"] = False  # the rule rewards read the "reference" column
    common = dict(num_generations=ppo_args.num_generations, max_completion_length=ppo_args.max_new_tokens,
                  temperature=ppo_args.temperature, top_p=ppo_args.top_p, beta=ppo_args.kl_coef,
                  # NaN/inf logits of a diverging policy: sampled from, not a device assert; the guard then stops the run
                  generation_kwargs={"remove_invalid_values": True},
                  **{trl_name: getattr(ppo_args, name) for name, trl_name in GROUP_RELATIVE_FLAGS.items()})
    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if ppo_args.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    try:
        config = config_class(**shared, **common)
    except ValueError as e:
        raise UserError(f"--algorithm {ppo_args.algorithm}: {first_line(e)}") from e
    return trainer_class(model=policy, reward_funcs=funcs, args=config, train_dataset=dataset, processing_class=tokenizer,
                         reward_processing_classes=processors)


ARGUMENTS = (ModelArguments, DataArguments, PeftArguments, GroupRelativeArguments, RLTrainingArguments)


def parse(argv: list[str] | None = None):
    """The stage's flags, parsed and validated (no side effects)."""
    model_args, data_args, peft_args, ppo_args, training_args = parse_args(ARGUMENTS, argv)
    validate_group_relative(model_args, peft_args, ppo_args)
    return model_args, data_args, peft_args, ppo_args, training_args


def main(argv: list[str] | None = None):
    model_args, data_args, peft_args, ppo_args, training_args = parse(argv)
    setup_run(training_args)
    claim_output_dir(training_args, "grpo", model_args.model_name_or_path, data_args.train_source[0])
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(ppo_args.template_name, tokenizer, ppo_args.chat_template_kwargs)
    stop_ids = apply_template_to_tokenizer(tokenizer, template)
    prompts, eval_prompts = load_rl_prompts(data_args, ppo_args, template, tokenizer)
    policy = load_model(model_args, peft_args, tokenizer, head="lm", gradient_checkpointing=training_args.gradient_checkpointing,
                        max_length=ppo_args.model_max_length, trainable_dtype=trainable_dtype(training_args))
    set_generation_stops(policy, stop_ids, tokenizer.pad_token_id)
    reward_model = rm_tokenizer = None
    if "model" in ppo_args.reward_func_list:
        rm_path = reward_model_folder(ppo_args.reward_model_name_or_path, training_args.output_dir, training_args.should_save)
        rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
        reward_model = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=unwrap(policy).dtype).eval()
    trainer = build_trainer(policy, tokenizer, prompts, ppo_args, training_args, reward_model, rm_tokenizer)
    scorer = RewardScorer(reward_model, rm_tokenizer) if reward_model is not None else None
    evaluator = Rollouts(trainer.model, getattr(trainer, "ref_model", None), scorer, nullcontext, tokenizer, template,
                         ppo_args, training_args)
    before = evaluator.evaluate(eval_prompts) if eval_prompts else None
    if training_args.do_train:
        train_and_save(trainer, training_args)
        if training_args.should_save:
            unwrap(policy).generation_config.save_pretrained(Path(training_args.output_dir))
    if before:
        after = evaluator.evaluate(eval_prompts)
        results = {**after, **{f"{k}_before": v for k, v in before.items() if k != "eval_samples"}}
        trainer.log_metrics("eval", results)
        trainer.save_metrics("eval", results)
    return trainer


if __name__ == "__main__":
    run_cli(main)
