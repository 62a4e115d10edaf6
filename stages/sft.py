"""Stage 2, SFT: supervised fine-tuning on multi-turn chats and tool calls with assistant-only loss.

Data: .json/.jsonl under --train_file_dir in ShareGPT, OpenAI/GLM-4 messages, ChatGLM3 or Alpaca
form (detected per record). Each conversation is rendered with --template_name and only the
assistant answers plus the token that ends each answer are trained. The saved tokenizer carries the
template as its chat_template and the generation config stops on the template's end-of-turn tokens.
Samples are packed whole into rows (--packing, default on) and a step's rows are flattened into one
padding-free sequence; the loss is computed without full-vocabulary logits
(pipeline/train/causal_lm.py). With --predict_with_generate True the held-out answers are generated
and scored with ROUGE/BLEU at every evaluation and after training, --test_file's too
(pipeline/eval/predict.py).

    python stages/sft.py --model_name_or_path outputs/pt-merged --template_name qwen \
        --train_file_dir data/sft --validation_file_dir data/sft_eval --output_dir outputs/sft
    torchrun --nproc_per_node 8 stages/sft.py ...      # or: bash run_sft.sh ...
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.args import (
    STAGE_ARGUMENTS,
    check_common,
    check_eval_data,
    parse_args,
    resolve_checkpointing,
    resolve_packing,
    trainable_dtype,
)
from pipeline.data.chat_dataset import build_chat_dataset, sanity_table
from pipeline.data.collators import FlatteningCollator, PaddingCollator
from pipeline.data.files import cap, load_train_eval
from pipeline.data.packing import pack_dataset
from pipeline.data.templates import apply_template_to_tokenizer, resolve_template
from pipeline.errors import run_cli
from pipeline.eval.predict import GenerationEval, check_predict_with_generate, held_out_sources
from pipeline.model.adapters import unwrap
from pipeline.model.loading import load_model, load_tokenizer
from pipeline.model.stops import set_generation_stops
from pipeline.run.output_dir import claim_output_dir
from pipeline.run.setup import setup_run
from pipeline.train.causal_lm import CausalLMTrainer
from pipeline.train.master_weights import check_master_weights
from pipeline.train.trainer_steps import evaluate_and_save, train_and_save

logger = logging.getLogger("pipeline.sft")


def build_datasets(data_args, sft_args, template, tokenizer, training_args):
    def load(directory: str, flag: str):
        dataset, report = build_chat_dataset(
            directory, flag, template, tokenizer, sft_args, data_args
        )
        logger.info(report.summary(f"{flag} samples"))
        return dataset

    with training_args.main_process_first(desc="encoding chats"):
        train, evaluation = load_train_eval(load, data_args, training_args, "samples")
    return (
        cap(train, data_args.max_train_samples, "--max_train_samples", "samples"),
        cap(evaluation, data_args.max_eval_samples, "--max_eval_samples", "samples"),
    )


def pack(dataset, length: int, name: str):
    packed, summary = pack_dataset(dataset, length, name)
    logger.info(summary)
    return packed


ARGUMENTS = STAGE_ARGUMENTS["sft"]


def parse(argv: list[str] | None = None):
    """The stage's flags, parsed and validated (no side effects)."""
    model_args, data_args, peft_args, sft_args, training_args = parse_args(ARGUMENTS, argv)
    check_common(model_args, peft_args, max_length=sft_args.model_max_length)
    resolve_checkpointing(training_args, peft_args)
    check_master_weights(model_args, peft_args, training_args)
    check_eval_data(data_args, training_args)
    if sft_args.predict_with_generate:
        check_predict_with_generate(data_args, training_args)
    training_args.neftune_noise_alpha = (
        sft_args.neft_alpha or None
    )  # the seed's flag name for the Trainer's
    sft_args.packing = resolve_packing(sft_args.packing, peft_args, sft_args.neft_alpha)
    return model_args, data_args, peft_args, sft_args, training_args


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, peft_args, sft_args, training_args = parse(argv)
    setup_run(training_args)
    claim_output_dir(
        training_args,
        "sft",
        model_args.model_name_or_path,
        data_args.train_source[0],
        peft_args.method,
    )
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(sft_args.template_name, tokenizer, sft_args.chat_template_kwargs)
    stop_ids = apply_template_to_tokenizer(tokenizer, template)
    train_dataset, eval_dataset = build_datasets(
        data_args, sft_args, template, tokenizer, training_args
    )
    held_out = held_out_sources(data_args, sft_args) if sft_args.predict_with_generate else None
    if training_args.should_log:
        first = train_dataset[0]
        logger.info(
            "Sanity check: first training sample (template '%s')\n%s",
            template.name,
            sanity_table(tokenizer, first["input_ids"], first["labels"]),
        )
    if sft_args.packing:
        train_dataset, eval_dataset = (
            pack(d, sft_args.packing_length, name) if d is not None else None
            for d, name in ((train_dataset, "train"), (eval_dataset, "eval"))
        )
    model = load_model(
        model_args,
        peft_args,
        tokenizer,
        head="lm",
        gradient_checkpointing=training_args.gradient_checkpointing,
        max_length=sft_args.model_max_length,
        trainable_dtype=trainable_dtype(training_args),
        packing=sft_args.packing,
        half_precision=bool(training_args.bf16 or training_args.fp16),
    )
    set_generation_stops(model, stop_ids, tokenizer.pad_token_id)
    trainer = CausalLMTrainer(
        model=model,
        args=training_args,
        data_collator=FlatteningCollator()
        if sft_args.packing
        else PaddingCollator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        loss_chunk_size=sft_args.loss_chunk_size,
    )
    generation = GenerationEval(trainer, held_out[0], sft_args.max_new_tokens) if held_out else None
    if generation:  # ROUGE/BLEU of generated answers join every evaluation's metrics
        trainer.add_callback(generation)
    if training_args.do_train:
        train_and_save(trainer, training_args)
        if (
            training_args.should_save
        ):  # adapters are saved without it; inference needs the stop tokens
            unwrap(model).generation_config.save_pretrained(Path(training_args.output_dir))
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_save(trainer)
    if generation:  # the final evaluation's answers and the --test_file answers, with their metrics
        generation.finish(held_out[1])


if __name__ == "__main__":
    run_cli(main)
