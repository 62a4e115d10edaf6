"""Stage 4b, DPO: direct preference optimization straight after SFT, and its relatives.

--loss_type sigmoid (DPO), ipo, hinge, robust (with --label_smoothing) run on trl's DPOTrainer; kto
(unpaired answers; pairs are split into a desirable and an undesirable one) on trl's KTOTrainer;
simpo and orpo (reference-free) on the project's own small trainer. All take the project's data
layer: pairs are rendered with the SFT template and tokenized exactly as SFT trains (prompt up to
the generation prompt; answer + the token ending the turn). With LoRA the reference is the starting
adapter state (the base with a new adapter switched off, or a frozen copy of a trained one; the base
weights exist once); full training keeps an explicit frozen reference, or none with
--precompute_ref_log_probs.
Chosen/rejected rewards, accuracy and margin are logged to tensorboard.

    python stages/dpo.py --model_name_or_path outputs/sft-merged --template_name qwen \
        --train_file_dir data/reward --validation_file_dir data/reward_eval --output_dir outputs/dpo
    torchrun --nproc_per_node 8 stages/dpo.py ...      # or: bash run_dpo.sh ...
"""

from __future__ import annotations

import logging
from dataclasses import fields

import pipeline  # noqa: F401  first: its filters of known harmless library warnings (library_noise.py) precede trl

# isort: split
from transformers import TrainingArguments
from trl import DPOConfig, KTOConfig

from pipeline.args import (
    REFERENCE_FREE,
    STAGE_ARGUMENTS,
    check_common,
    check_eval_data,
    parse_args,
    resolve_checkpointing,
    resolve_packing,
    trainable_dtype,
)
from pipeline.data.preference_dataset import preference_datasets
from pipeline.data.templates import apply_template_to_tokenizer, resolve_template
from pipeline.errors import run_cli
from pipeline.model.compiled import compile_decoder_layers
from pipeline.model.loading import load_model, load_tokenizer
from pipeline.run.output_dir import claim_output_dir
from pipeline.run.setup import setup_run
from pipeline.train.preference import (
    PretokenizedDPOTrainer,
    PretokenizedKTOTrainer,
    ReferenceFreeTrainer,
)
from pipeline.train.trainer_steps import evaluate_and_save, train_and_save

logger = logging.getLogger("pipeline.dpo")


def build_trainer(
    model, tokenizer, training_args, dpo_args, packing: bool, train_dataset, eval_dataset
):
    """trl's config classes repeat flags the shared dataclasses own, so they are built from the
    parsed values."""
    shared = {f.name: getattr(training_args, f.name) for f in fields(TrainingArguments) if f.init}
    data = dict(train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer)
    if dpo_args.loss_type in REFERENCE_FREE:
        return ReferenceFreeTrainer(
            model=model,
            args=training_args,
            loss_type=dpo_args.loss_type,
            beta=dpo_args.beta,
            gamma=dpo_args.simpo_gamma,
            pad_token_id=tokenizer.pad_token_id,
            packing=packing,
            **data,
        )
    if dpo_args.loss_type == "kto":
        # KTO's KL estimate pairs each answer with its batch neighbour, so batches keep their order;
        # main() shuffled the answers once.
        shared["train_sampling_strategy"] = "sequential"
        config = KTOConfig(
            **shared,
            beta=dpo_args.beta,
            desirable_weight=dpo_args.desirable_weight,
            undesirable_weight=dpo_args.undesirable_weight,
            max_length=None,
            precompute_ref_log_probs=dpo_args.precompute_ref_log_probs,
        )
        return PretokenizedKTOTrainer(model=model, args=config, packing=packing, **data)
    config = DPOConfig(
        **shared,
        loss_type=[dpo_args.loss_type],
        beta=dpo_args.beta,
        label_smoothing=dpo_args.label_smoothing,
        precompute_ref_log_probs=dpo_args.precompute_ref_log_probs,
        max_length=None,
    )
    return PretokenizedDPOTrainer(model=model, args=config, packing=packing, **data)


ARGUMENTS = STAGE_ARGUMENTS["dpo"]


def parse(argv: list[str] | None = None):
    """The stage's flags, parsed and validated (no side effects)."""
    model_args, data_args, peft_args, pref_args, dpo_args, training_args = parse_args(
        ARGUMENTS, argv
    )
    check_common(model_args, peft_args, max_length=pref_args.model_max_length)
    resolve_checkpointing(training_args, peft_args)
    check_eval_data(data_args, training_args)
    pref_args.packing = resolve_packing(pref_args.packing, peft_args)
    return model_args, data_args, peft_args, pref_args, dpo_args, training_args


def main(argv: list[str] | None = None):
    model_args, data_args, peft_args, pref_args, dpo_args, training_args = parse(argv)
    setup_run(training_args)
    claim_output_dir(
        training_args,
        "dpo",
        model_args.model_name_or_path,
        data_args.train_source[0],
        peft_args.method,
    )
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(pref_args.template_name, tokenizer, pref_args.chat_template_kwargs)
    apply_template_to_tokenizer(tokenizer, template)

    unpaired = dpo_args.loss_type == "kto"
    train_dataset, eval_dataset = preference_datasets(
        template, tokenizer, pref_args, data_args, training_args, unpaired
    )
    if (
        unpaired
    ):  # KTO batches keep their order (see build_trainer), so shuffle the answers once here
        train_dataset = train_dataset.shuffle(seed=training_args.seed)
    model = load_model(
        model_args,
        peft_args,
        tokenizer,
        head="lm",
        gradient_checkpointing=training_args.gradient_checkpointing,
        max_length=pref_args.model_max_length,
        trainable_dtype=trainable_dtype(training_args),
        packing=pref_args.packing,
        half_precision=bool(training_args.bf16 or training_args.fp16),
    )
    trainer = build_trainer(
        model, tokenizer, training_args, dpo_args, pref_args.packing, train_dataset, eval_dataset
    )
    if training_args.compile_layers:  # trl's configs do not carry the flag: the stage acts on it
        for each in (trainer.model, getattr(trainer, "ref_model", None)):
            if each is not None:
                compile_decoder_layers(each)
    if training_args.do_train:
        train_and_save(trainer, training_args)
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_save(trainer)
    return trainer


if __name__ == "__main__":
    run_cli(main)
