"""Stage 4b, DPO: direct preference optimization straight after SFT (and its variants).

--loss_type sigmoid (DPO), ipo, hinge, robust (with --label_smoothing) run on trl's DPOTrainer with the
project's data layer in front: pairs are rendered with the SFT template and tokenized exactly as SFT
trains (prompt up to the generation prompt; answer + the token ending the turn). With LoRA the
reference is the starting adapter state (trl keeps a frozen copy of the small adapter; the base
weights exist once); full training keeps an explicit frozen reference, or none with
--precompute_ref_log_probs. Chosen/rejected rewards, accuracy and margin are logged to tensorboard.

    python stages/dpo.py --model_name_or_path outputs/sft-merged --template_name qwen \
        --train_file_dir data/reward --validation_file_dir data/reward_eval --output_dir outputs/dpo
    torchrun --nproc_per_node 8 stages/dpo.py ...      # or: bash run_dpo.sh ...
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments, set_seed
from trl import DPOConfig, DPOTrainer

from pipeline.args import (DataArguments, ModelArguments, PeftArguments, PipelineTrainingArguments,
                           PreferenceArguments, parse_args, trainable_dtype)
from pipeline.chat_data import apply_template_to_tokenizer, resolve_template
from pipeline.data import cap, load_train_eval
from pipeline.errors import UserError, run_cli
from pipeline.models import load_model, load_tokenizer
from pipeline.preference_data import build_preference_dataset
from pipeline.runtime import evaluate_and_save, setup_logging, train_and_save

logger = logging.getLogger("pipeline.dpo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
NOT_YET = ("orpo", "simpo", "kto")


@dataclass
class DPOArguments:
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO), ipo, hinge, robust.",
                                                         "choices": DPO_LOSSES + NOT_YET})
    beta: float = field(default=0.1, metadata={"help": "Strength of the pull towards the reference."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Assumed share of flipped labels (robust / cDPO)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Score the reference once up front."})

    def __post_init__(self):
        if self.loss_type in NOT_YET:
            raise UserError(f"--loss_type {self.loss_type} is not available in this version; use one of {', '.join(DPO_LOSSES)}.")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise UserError(f"--label_smoothing applies to the sigmoid and robust losses, not {self.loss_type}.")


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer that takes prompt_ids/chosen_ids/rejected_ids as they are (no re-tokenization, no EOS added)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def dpo_config(training_args: PipelineTrainingArguments, dpo_args: DPOArguments) -> DPOConfig:
    """The shared TrainingArguments values plus the DPO settings, as trl's config object."""
    shared = {f.name: getattr(training_args, f.name) for f in fields(TrainingArguments) if f.init}
    return DPOConfig(**shared, loss_type=[dpo_args.loss_type], beta=dpo_args.beta, label_smoothing=dpo_args.label_smoothing,
                     precompute_ref_log_probs=dpo_args.precompute_ref_log_probs, max_length=None)


def main(argv: list[str] | None = None) -> DPOTrainer:
    model_args, data_args, peft_args, pref_args, dpo_args, training_args = parse_args(
        (ModelArguments, DataArguments, PeftArguments, PreferenceArguments, DPOArguments, PipelineTrainingArguments), argv
    )
    setup_logging(training_args)
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(pref_args.template_name, tokenizer)
    apply_template_to_tokenizer(tokenizer, template)

    def load(directory: str, flag: str):
        dataset, report = build_preference_dataset(directory, flag, template, tokenizer, pref_args.model_max_length,
                                                   skip_invalid=pref_args.skip_invalid_samples,
                                                   num_proc=data_args.preprocessing_num_workers)
        logger.info(report.summary(f"{flag} pairs"))
        return dataset.remove_columns(["margin"])

    with training_args.main_process_first(desc="encoding pairs"):
        train_dataset, eval_dataset = load_train_eval(load, data_args, training_args.seed, "pairs")
    train_dataset, eval_dataset = cap(train_dataset, data_args.max_train_samples), cap(eval_dataset, data_args.max_eval_samples)
    model = load_model(model_args, peft_args, tokenizer, head="lm",
                       gradient_checkpointing=training_args.gradient_checkpointing, max_length=pref_args.model_max_length,
                       trainable_dtype=trainable_dtype(training_args))
    trainer = PretokenizedDPOTrainer(model=model, args=dpo_config(training_args, dpo_args), train_dataset=train_dataset,
                                     eval_dataset=eval_dataset, processing_class=tokenizer)
    if training_args.do_train:
        train_and_save(trainer, training_args)
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_save(trainer)
    return trainer


if __name__ == "__main__":
    run_cli(main)
