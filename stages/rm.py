"""Stage 3, RM: a pairwise reward model on top of a causal-LM checkpoint (usually the merged SFT
output).

AutoModelForSequenceClassification(num_labels=1) reads the reward at the last token of
prompt+answer, rendered with the SFT template. Loss: -log sigmoid(r_chosen - r_rejected - margin),
plus optional reward centering. Evaluation reports pairwise accuracy and mean margin on the
validation set.

    python stages/rm.py --model_name_or_path outputs/sft-merged --template_name qwen \
        --train_file_dir data/reward --validation_file_dir data/reward_eval --output_dir outputs/rm
    torchrun --nproc_per_node 8 stages/rm.py ...      # or: bash run_rm.sh ...
"""

from __future__ import annotations

import logging

from pipeline.args import (
    STAGE_ARGUMENTS,
    check_common,
    check_eval_data,
    parse_args,
    resolve_checkpointing,
    resolve_packing,
    trainable_dtype,
)
from pipeline.data.collators import PairCollator
from pipeline.data.preference_dataset import preference_datasets
from pipeline.data.templates import apply_template_to_tokenizer, resolve_template
from pipeline.errors import UserError, run_cli
from pipeline.model.loading import load_model, load_tokenizer
from pipeline.run.output_dir import claim_output_dir
from pipeline.run.setup import setup_run
from pipeline.train.reward import RewardModelTrainer
from pipeline.train.trainer_steps import evaluate_and_save, train_and_save

logger = logging.getLogger("pipeline.rm")


ARGUMENTS = STAGE_ARGUMENTS["rm"]


def parse(argv: list[str] | None = None):
    """The stage's flags, parsed and validated (no side effects)."""
    model_args, data_args, peft_args, pref_args, training_args = parse_args(ARGUMENTS, argv)
    check_common(model_args, peft_args, max_length=pref_args.model_max_length)
    if (
        peft_args.use_peft and peft_args.peft_type == "prefix_tuning"
    ):  # peft's sequence-classification path needs it
        raise UserError(
            "--peft_type prefix_tuning cannot train a reward model (peft's scoring model takes no "
            "prefix under this transformers version); use LoRA (the default) or --use_peft False."
        )
    resolve_checkpointing(training_args, peft_args)
    check_eval_data(data_args, training_args)
    pref_args.packing = resolve_packing(pref_args.packing, peft_args)
    return model_args, data_args, peft_args, pref_args, training_args


def main(argv: list[str] | None = None):
    model_args, data_args, peft_args, pref_args, training_args = parse(argv)
    setup_run(training_args)
    claim_output_dir(
        training_args,
        "rm",
        model_args.model_name_or_path,
        data_args.train_source[0],
        peft_args.method,
    )
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(pref_args.template_name, tokenizer, pref_args.chat_template_kwargs)
    apply_template_to_tokenizer(tokenizer, template)

    train_dataset, eval_dataset = preference_datasets(
        template, tokenizer, pref_args, data_args, training_args, whole_conversations=True
    )
    model = load_model(
        model_args,
        peft_args,
        tokenizer,
        head="reward",
        gradient_checkpointing=training_args.gradient_checkpointing,
        max_length=pref_args.model_max_length,
        trainable_dtype=trainable_dtype(training_args),
        packing=pref_args.packing,
        half_precision=bool(training_args.bf16 or training_args.fp16),
        new_head=True,
    )
    trainer = RewardModelTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=PairCollator(tokenizer.pad_token_id),
        center_rewards_coefficient=training_args.center_rewards_coefficient,
        packing=pref_args.packing,
    )
    if training_args.do_train:
        train_and_save(trainer, training_args)
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_save(trainer)
    return trainer


if __name__ == "__main__":
    run_cli(main)
