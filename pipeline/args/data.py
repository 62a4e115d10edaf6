"""What the stages read: DataArguments (files, folders, held-out share, sample caps: every stage)
and the classes the chat stages share, each flag declared once and taken by inheritance where a
stage needs it: ChatArguments (template, length, invalid records: SFT, RM, DPO, PPO, GRPO),
RecordArguments (record format and columns: SFT, PPO, GRPO), PackingArguments (padding-free rows:
SFT, RM, DPO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.args.parsing import split_list
from pipeline.data.conversations import FORMATS, column_format
from pipeline.errors import UserError


@dataclass
class DataArguments:
    train_file_dir: str | None = field(
        default=None, metadata={"help": "Folder searched recursively for data."}
    )
    validation_file_dir: str | None = field(
        default=None, metadata={"help": "Folder of held-out data."}
    )
    train_file: list[str] | None = field(
        default=None,
        metadata={
            "help": "Training data file(s), instead of --train_file_dir; several allowed (space or "
            "comma separated)."
        },
    )
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "Held-out data file(s), instead of --validation_file_dir."}
    )
    test_file: list[str] | None = field(
        default=None,
        metadata={
            "help": "SFT with --predict_with_generate True: file(s) whose answers are generated "
            "and scored after training."
        },
    )
    validation_split_percentage: float = field(
        default=1.0,
        metadata={"help": "Percent of training data held out when no validation dir is given."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Cap on training samples; -1 = all."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Cap on eval samples; -1 = all."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization."}
    )
    overwrite_cache: bool = field(
        default=False,
        metadata={
            "help": "PT: recompute its cached tokenization. The other stages never cache it "
            "(always recomputed)."
        },
    )

    def __post_init__(self):
        for name in ("train_file", "validation_file", "test_file"):
            if getattr(self, name):
                setattr(
                    self,
                    name,
                    [  # a path that holds a comma is one file, not two
                        part
                        for value in getattr(self, name)
                        for part in ([value] if Path(value).is_file() else split_list(value))
                    ],
                )
        for name in ("train", "validation"):
            if getattr(self, f"{name}_file_dir") and getattr(self, f"{name}_file"):
                raise UserError(
                    f"give --{name}_file_dir (a folder) or --{name}_file (files), not both."
                )
        if not self.train_file_dir and not self.train_file:
            raise UserError(
                "--train_file_dir is required: give the folder holding your training files (or the "
                "files themselves with --train_file)."
            )
        if not 0 <= self.validation_split_percentage < 100:
            raise UserError(
                "--validation_split_percentage must be in [0, 100), got "
                f"{self.validation_split_percentage}."
            )
        if self.has_validation and self.validation_split_percentage not in (
            0,
            type(self).validation_split_percentage,
        ):
            raise UserError(
                f"--validation_split_percentage {self.validation_split_percentage:g} holds out "
                "training data only when no held-out data is given, and "
                f"--{'validation_file_dir' if self.validation_file_dir else 'validation_file'} "
                "is given; drop one of them."
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value == 0:
                raise UserError(
                    f"--{name} 0 would leave no samples; give a positive number, or -1 for all."
                )
            if value is not None and value < 0:
                setattr(self, name, None)  # -1 (the seed's spelling) means "all"

    @property
    def train_source(self) -> tuple[str | list[str], str]:
        """(folder or list of files, the flag that gave it) of the training data."""
        return (
            (self.train_file, "--train_file")
            if self.train_file
            else (self.train_file_dir, "--train_file_dir")
        )

    @property
    def validation_source(self) -> tuple[str | list[str] | None, str]:
        if self.validation_file:
            return self.validation_file, "--validation_file"
        return self.validation_file_dir, "--validation_file_dir"

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_file_dir or self.validation_file)


@dataclass
class ChatArguments:
    template_name: str = field(
        default="auto",
        metadata={
            "help": "Chat template by name, or auto = the tokenizer's own (after SFT: the one SFT "
            "trained with, which it saves with the model)."
        },
    )
    chat_template_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "JSON object given to every render of the chat template (training, checks, the "
            "saved model), e.g. '{\"enable_thinking\": false}'."
        },
    )
    model_max_length: int = field(
        default=2048,
        metadata={
            "help": "Longest sample in tokens. SFT: whole turns kept where possible; RM/DPO: "
            "longer pairs are dropped and counted; PPO/GRPO: prompt + answer budget, longer "
            "prompts are dropped and counted."
        },
    )
    skip_invalid_samples: bool = field(
        default=False, metadata={"help": "Skip (and count) invalid records instead of stopping."}
    )

    def __post_init__(self):
        if self.model_max_length < 8:
            raise UserError(f"--model_max_length must be at least 8, got {self.model_max_length}.")


@dataclass
class RecordArguments:
    data_format: str = field(
        default="auto", metadata={"help": "Force a data format.", "choices": FORMATS}
    )
    prompt_column: str | None = field(
        default=None,
        metadata={
            "help": "Records of two text fields: the question's field (with --response_column); "
            "{content, summary} records are read without it."
        },
    )
    response_column: str | None = field(
        default=None, metadata={"help": "Records of two text fields: the answer's field."}
    )

    def __post_init__(self):
        self.data_format = column_format(self.data_format, self.prompt_column, self.response_column)


@dataclass
class PackingArguments:
    packing: bool | None = field(
        default=None,
        metadata={
            "help": "Padding-free training (default: on; off for prefix tuning, and in SFT for "
            "NEFTune). SFT packs whole samples into rows of --packing_length; RM and DPO run each "
            "step's sequences end to end."
        },
    )
