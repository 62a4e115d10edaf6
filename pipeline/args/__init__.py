"""Every flag of every stage, declared once, and the checks that span flags.

    model.py      ModelArguments (the checkpoint and how it loads), PeftArguments (full,
                  LoRA/QLoRA/DoRA, prefix)
    data.py       DataArguments (files, splits, caps) and the chat stages' shared classes (template
                  and length, record format, packing)
    stages.py     each stage's own class (PTArguments ... GroupRelativeArguments) and
                  STAGE_ARGUMENTS, the table of which classes each stage parses
    training.py   the TrainingArguments subclasses, one per kind of loop
    parsing.py    parse_args: config file, the seeds' spellings, negative numbers, unknown flags
                  refused
    checks.py     checks across flags and classes (ranges, folders, precision, DeepSpeed, model +
                  method)
    rl_checks.py  the own RL loops' checks (the Trainer flags they implement, PPO vs the group
                  algorithms)

A flag is checked where it is declared (its class's __post_init__) when it needs nothing else; a
check that needs two classes runs right after parsing (checks.py, rl_checks.py), before any data or
weights are read.
Import the names from here: `from pipeline.args import SFTArguments, parse_args`.
"""

from pipeline.args.checks import (
    check_common,
    check_eval_data,
    resolve_checkpointing,
    resolve_packing,
)
from pipeline.args.data import ChatArguments, DataArguments, PackingArguments, RecordArguments
from pipeline.args.model import ModelArguments, PeftArguments
from pipeline.args.parsing import given_flags, parse_args, split_list
from pipeline.args.stages import (
    DPO_LOSSES,
    REFERENCE_FREE,
    STAGE_ARGUMENTS,
    DPOArguments,
    GroupRelativeArguments,
    PPOArguments,
    PreferenceArguments,
    PTArguments,
    SFTArguments,
)
from pipeline.args.training import (
    CausalLMTrainingArguments,
    PipelineTrainingArguments,
    PPOTrainingArguments,
    RLTrainingArguments,
    RMTrainingArguments,
    trainable_dtype,
)

__all__ = [
    "DPO_LOSSES",
    "REFERENCE_FREE",
    "STAGE_ARGUMENTS",
    "CausalLMTrainingArguments",
    "ChatArguments",
    "DPOArguments",
    "DataArguments",
    "GroupRelativeArguments",
    "ModelArguments",
    "PPOArguments",
    "PPOTrainingArguments",
    "PTArguments",
    "PackingArguments",
    "PeftArguments",
    "PipelineTrainingArguments",
    "PreferenceArguments",
    "RLTrainingArguments",
    "RMTrainingArguments",
    "RecordArguments",
    "SFTArguments",
    "check_common",
    "check_eval_data",
    "given_flags",
    "parse_args",
    "resolve_checkpointing",
    "resolve_packing",
    "split_list",
    "trainable_dtype",
]
