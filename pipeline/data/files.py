"""Reading user data files: discovery, decoding, validation, and the pretraining text dataset.

Every problem a user can cause (missing folder, empty file, unsupported extension, a folder or file
that cannot be listed or read, a dangling or looping symbolic link, bytes that are not UTF-8, a line
that is not JSON or is JSON past what Python parses, a record without its field) is raised as one
`UserError` sentence that names the file and line, before any model is loaded. Folders are read
through symbolic links, each once. JSON is parsed by json_text.py's `loads`, as is any other JSON
text a user wrote.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
from datasets import Dataset

from pipeline.data.json_text import JSONLimitError, loads
from pipeline.errors import UserError

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".json", ".jsonl")
BOM = "\ufeff"


HELD_OUT_NAMES = ("dev", "val", "valid", "validation", "eval", "test")


def shown(source: str | list[str]) -> str:
    """A data source as the user typed it: a folder, or files separated by spaces."""
    return " ".join(source) if isinstance(source, list) else str(source)


def find_files(
    source: str | list[str], flag: str, extensions: tuple[str, ...] = TEXT_EXTENSIONS
) -> list[Path]:
    """All data files of a source: every file under a folder (recursive, through symbolic links,
    sorted; anything else there is an error), or the listed files themselves (--train_file), each
    checked readable now."""
    if isinstance(source, list):
        files = [_named_file(Path(path), flag, extensions) for path in source]
    else:
        files = _folder_files(Path(source), flag, extensions)
    for path in files:  # fail now, naming the file, rather than after the others have been read
        _open(path).close()
    return files


def _named_file(path: Path, flag: str, extensions: tuple[str, ...]) -> Path:
    if path.is_dir():
        raise UserError(
            f"{flag} {path} is a folder; give it as {flag}_dir, or name the files in it."
        )
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist.")
    if path.suffix.lower() not in extensions:
        raise UserError(
            f"{flag} {path} has an unsupported extension; give {', '.join(extensions)} files."
        )
    return path


def _folder_files(root: Path, flag: str, extensions: tuple[str, ...]) -> list[Path]:
    if root.is_file():
        raise UserError(
            f"{flag} {root} is a file, not a folder; give it as {flag.removesuffix('_dir')} {root}."
        )
    if not root.is_dir():
        raise UserError(
            f"{flag} {root} is not a folder; point it at a folder of {'/'.join(extensions)} files."
        )
    files, foreign = [], []
    for path in walk_files(root, flag):
        (files if path.suffix.lower() in extensions else foreign).append(path)
    if foreign:
        raise UserError(
            f"{foreign[0]} has an unsupported extension; "
            f"{flag} takes {', '.join(extensions)} files: "
            "convert it or move it out of the folder."
        )
    if not files:
        raise UserError(f"{flag} {root} holds no {'/'.join(extensions)} files.")
    held_out = [p for p in files if is_held_out_name(p, root)]
    if flag == "--train_file_dir" and held_out and len(held_out) < len(files):
        train = [str(p) for p in files if p not in held_out]
        raise UserError(
            f"{flag} {root} holds held-out data ({held_out[0].name}) beside training data, "
            "and all of it would be trained; give the files apart: "
            f"--train_file {' '.join(train)} --validation_file "
            f"{held_out[0]}."
        )
    return files


def is_held_out_name(path: Path, root: Path) -> bool:
    """Whether a file's name or a folder below `root` names held-out data: its last word (split at
    "_", "-", "." and spaces, after any shard number "-00000-of-00004") is dev, val, valid,
    validation, eval or test: sft_eval.jsonl, eval/part0.jsonl, test-00000-of-00001.jsonl; not
    code_test_gen.jsonl or eval_harness_prompts/."""
    parts = [*path.relative_to(root).parent.parts, path.stem]
    return any(_last_word(part) in HELD_OUT_NAMES for part in parts)


def _last_word(name: str) -> str:
    name = re.sub(r"[-_]\d+[-_]of[-_]\d+$", "", name.lower())
    return re.split(r"[-_.\s]+", name.strip("-_. "))[-1]


def _source_files(source: str | list[str], flag: str) -> list[Path]:
    return [Path(p) for p in source] if isinstance(source, list) else walk_files(Path(source), flag)


def check_apart(data_args) -> None:
    """Training and held-out data that share a file (the same folder, or a held-out folder inside
    the training one) would report an evaluation of trained data: refused."""
    if not data_args.has_validation:
        return
    (train, train_flag), (held, held_flag) = data_args.train_source, data_args.validation_source
    trained = {p.resolve() for p in _source_files(train, train_flag)}
    shared = [p for p in _source_files(held, held_flag) if p.resolve() in trained]
    if shared:
        raise UserError(
            f"{shared[0]} is both training data ({train_flag} {shown(train)}) and held-out data "
            f"({held_flag} {shown(held)}), so the evaluation would measure what was trained"
            f"{f' ({len(shared)} files are shared)' if len(shared) > 1 else ''}; keep the "
            "held-out files out of the training data."
        )


def walk_files(root: Path, flag: str) -> list[Path]:
    """Every file under `root` in path order, following symbolic links; names starting with "." are
    skipped.

    A folder or file reached twice (through a second link) is read once, and the log says so; a link
    back into a folder that holds it (a loop), a dangling link, a folder that cannot be listed and
    anything that is neither file nor folder are refused, naming the path."""
    top = root.resolve()
    seen: dict[Path, Path] = {top: root}  # real path -> the path it was first reached by
    files: list[Path] = []
    stack = [
        ({top: root}, iter(_list_folder(root, flag)))
    ]  # (the folders down to here, real -> path; entries)
    while (
        stack
    ):  # depth first, each folder's entries by name: the order of sorted(rglob) without links
        chain, entries = stack[-1]
        path = next(entries, None)
        if path is None:
            stack.pop()
            continue
        real, is_dir = _follow(path, flag)
        if is_dir and real in chain:
            ancestor = chain[real]
            raise UserError(
                f"{path} links back to {ancestor}, a folder that holds it, "
                f"so reading {flag} would never end; "
                "remove the link or point it elsewhere."
            )
        if real in seen:
            logger.warning(
                "%s: %s is the same %s as %s (through a symbolic link); it is read once, as %s",
                flag,
                path,
                "folder" if is_dir else "file",
                seen[real],
                seen[real],
            )
            continue
        seen[real] = path
        if is_dir:
            stack.append(({**chain, real: path}, iter(_list_folder(path, flag))))
        else:
            files.append(path)
    return files


def _list_folder(folder: Path, flag: str) -> list[Path]:
    try:
        names = sorted(entry.name for entry in os.scandir(folder))
    except OSError as e:
        raise UserError(
            f"{flag}: the folder {folder} cannot be listed ({e.strerror}); "
            "give the user running this "
            f"read and execute permission on it (chmod a+rx) or move it out of {flag}."
        ) from e
    hidden = [name for name in names if name.startswith(".")]
    if hidden:
        logger.info("%s: %s: skipped hidden %s", flag, folder, ", ".join(hidden))
    return [folder / name for name in names if not name.startswith(".")]


def _follow(path: Path, flag: str) -> tuple[Path, bool]:
    """(real path, whether it is a folder) of a file or folder, through any symbolic link."""
    try:
        mode = path.stat().st_mode
        real = path.resolve(strict=True)
    except FileNotFoundError as e:
        if path.is_symlink():
            raise UserError(
                f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                "fix the link "
                f"or remove it from {flag}."
            ) from e
        raise UserError(
            f"{path} disappeared while {flag} was being read; run again once the folder is stable."
        ) from e
    except (
        OSError,
        RuntimeError,
    ) as e:  # a link that cannot be followed (a cycle of links, no permission)
        reason = e.strerror if isinstance(e, OSError) else "a cycle of symbolic links"
        raise UserError(
            f"{path} cannot be followed or read ({reason}); fix it or move it out of {flag}."
        ) from e
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise UserError(
            f"{path} is neither a file nor a folder (a device, pipe or socket); "
            f"move it out of {flag}."
        )
    return real, stat.S_ISDIR(mode)


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as e:
        raise UserError(_unreadable(path, e)) from e


def _unreadable(path: Path, error: OSError) -> str:
    return (
        f"{path} cannot be read ({error.strerror or error}); "
        "make it readable (chmod a+r) or move it away."
    )


def read_text(path: Path) -> str:
    """A whole UTF-8 file, newlines made "\\n" (as open() in text mode does); the first bad byte
    names its line."""
    with _open(path) as f:
        try:
            raw = f.read()
        except OSError as e:
            raise UserError(_unreadable(path, e)) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: byte 0x{raw[e.start]:02x} is not valid UTF-8; "
            "re-encode the file as UTF-8 "
            f"(for example: iconv -f GBK -t UTF-8 {path.name})."
        ) from e
    return text.removeprefix(BOM).replace("\r\n", "\n").replace("\r", "\n")


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, ended by LF, CRLF or a carriage return alone (old Macs;
    JSON text never holds a raw CR inside a string)."""
    line_no = 0
    with _open(path) as f:
        try:
            for raw in f:
                try:  # a byte-order mark (some Windows editors write one) is not text
                    text = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"{path}:{line_no + 1}: byte {e.start} is not valid UTF-8; "
                        "re-encode the file as UTF-8 "
                        f"(for example: iconv -f GBK -t UTF-8 {path.name})."
                    ) from e
                for line in text.split("\r"):
                    line_no += 1
                    yield line_no, line.removeprefix(BOM) if line_no == 1 else line
        except OSError as e:  # a read that fails part way (an I/O error, a file that is a folder)
            raise UserError(_unreadable(path, e)) from e


def iter_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, object) for a JSON-lines file, or (item number, object) for a JSON array
    file."""
    if path.suffix.lower() == ".json":
        with _open(path) as f:
            head = f.read(4096).removeprefix(BOM.encode()).lstrip()
        if head.startswith(b"["):
            text = "\n".join(line for _, line in _decoded_lines(path))
            try:
                items = loads(text)
            except JSONLimitError as e:
                raise UserError(f"{path}:{e.lineno}: {e.msg} (column {e.colno}); {e.fix}.") from e
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the array syntax."
                ) from e
            yield from zip(_item_lines(text, len(items)), items)
            return
    for line_no, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            yield line_no, loads(line)
        except JSONLimitError as e:
            raise UserError(f"{path}:{line_no}: {e.msg} (column {e.colno}); {e.fix}.") from e
        except json.JSONDecodeError as e:
            if path.suffix.lower() == ".json" and _one_object(path):
                raise UserError(
                    f"{path} holds one JSON object written over several lines; a .json file "
                    "holds an array of records ([{...}, {...}]) or one record per line: put it "
                    "in [ ] or on one line."
                ) from e
            raise UserError(
                f"{path}:{line_no}: not a valid JSON line ({e.msg} at column {e.colno}); "
                "each line must hold one complete JSON object."
            ) from e


def _item_lines(text: str, count: int) -> list[int]:
    """The line on which each item of a JSON array starts (the text has been parsed already)."""
    decoder, skip = json.JSONDecoder(), re.compile(r"[\s,]*")
    at = text.index("[") + 1
    lines, line = [], 1 + text.count("\n", 0, at)
    for _ in range(count):
        start = skip.match(text, at).end()
        line += text.count("\n", at, start)
        lines.append(line)
        at = decoder.raw_decode(text, start)[1]
        line += text.count("\n", start, at)
    return lines


def _one_object(path: Path) -> bool:
    try:
        return isinstance(loads("\n".join(line for _, line in _decoded_lines(path))), dict)
    except json.JSONDecodeError:
        return False


def iter_text_documents(path: Path) -> Iterator[tuple[int, str]]:
    """Pretraining documents: one per non-blank line of .txt, or the "text" field of each JSON
    record (blank ones included)."""
    if path.suffix.lower() == ".txt":
        for line_no, line in _decoded_lines(path):
            if line.strip():
                yield line_no, line
        return
    for line_no, record in iter_json_records(path):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(
                f'{path}:{line_no}: expected an object with a string "text" field, '
                f'e.g. {{"text": "..."}}.'
            )
        yield line_no, text  # blank texts too: the reader counts them as dropped


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
            if text.strip():
                yield {"text": text}


def load_text_dataset(
    source: str | list[str], flag: str, cache_dir: str | None = None
) -> tuple[Dataset, ReadReport]:
    """Validate every file (fails fast with file:line), then build a datasets.Dataset of
    {"text"}."""
    files = find_files(source, flag)
    report = ReadReport(files=len(files))
    for path in files:
        texts = [text for _, text in iter_text_documents(path)]
        blank = sum(1 for text in texts if not text.strip())
        if len(texts) == blank:
            raise UserError(f"{path} is empty (no non-blank documents); remove it or fill it.")
        report.read += len(texts)
        if blank:
            report.drop('an empty "text"', blank)
    stamps = [(p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    dataset = Dataset.from_generator(
        _text_generator,
        gen_kwargs={"files": [str(p) for p in files], "stamps": stamps},
        cache_dir=cache_dir,
    )
    return dataset, report


def load_train_eval(
    load: Callable[[str, str], Dataset], data_args, training_args, unit: str
) -> tuple[Dataset, Dataset | None]:
    """Training data, and evaluation data from --validation_file_dir / --validation_file or a
    --validation_split_percentage split (refused when evaluation during training needs it and one
    sample cannot be split)."""
    seed = training_args.seed
    train = load(*data_args.train_source)
    if data_args.has_validation:
        evaluation = load(*data_args.validation_source)
        check_apart(data_args)
        if getattr(training_args, "process_index", 0) == 0:  # said once, by one process
            warn_shared_records(train, evaluation, unit, "the held-out data")
        return train, evaluation
    if data_args.validation_split_percentage > 0 and len(train) >= 2:
        n_eval = max(1, int(len(train) * data_args.validation_split_percentage / 100))
        split = train.train_test_split(test_size=n_eval, seed=seed)
        logger.info("held out %d training %s for evaluation", n_eval, unit)
        if getattr(training_args, "process_index", 0) == 0:
            warn_shared_records(
                split["train"], split["test"], unit, "the split held out (the data repeats them)"
            )
        return split["train"], split["test"]
    # imported here: the argument classes read this package (pipeline.args.data)
    from pipeline.args.checks import eval_strategy_name, evaluates_during_training

    if data_args.validation_split_percentage > 0 and evaluates_during_training(training_args):
        raise UserError(
            f"--validation_split_percentage {data_args.validation_split_percentage} cannot hold "
            f"out data from {len(train)} training {unit}, and --eval_strategy "
            f"{eval_strategy_name(training_args)} evaluates during training; give "
            "--validation_file_dir or --eval_strategy no."
        )
    if data_args.validation_split_percentage > 0:
        logger.warning(
            "--validation_split_percentage %s: no evaluation, %d training %s cannot be split "
            "(give --validation_file_dir for held-out data)",
            data_args.validation_split_percentage,
            len(train),
            unit,
        )
    return train, None


def warn_shared_records(train: Dataset, held: Dataset, unit: str, what: str) -> int:
    """Held-out records that are also training records, field for field (files apart can still
    repeat records: a copy of the data set, an exported split): said in the log with their count,
    since an evaluation on them measures memory, not generalization. Returns the count. Rows are
    compared by a 64-bit hash of their fields, read 10,000 at a time (a large corpus is never held
    as Python objects)."""
    trained = set(_row_hashes(train))
    shared = sum(h in trained for h in _row_hashes(held))
    if shared:
        logger.warning(
            "%d of the %d %s in %s are also in the training data, field for field: their "
            "evaluation measures what was trained; remove them from one side",
            shared,
            len(held),
            unit,
            what,
        )
    return shared


def _row_hashes(dataset: Dataset, chunk: int = 10_000) -> Iterator[int]:
    if not isinstance(dataset, Dataset):
        return
    names = sorted(dataset.column_names)
    arrow = dataset.with_format("arrow")  # the rows a split, select or shuffle keeps
    for start in range(0, len(dataset), chunk):
        table = arrow[start : start + chunk]
        columns = []
        for name in names:
            column = table.column(name).combine_chunks()
            if pa.types.is_list(column.type) and pa.types.is_integer(column.type.value_type):
                # token ids: each row's slice of the flat values, as bytes (no Python lists)
                cuts = column.offsets.to_numpy()
                flat = column.values.to_numpy(zero_copy_only=False)
                columns.append([flat[a:b].tobytes() for a, b in zip(cuts[:-1], cuts[1:])])
            else:
                columns.append(
                    [json.dumps(v, sort_keys=True, default=str) for v in column.to_pylist()]
                )
        yield from (hash(row) for row in zip(*columns))


def cap(dataset: Dataset | None, limit: int | None, flag: str, unit: str) -> Dataset | None:
    """--max_train_samples / --max_eval_samples (None = all); a cap that leaves some out is
    logged."""
    if dataset is None or limit is None:
        return dataset
    if limit < len(dataset):
        logger.info("%s %d: %d of the %d %s are used", flag, limit, limit, len(dataset), unit)
    return dataset.select(range(min(len(dataset), limit)))
