"""Reading user data files: discovery, decoding, validation, and the pretraining text dataset.

Every problem a user can cause (missing folder, empty file, unsupported extension, bytes that are not
UTF-8, a line that is not JSON, a record without its field) is raised as one `UserError` sentence that
names the file and line, before any model is loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".json", ".jsonl")


def find_files(directory: str, flag: str, extensions: tuple[str, ...] = TEXT_EXTENSIONS) -> list[Path]:
    """All data files under `directory` (recursive, sorted); anything else there is an error."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{flag} {directory} is not a folder; point it at a folder of {'/'.join(extensions)} files.")
    files, foreign = [], []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        (files if path.suffix.lower() in extensions else foreign).append(path)
    if foreign:
        raise UserError(
            f"{foreign[0]} has an unsupported extension; {flag} takes {', '.join(extensions)} files: "
            "convert it or move it out of the folder."
        )
    if not files:
        raise UserError(f"{flag} {directory} holds no {'/'.join(extensions)} files.")
    return files


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{line_no}: byte {e.start} is not valid UTF-8; re-encode the file as UTF-8 "
                    f"(for example: iconv -f GBK -t UTF-8 {path.name})."
                ) from e


def iter_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, object) for a JSON-lines file, or (item number, object) for a JSON array file."""
    if path.suffix.lower() == ".json":
        with path.open("rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):
            text = "\n".join(line for _, line in _decoded_lines(path))
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the array syntax.") from e
            yield from enumerate(items, start=1)
            return
    for line_no, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{line_no}: not a valid JSON line ({e.msg} at column {e.colno}); "
                "each line must hold one complete JSON object."
            ) from e


def iter_text_documents(path: Path) -> Iterator[tuple[int, str]]:
    """Pretraining documents: one per non-blank line of .txt, or the "text" field of each JSON record."""
    if path.suffix.lower() == ".txt":
        for line_no, line in _decoded_lines(path):
            if line.strip():
                yield line_no, line
        return
    for line_no, record in iter_json_records(path):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(f'{path}:{line_no}: expected an object with a string "text" field, e.g. {{"text": "..."}}.')
        if text.strip():
            yield line_no, text


@dataclass
class ReadReport:
    """What was read, and what was left out and why; printed by every stage before training."""

    files: int = 0
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    @property
    def kept(self) -> int:
        return self.read - sum(self.dropped.values())

    def summary(self, name: str) -> str:
        parts = [f"{name}: {self.files} files, {self.read} read, {self.kept} kept"]
        parts += [f"{n} dropped ({reason})" for reason, n in sorted(self.dropped.items())]
        return ", ".join(parts)


def _text_generator(files: list[str], stamps: list[tuple[int, int]]):
    # `stamps` (size, mtime) is unused here but part of the cache key, so edited files are re-read.
    for path in files:
        for _, text in iter_text_documents(Path(path)):
            yield {"text": text}


def load_text_dataset(directory: str, flag: str, cache_dir: str | None = None) -> tuple[Dataset, ReadReport]:
    """Validate every file (fails fast with file:line), then build a datasets.Dataset of {"text"}."""
    files = find_files(directory, flag)
    report = ReadReport(files=len(files))
    for path in files:
        n = sum(1 for _ in iter_text_documents(path))
        if n == 0:
            raise UserError(f"{path} is empty (no non-blank documents); remove it or fill it.")
        report.read += n
    stamps = [(p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    dataset = Dataset.from_generator(
        _text_generator, gen_kwargs={"files": [str(p) for p in files], "stamps": stamps}, cache_dir=cache_dir
    )
    return dataset, report


def load_train_eval(load: Callable[[str, str], Dataset], data_args, seed: int, unit: str) -> tuple[Dataset, Dataset | None]:
    """Training data, and evaluation data from --validation_file_dir or a --validation_split_percentage split."""
    train = load(data_args.train_file_dir, "--train_file_dir")
    if data_args.validation_file_dir:
        return train, load(data_args.validation_file_dir, "--validation_file_dir")
    if data_args.validation_split_percentage > 0 and len(train) >= 2:
        n_eval = max(1, int(len(train) * data_args.validation_split_percentage / 100))
        split = train.train_test_split(test_size=n_eval, seed=seed)
        logger.info("held out %d training %s for evaluation", n_eval, unit)
        return split["train"], split["test"]
    return train, None


def cap(dataset: Dataset | None, limit: int | None) -> Dataset | None:
    """--max_train_samples / --max_eval_samples (None = all)."""
    if dataset is None or limit is None:
        return dataset
    return dataset.select(range(min(len(dataset), limit)))
