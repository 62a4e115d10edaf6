"""A stage's config file (YAML or JSON) as flags: `stage.py config.yaml --flag value`,
`--config FILE`, or the GLM demos' positional `DATA_DIR MODEL CONFIG [yes|STEP]` with their nested
sections (pipeline/seed_configs.py). The file's flags come first, so the command line overrides
them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.json_text import loads
from pipeline.errors import UserError, first_line
from pipeline.seed_configs import flatten, is_nested, positional

SUFFIXES = (".yaml", ".yml", ".json")


def config_file_argv(argv: list[str]) -> list[str]:
    """argv with its config file (if any) replaced by the file's flags, placed first."""
    config_path, data_dir = None, None
    form = positional(argv)
    if form:
        config_path, data_dir, argv = form
    elif argv and not argv[0].startswith("-") and argv[0].endswith(SUFFIXES):
        config_path, argv = argv[0], argv[1:]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a file path.")
        config_path = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    return (
        _config_to_argv(_config_flags(config_path, data_dir), config_path) if config_path else []
    ) + argv


def _config_to_argv(config: dict[str, Any], path: str) -> list[str]:
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, dict):
            raise UserError(f"{path}: key '{key}' holds a mapping; flags take scalars or lists.")
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}"] + [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    return argv


def _config_flags(path: str, data_dir: str | None) -> dict[str, Any]:
    """A config file's flags; the GLM demos' nested form flattened; DATA_DIR of the positional form
    is the training folder of a flat config."""
    config = _load_config(path)
    if is_nested(config):
        return flatten(config, path, data_dir)
    if data_dir and not any(key in config for key in ("train_file_dir", "train_file")):
        config["train_file_dir"] = data_dir
    return config


def _load_config(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise UserError(f"config file {path} does not exist.")
    try:
        text = Path(path).read_text(encoding="utf-8")
        config = loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"config file {path} cannot be read as UTF-8 text ({first_line(e)})."
        ) from e
    except json.JSONDecodeError as e:
        raise UserError(f"config file {path}:{e.lineno}: not valid JSON ({e.msg}).") from e
    except (
        RecursionError,
        ValueError,
    ) as e:  # YAML nested beyond Python's stack, or an integer of 5,000 digits
        raise UserError(
            f"config file {path}: {type(e).__name__} while reading it ({first_line(e)[:80]}); "
            "simplify it."
        ) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(
            f"config file {where}: not valid YAML ({getattr(e, 'problem', None) or first_line(e)})."
        ) from e
    if not isinstance(config, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values.")
    return config
