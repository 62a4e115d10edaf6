"""A model folder is whole before anything loads it: its JSON files parse and its safetensors files
are complete.

A copy cut short (a full disk, an interrupted download or rsync) otherwise ends deep inside a
library in a traceback ("Error while deserializing header", "Expecting value: line 1 column 1"). The
check reads only the JSON files and each safetensors header (8 bytes of length, then the header's
JSON with every tensor's byte range), so it costs milliseconds however large the weights are. Every
command that loads a local model or adapter folder calls `check_folder_whole` first.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pipeline.errors import UserError

JSON_FILES = (
    "config.json",
    "adapter_config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    "adapter_model.safetensors.index.json",
)
_HEADER_LIMIT = 100 * 2**20  # safetensors refuses headers above 100 MB as well


def read_json_file(path: Path, what: str) -> object:
    """A JSON file's content, or one sentence naming the file, line and problem."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} {path} is not UTF-8 text (byte {e.start}); the file is damaged: copy it again."
        ) from e
    except json.JSONDecodeError as e:
        raise UserError(
            f"{what} {path}:{e.lineno}: not valid JSON ({e.msg}); the file is damaged or was cut "
            "short: copy it again (or re-save the model)."
        ) from e
    except (RecursionError, ValueError) as e:
        raise UserError(
            f"{what} {path} cannot be read as JSON ({type(e).__name__}); copy it again."
        ) from e


def check_safetensors(path: Path, what: str) -> None:
    """The file holds its whole header and every byte the header promises."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(
                f"{what} {path} is truncated ({size} bytes, not even a safetensors header); copy "
                "it again."
            )
        (length,) = struct.unpack("<Q", head)
        if length > min(_HEADER_LIMIT, size - 8):
            raise UserError(
                f"{what} {path} is damaged or truncated (its header claims {length} bytes, the "
                f"file has {size}); copy it again or re-save the model."
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        end = max(
            (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0
        )
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise UserError(
            f"{what} {path} has a damaged safetensors header; copy it again or re-save the model."
        ) from e
    if size < 8 + length + end:
        raise UserError(
            f"{what} {path} is truncated: {size} of {8 + length + end} bytes; copy it again (a "
            "full disk or an interrupted copy cuts files short)."
        )


_whole: set[tuple] = (
    set()
)  # folders found whole, by their files' names, sizes and modification times


def check_folder_whole(folder: str | Path, what: str) -> None:
    """Check a local model, adapter or checkpoint folder (a hub id, which is not a local folder,
    passes). A stage loads one folder several times (tokenizer, config, policy, reference...): each
    unchanged folder is read once per process."""
    root = Path(folder)
    if not root.is_dir():
        return
    files = [root / n for n in JSON_FILES if (root / n).is_file()] + sorted(
        root.glob("*.safetensors")
    )
    key = (
        str(root.resolve()),
        tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files),
    )
    if key in _whole:
        return
    _check(root, what)
    _whole.add(key)


def _check(root: Path, what: str) -> None:
    for name in JSON_FILES:
        if (root / name).is_file():
            content = read_json_file(root / name, what)
            if name.endswith(".index.json"):
                missing = (
                    sorted(
                        {
                            s
                            for s in (content.get("weight_map") or {}).values()
                            if not (root / s).is_file()
                        }
                    )
                    if isinstance(content, dict)
                    else []
                )
                if missing:
                    raise UserError(
                        f"{what} {root} misses {missing[0]} (named in {name}); copy the whole "
                        "folder again."
                    )
    for weights in sorted(root.glob("*.safetensors")):
        check_safetensors(weights, what)
