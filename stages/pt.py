"""Stage 1, PT: continued pretraining on raw text, packed into blocks.

Reads .txt (one document per line), .json and .jsonl ({"text": ...}) files found recursively under
--train_file_dir; each document ends with EOS; documents are packed into --block_size blocks whose
position_ids restart at every document, so documents do not attend to each other (a model whose
attention cannot keep them apart, e.g. under prefix tuning, trains each block as one sequence: said
in the log).

    python stages/pt.py --model_name_or_path M --train_file_dir data/pt --output_dir outputs/pt
    torchrun --nproc_per_node 8 stages/pt.py --model_name_or_path M ... \
        --deepspeed deepspeed_configs/zero2.json
    bash run_pt.sh --model_name_or_path M ... \
        # the same, with NNODES/NODE_RANK/... from the environment

Vocabulary expansion: give --tokenizer_name_or_path a tokenizer larger than the model; embeddings
are resized and, with LoRA, trained in full (--modules_to_save embed_tokens,lm_head).
"""

from __future__ import annotations

import functools
import logging

import pyarrow.compute as pc
from datasets import Dataset

from pipeline.args import (
    STAGE_ARGUMENTS,
    DataArguments,
    check_common,
    check_eval_data,
    parse_args,
    resolve_checkpointing,
    trainable_dtype,
)
from pipeline.data.collators import PackedBlockCollator
from pipeline.data.files import cap, load_text_dataset, load_train_eval
from pipeline.data.packing import tokenize_and_pack
from pipeline.errors import run_cli
from pipeline.model.loading import load_model, load_tokenizer
from pipeline.run.output_dir import claim_output_dir
from pipeline.run.setup import setup_run
from pipeline.train.causal_lm import CausalLMTrainer
from pipeline.train.master_weights import check_master_weights
from pipeline.train.trainer_steps import evaluate_and_save, train_and_save

logger = logging.getLogger("pipeline.pt")


def pack(
    dataset: Dataset, tokenizer, block_size: int, data_args: DataArguments, name: str
) -> Dataset:
    packed = dataset.map(
        functools.partial(tokenize_and_pack, tokenizer=tokenizer, block_size=block_size),
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=data_args.preprocessing_num_workers,
        load_from_cache_file=not data_args.overwrite_cache,
        desc=f"packing {name}",
    )
    lengths = pc.list_value_length(packed.data.column("input_ids"))
    short = len(packed) - pc.sum(pc.equal(lengths, block_size)).as_py()
    logger.info(
        "%s: %d documents -> %d tokens in %d blocks of %d (%d shorter final blocks, "
        "padded with ignored labels)",
        name,
        len(dataset),
        pc.sum(lengths).as_py(),
        len(packed),
        block_size,
        short,
    )
    return packed


def build_datasets(
    data_args: DataArguments, block_size: int, tokenizer, training_args
) -> tuple[Dataset, Dataset | None]:
    def load(directory: str, flag: str) -> Dataset:
        dataset, report = load_text_dataset(directory, flag)
        logger.info(report.summary(f"{flag} documents"))
        return dataset

    with training_args.main_process_first(desc="reading and packing data"):
        train_raw, eval_raw = load_train_eval(load, data_args, training_args, "documents")
        train = pack(train_raw, tokenizer, block_size, data_args, "train")
        evaluation = (
            pack(eval_raw, tokenizer, block_size, data_args, "eval")
            if eval_raw is not None
            else None
        )
    return (
        cap(train, data_args.max_train_samples, "--max_train_samples", "blocks"),
        cap(evaluation, data_args.max_eval_samples, "--max_eval_samples", "blocks"),
    )


ARGUMENTS = STAGE_ARGUMENTS["pt"]


def parse(argv: list[str] | None = None):
    """The stage's flags, parsed and validated (no side effects)."""
    model_args, data_args, peft_args, pt_args, training_args = parse_args(ARGUMENTS, argv)
    check_common(model_args, peft_args, max_length=pt_args.block_size, length_flag="--block_size")
    resolve_checkpointing(training_args, peft_args)
    check_master_weights(model_args, peft_args, training_args)
    check_eval_data(data_args, training_args)
    return model_args, data_args, peft_args, pt_args, training_args


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, peft_args, pt_args, training_args = parse(argv)
    setup_run(training_args)
    claim_output_dir(
        training_args,
        "pt",
        model_args.model_name_or_path,
        data_args.train_source[0],
        peft_args.method,
    )
    tokenizer = load_tokenizer(model_args)
    block_size = pt_args.block_size
    if 0 < tokenizer.model_max_length < block_size and not model_args.rope_scaling:
        logger.warning(
            "--block_size %d exceeds the tokenizer's model_max_length %d; using %d",
            block_size,
            tokenizer.model_max_length,
            tokenizer.model_max_length,
        )
        block_size = tokenizer.model_max_length
    train_dataset, eval_dataset = build_datasets(data_args, block_size, tokenizer, training_args)
    model = load_model(
        model_args,
        peft_args,
        tokenizer,
        head="lm",
        gradient_checkpointing=training_args.gradient_checkpointing,
        max_length=block_size,
        trainable_dtype=trainable_dtype(training_args),
    )
    trainer = CausalLMTrainer(
        model=model,
        args=training_args,
        data_collator=PackedBlockCollator(pad_token_id=tokenizer.pad_token_id),
        blocks=True,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    if training_args.do_train:
        train_and_save(trainer, training_args)
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_save(trainer, with_perplexity=True)


if __name__ == "__main__":
    run_cli(main)
