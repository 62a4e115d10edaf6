"""Stage 4a, PPO: reinforcement learning from the trained reward model (and/or a rule reward), our
own loop.

One iteration = one step: roll out answers, score them, shape rewards with the KL to the reference,
GAE advantages, then PPO epochs of clipped policy + value updates. The loop is PPORecipe in
pipeline/rl/loop.py (read it top to bottom: train_step is the recipe); its parts are beside it in
pipeline/rl/. GRPO and its relatives (DAPO, Dr. GRPO, GSPO, RLOO) run the same loop: stages/grpo.py.

    python stages/ppo.py --model_name_or_path outputs/sft-merged \
        --reward_model_name_or_path outputs/rm-merged \
        --template_name qwen --train_file_dir data/sft --validation_file_dir data/sft_eval \
        --output_dir outputs/ppo \
        --max_steps 100
    torchrun --nproc_per_node 8 stages/ppo.py ...      # or: bash run_ppo.sh ...
"""

from __future__ import annotations

from pipeline.args import STAGE_ARGUMENTS, given_flags, parse_args
from pipeline.args.rl_checks import (
    check_rl_data_flags,
    check_trainer_flags,
    redirect_group_algorithm,
    validate_ppo,
)
from pipeline.errors import run_cli
from pipeline.rl.loop import PPORecipe, run
from pipeline.rl.models import build_models

ARGUMENTS = STAGE_ARGUMENTS["ppo"]


def parse(argv: list[str] | None = None):
    """The stage's flags, parsed and validated (no side effects)."""
    redirect_group_algorithm(argv)
    model_args, data_args, peft_args, ppo_args, training_args = parse_args(ARGUMENTS, argv)
    validate_ppo(model_args, peft_args, ppo_args, training_args)
    check_trainer_flags(training_args, given_flags(ARGUMENTS, argv), "PPO")
    check_rl_data_flags(data_args, training_args)
    return model_args, data_args, peft_args, ppo_args, training_args


def main(argv: list[str] | None = None) -> PPORecipe:
    return run(PPORecipe, build_models, "ppo", *parse(argv))


if __name__ == "__main__":
    run_cli(main)
