"""The own RL loops' checks (stages/ppo.py, stages/grpo.py), run by their parse() right after
parsing: the algorithm and engine each script runs, the Trainer flags the loops implement (any other
given is refused, not ignored), the PPO-only flags the group algorithms refuse, the batch shapes."""

from __future__ import annotations

import importlib.util
from dataclasses import fields

from pipeline.args.checks import check_common, eval_strategy_name, evaluates_during_training
from pipeline.args.stages import PPOArguments, algorithm_elsewhere
from pipeline.errors import UserError
from pipeline.rl.group_math import VARIANTS


def _check_rl_common(model_args, peft_args, ppo_args) -> None:
    if peft_args.use_peft and peft_args.peft_type != "lora":
        raise UserError(
            f"--peft_type {peft_args.peft_type} is for SFT; the RL stages train LoRA/QLoRA "
            "adapters or the full model."
        )
    check_common(model_args, peft_args, max_length=ppo_args.model_max_length)


def redirect_group_algorithm(argv: list[str] | None) -> None:
    """stages/ppo.py given --algorithm grpo|dapo|...: the one sentence that sends it to
    stages/grpo.py, before the group flags (--num_generations, ...) are refused as unknown to
    PPO."""
    import argparse
    import sys

    from pipeline.config_file import config_file_argv

    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument("--algorithm")
    algorithm = finder.parse_known_args(
        config_file_argv(list(sys.argv[1:] if argv is None else argv))
    )[0].algorithm
    if algorithm in VARIANTS:
        raise UserError(algorithm_elsewhere(algorithm))


def validate_ppo(model_args, peft_args, ppo_args, training_args) -> None:
    """Every check of stages/ppo.py that does not need the data: algorithm, adapter, loop flags,
    batch shape."""
    if ppo_args.algorithm != "ppo":
        raise UserError(algorithm_elsewhere(ppo_args.algorithm))
    _check_rl_common(model_args, peft_args, ppo_args)
    if training_args.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UserError("--deepspeed needs the deepspeed package: pip install deepspeed.")
    check_loop_flags(training_args)
    batch, mini = (
        training_args.per_device_train_batch_size,
        ppo_args.mini_batch_size or training_args.per_device_train_batch_size,
    )
    if batch % mini or mini % training_args.gradient_accumulation_steps:
        raise UserError(
            f"--per_device_train_batch_size ({batch}) must be a multiple of --mini_batch_size "
            f"({mini}), itself a multiple of --gradient_accumulation_steps."
        )
    if training_args.max_steps <= 0:
        raise UserError("--max_steps (PPO iterations) must be set for the PPO stage.")


def check_loop_flags(training_args) -> None:
    """Trainer flags the own PPO loop does not implement are refused, not ignored."""
    optim = getattr(training_args.optim, "value", training_args.optim)
    if not str(optim).startswith("adamw_torch"):
        raise UserError(
            f"--optim {optim}: the PPO loop trains with torch AdamW (--optim adamw_torch); "
            "other optimizers are for the Trainer-based stages and --algorithm grpo/rloo."
        )
    if (
        training_args.fp16 and training_args.deepspeed
    ):  # the plain loop scales the loss itself (engine.py)
        raise UserError(
            "--fp16 with --deepspeed is not supported by the PPO loop (DeepSpeed's fp16 engine "
            "would cast the frozen reference and reward copies as well): use --bf16 True there, or "
            "drop --deepspeed to train fp16 with the loop's loss scaler."
        )
    if training_args.use_liger_kernel:
        raise UserError(
            "--use_liger_kernel is applied by the Trainer-based stages; the PPO loop does not use "
            "it (--algorithm grpo/rloo do): drop the flag."
        )


# The Trainer flags the own RL loops (PPO; GRPO and relatives with --rl_engine own) implement or act
# on when the arguments are built (devices, process group, tf32); any other TrainingArguments flag
# given with a value other than its default would be ignored, and is refused (check_trainer_flags).
LOOP_TRAINER_FLAGS = frozenset(
    {
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "optim",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_steps",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "bf16",
        "fp16",
        "tf32",
        "gradient_checkpointing",
        "activation_checkpointing",
        "gradient_checkpointing_kwargs",
        "activation_checkpointing_kwargs",
        "deepspeed",
        "use_cpu",
        "local_rank",
        "ddp_backend",
        "ddp_timeout",
        "seed",
        "use_liger_kernel",
        "output_dir",
        "overwrite_output_dir",
        "do_train",
        "do_eval",
        "eval_strategy",
        "eval_steps",
        "logging_steps",
        "report_to",
        "disable_tqdm",
        "log_on_each_node",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_on_each_node",
        "resume_from_checkpoint",
        "max_nonfinite_steps",
        "logging_nan_inf_filter",
    }
)
WHY_NOT = {
    "num_train_epochs": "the loop runs --max_steps iterations over its prompts",
    "eval_on_start": "the loop evaluates its start model whenever it has held-out prompts",
}


def check_rl_data_flags(data_args, training_args) -> None:
    """Data flags the RL stages would not read: they hold out only
    --validation_file_dir/--validation_file prompts (never a share of the training data:
    --validation_split_percentage 0 says just that) and tokenize prompts in this process; and
    evaluation during training, which needs those held-out prompts."""
    if evaluates_during_training(training_args) and not data_args.has_validation:
        raise UserError(
            f"--eval_strategy {eval_strategy_name(training_args)}"
            f"{' / --eval_on_start' if getattr(training_args, 'eval_on_start', False) else ''} "
            "evaluates during training, but the RL stages hold out only prompts given with "
            "--validation_file_dir or --validation_file, and none is given; give one, or "
            "--eval_strategy no."
        )
    unused = (
        [
            f"--validation_split_percentage {data_args.validation_split_percentage} (held-out "
            "prompts come only from --validation_file_dir or --validation_file)"
        ]
        if data_args.validation_split_percentage
        not in (0, type(data_args).validation_split_percentage)
        else []
    )
    if data_args.preprocessing_num_workers is not None:
        unused.append("--preprocessing_num_workers (prompts are tokenized in this process)")
    if unused:
        raise UserError(
            f"{'; '.join(unused)}: not read by the RL stages; drop "
            f"{'it' if len(unused) == 1 else 'them'}."
        )


def check_trainer_flags(training_args, given: set[str], loop: str) -> None:
    """Refuse the Trainer flags the own loop would ignore (given on the command line, and not at
    their default)."""
    from transformers import TrainingArguments

    defaults = {f.name: f.default for f in fields(type(training_args)) if f.name in given}
    trainer = {f.name for f in fields(TrainingArguments)}

    def plain(value):
        return getattr(value, "value", value)

    ignored = sorted(
        name
        for name in given & trainer - LOOP_TRAINER_FLAGS
        if plain(getattr(training_args, name)) != plain(defaults.get(name))
    )
    if ignored:
        why = "; ".join(f"--{n}: {WHY_NOT[n]}" for n in ignored if n in WHY_NOT)
        raise UserError(
            f"{', '.join('--' + n for n in ignored)}: Trainer flag(s) the {loop} loop does not "
            f"implement (it would ignore them){'; ' + why if why else ''}. Drop them; see --help "
            "for the loop's flags."
        )


# PPO flags trl's GRPO/RLOO take under their own names; the other PPO-only flags have no counterpart
# there.
GROUP_RELATIVE_FLAGS = {"ppo_epochs": "num_iterations", "cliprange": "epsilon"}
PPO_ONLY_FLAGS = (
    "mini_batch_size",
    "target_kl",
    "kl_horizon",
    "kl_estimator",
    "gamma",
    "lam",
    "cliprange_value",
    "vf_coef",
    "whiten_rewards",
    "missing_eos_penalty",
)


def validate_group_relative(model_args, peft_args, ppo_args, training_args=None) -> None:
    """Every check of stages/grpo.py: the algorithm and engine, the adapter, no PPO-only flag (it
    would be ignored), and for the own loop its batch shape and loop flags."""
    if ppo_args.algorithm == "ppo":
        raise UserError(algorithm_elsewhere("ppo"))
    engine = getattr(ppo_args, "rl_engine", "own")
    if engine == "trl" and ppo_args.algorithm not in ("grpo", "rloo"):
        raise UserError(
            f"--algorithm {ppo_args.algorithm} runs in the project's own loop only (--rl_engine "
            "own); --rl_engine trl takes grpo or rloo."
        )
    _check_rl_common(model_args, peft_args, ppo_args)
    defaults = {f.name: f.default for f in fields(PPOArguments)}
    given = [f"--{name}" for name in PPO_ONLY_FLAGS if getattr(ppo_args, name) != defaults[name]]
    if given:
        raise UserError(
            f"{', '.join(given)} belong to --algorithm ppo (value model, GAE, adaptive KL); "
            f"--algorithm {ppo_args.algorithm} has no such setting: drop them."
        )
    if engine == "own" and training_args is not None:
        if training_args.deepspeed and importlib.util.find_spec("deepspeed") is None:
            raise UserError("--deepspeed needs the deepspeed package: pip install deepspeed.")
        check_loop_flags(training_args)
        batch, group = training_args.per_device_train_batch_size, ppo_args.num_generations
        if group < 2:
            raise UserError(
                f"--num_generations must be at least 2, got {group}: each answer is judged "
                "against the others of its group."
            )
        if batch % group or batch % training_args.gradient_accumulation_steps:
            raise UserError(
                f"--per_device_train_batch_size ({batch}, answers a step on each process) must be "
                f"a multiple of --num_generations ({group}, at least 2: an answer is judged "
                "against its group's) and of --gradient_accumulation_steps."
            )
        if training_args.max_steps <= 0:
            raise UserError(
                f"--max_steps ({ppo_args.algorithm} iterations) must be set for the own loop."
            )
