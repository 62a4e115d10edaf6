"""Stage 2, SFT: supervised fine-tuning on multi-turn chats and tool calls with assistant-only loss.

Data: .json/.jsonl under --train_file_dir in ShareGPT, OpenAI/GLM-4 messages, ChatGLM3 or Alpaca form
(detected per record). Each conversation is rendered with --template_name and only the assistant
answers plus the token that ends each answer are trained. The saved tokenizer carries the template as
its chat_template and the generation config stops on the template's end-of-turn tokens. Samples are
packed whole into rows (--packing, default on) and a step's rows are flattened into one padding-free
sequence; the loss is computed without full-vocabulary logits (pipeline/train/causal_lm.py). With
--predict_with_generate True the held-out answers are generated and scored with ROUGE/BLEU at every evaluation
and after training, --test_file's too (pipeline/eval/predict.py).

    python stages/sft.py --model_name_or_path outputs/pt-merged --template_name qwen \
        --train_file_dir data/sft --validation_file_dir data/sft_eval --output_dir outputs/sft
    torchrun --nproc_per_node 8 stages/sft.py ...      # or: bash run_sft.sh ...
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.args import CausalLMTrainingArguments, DataArguments, ModelArguments, PeftArguments, parse_args, trainable_dtype
from pipeline.data.chat_dataset import build_chat_dataset, sanity_table
from pipeline.data.collators import FlatteningCollator, PaddingCollator
from pipeline.data.conversations import FORMATS, column_format
from pipeline.data.files import cap, load_train_eval
from pipeline.data.masking import MULTI_TURN_MODES
from pipeline.data.packing import pack_dataset
from pipeline.data.templates import apply_template_to_tokenizer, resolve_template
from pipeline.errors import UserError, run_cli
from pipeline.eval.predict import GenerationEval, check_predict_with_generate, held_out_sources
from pipeline.model.adapters import unwrap
from pipeline.model.loading import load_model, load_tokenizer, set_generation_stops
from pipeline.train.causal_lm import CausalLMTrainer
from pipeline.train.master_weights import check_master_weights
from pipeline.train.output_dir import claim_output_dir
from pipeline.train.run import evaluate_and_save, setup_run, train_and_save
from pipeline.validation import check_common, check_eval_data, resolve_checkpointing, resolve_packing

logger = logging.getLogger("pipeline.sft")


@dataclass
class SFTArguments:
    template_name: str = field(default="auto", metadata={"help": "Chat template, or auto = the tokenizer's own."})
    chat_template_kwargs: str | None = field(default=None, metadata={
        "help": "JSON object given to every render of the chat template (training, checks, the saved model), "
                "e.g. '{\"enable_thinking\": false}'."})
    model_max_length: int = field(default=2048, metadata={"help": "Longest sample in tokens; whole turns kept where possible."})
    multi_turn_mode: str = field(default="all", metadata={"help": "all turns / last turn / split into one sample per turn",
                                                          "choices": MULTI_TURN_MODES})
    train_on_inputs: bool = field(default=False, metadata={"help": "Supervise every token, prompts included."})
    data_format: str = field(default="auto", metadata={"help": "Force a data format.", "choices": FORMATS})
    skip_invalid_samples: bool = field(default=False, metadata={"help": "Skip (and count) invalid records instead of stopping."})
    prompt_column: str | None = field(default=None, metadata={
        "help": "Records of two text fields: the question's field (with --response_column); {content, summary} "
                "records are read without it."})
    response_column: str | None = field(default=None, metadata={"help": "Records of two text fields: the answer's field."})
    neft_alpha: float = field(default=0.0, metadata={"help": "NEFTune noise alpha on embeddings (0 = off)."})
    packing: bool | None = field(default=None, metadata={
        "help": "Pack whole samples into rows, padding-free (default: on; off for prefix tuning and NEFTune)."})
    packing_length: int | None = field(default=None, metadata={
        "help": "Tokens per packed row (default --model_max_length); a step holds --per_device_train_batch_size rows."})
    loss_chunk_size: int = field(default=2048, metadata={"help": "Supervised tokens per output-head chunk of the loss."})
    predict_with_generate: bool = field(default=False, metadata={
        "help": "At each evaluation and after training, generate the held-out answers and score ROUGE/BLEU "
                "(needs the eval extra)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Tokens generated per held-out answer (--predict_with_generate)."})

    def __post_init__(self):
        if self.model_max_length < 8:
            raise UserError(f"--model_max_length must be at least 8, got {self.model_max_length}.")
        if self.neft_alpha < 0:
            raise UserError(f"--neft_alpha must be >= 0, got {self.neft_alpha}.")
        if self.packing_length is not None and self.packing_length < 1:
            raise UserError(f"--packing_length must be positive, got {self.packing_length}.")
        self.packing_length = self.packing_length or self.model_max_length
        if self.packing_length < self.model_max_length:
            raise UserError(f"--packing_length ({self.packing_length}) must hold the longest sample, "
                            f"--model_max_length ({self.model_max_length}).")
        if self.loss_chunk_size < 1:
            raise UserError(f"--loss_chunk_size must be positive, got {self.loss_chunk_size}.")
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}.")
        if self.max_new_tokens != type(self).max_new_tokens and not self.predict_with_generate:
            raise UserError("--max_new_tokens sets the held-out answers of --predict_with_generate True; without it "
                            "SFT generates nothing: add that flag or drop --max_new_tokens.")
        self.data_format = column_format(self.data_format, self.prompt_column, self.response_column)


def build_datasets(data_args, sft_args, template, tokenizer, training_args):
    def load(directory: str, flag: str):
        dataset, report = build_chat_dataset(directory, flag, template, tokenizer, sft_args, data_args)
        logger.info(report.summary(f"{flag} samples"))
        return dataset

    with training_args.main_process_first(desc="encoding chats"):
        train, evaluation = load_train_eval(load, data_args, training_args.seed, "samples")
    return cap(train, data_args.max_train_samples), cap(evaluation, data_args.max_eval_samples)


def pack(dataset, length: int, name: str):
    packed, summary = pack_dataset(dataset, length, name)
    logger.info(summary)
    return packed


ARGUMENTS = (ModelArguments, DataArguments, PeftArguments, SFTArguments, CausalLMTrainingArguments)


def parse(argv: list[str] | None = None):
    """The stage's flags, parsed and validated (no side effects)."""
    model_args, data_args, peft_args, sft_args, training_args = parse_args(ARGUMENTS, argv)
    check_common(model_args, peft_args, max_length=sft_args.model_max_length)
    resolve_checkpointing(training_args, peft_args)
    check_master_weights(model_args, peft_args, training_args)
    check_eval_data(data_args, training_args)
    if sft_args.predict_with_generate:
        check_predict_with_generate(data_args, training_args)
    training_args.neftune_noise_alpha = sft_args.neft_alpha or None  # the seed's flag name for the Trainer's
    sft_args.packing = resolve_packing(sft_args.packing, peft_args, sft_args.neft_alpha)
    return model_args, data_args, peft_args, sft_args, training_args


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, peft_args, sft_args, training_args = parse(argv)
    setup_run(training_args)
    claim_output_dir(training_args, "sft", model_args.model_name_or_path, data_args.train_source[0])
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(sft_args.template_name, tokenizer, sft_args.chat_template_kwargs)
    stop_ids = apply_template_to_tokenizer(tokenizer, template)
    train_dataset, eval_dataset = build_datasets(data_args, sft_args, template, tokenizer, training_args)
    held_out = held_out_sources(data_args, sft_args) if sft_args.predict_with_generate else None
    if training_args.should_log:
        first = train_dataset[0]
        logger.info("Sanity check: first training sample (template '%s')\n%s", template.name,
                    sanity_table(tokenizer, first["input_ids"], first["labels"]))
    if sft_args.packing:
        train_dataset, eval_dataset = (pack(d, sft_args.packing_length, name) if d is not None else None
                                       for d, name in ((train_dataset, "train"), (eval_dataset, "eval")))
    model = load_model(model_args, peft_args, tokenizer, head="lm", gradient_checkpointing=training_args.gradient_checkpointing,
                       max_length=sft_args.model_max_length,
                       trainable_dtype=trainable_dtype(training_args), packing=sft_args.packing,
                       half_precision=bool(training_args.bf16 or training_args.fp16))
    set_generation_stops(model, stop_ids, tokenizer.pad_token_id)
    trainer = CausalLMTrainer(
        model=model,
        args=training_args,
        data_collator=FlatteningCollator() if sft_args.packing else PaddingCollator(pad_token_id=tokenizer.pad_token_id),
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
        if training_args.should_save:  # adapters are saved without it; inference needs the stop tokens
            unwrap(model).generation_config.save_pretrained(Path(training_args.output_dir))
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_save(trainer)
    if generation:  # the final evaluation's answers and the --test_file answers, with their metrics
        generation.finish(held_out[1])


if __name__ == "__main__":
    run_cli(main)
