"""The flags the seed documents' readers type (the staged README, FastChat's Yuan2 scripts, the
ChatGLM and GLM-4 demos), read as this project's flags before parsing. Each translation is logged
once with the flag it becomes; a flag that cannot mean anything here is refused in one sentence
naming what to use.

- renamed: `--evaluation_strategy` (transformers' old name), `--lora_target_modules` (comma or space
  list), `--q_lora`, `--warmup_ratio` (transformers 5 reads a `--warmup_steps` below 1 as a ratio);
- FastChat's multi-turn loss switches: `--efficient_loss True` / `--last_response_loss True` /
  `--split_example_loss True` are `--multi_turn_mode all|last|split` (exactly one may be True);
- PPO's `--batch_size` (prompts a step), `--max_target_length` (answer budget) and
  `--max_source_length` (prompt budget: `--model_max_length` is prompt + answer); SFT's
  `--max_source_length` + `--max_target_length` (the GLM demos' max_input_length/max_output_length)
  as `--model_max_length`;
- FastChat's `--data_path` / `--eval_data_path` (one JSON file each) are `--train_file` /
  `--validation_file`;
- what training already does: `--device_map auto` (each process holds its model on its own device),
  `--model_type auto` (detected from the checkpoint), `--lazy_preprocess True` (data is tokenized
  once, up front), PT's `--packing True` (PT always packs);
- ChatGLM-6B's P-Tuning `--pre_seq_len N` (P-Tuning v2, N virtual tokens) and
  `--quantization_bit 4|8`; FastChat's `--lora_r`;
- a bare boolean (`--bf16`, `--use_peft`) means True.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

RENAMED = {
    "evaluation_strategy": "eval_strategy",
    "lora_target_modules": "target_modules",
    "q_lora": "qlora",
    "warmup_ratio": "warmup_steps",
    "data_path": "train_file",
    "eval_data_path": "validation_file",
    "lora_r": "lora_rank",
}
LOSS_MODES = {"efficient_loss": "all", "last_response_loss": "last", "split_example_loss": "split"}
ALREADY = {  # flag: (the value that means what happens anyway, what happens)
    "device_map": ("auto", "each training process holds its model on its own device"),
    "model_type": ("auto", "the model type is read from the checkpoint's config"),
    "lazy_preprocess": (
        "true",
        "the data is tokenized once before training (--preprocessing_num_workers processes)",
    ),
    "packing": ("true", "PT always packs its text into --block_size rows"),
}
REFUSED = {
    "early_stopping": "PPO here steers the KL with --target_kl (adaptive KL) and stops on "
    "--max_steps; drop --early_stopping",
    "reward_baseline": "PPO here centers rewards with --whiten_rewards True and a learned value "
    "baseline; drop --reward_baseline",
    "dataset_name": "hub data sets are not downloaded by the stages; save the data set's records "
    "as .json/.jsonl files and give them with --train_file_dir (a folder) or --train_file",
    "dataset_path": "it names a folder that ChatGLM-Tuning's tokenize_dataset_rows.py tokenized; "
    "give the JSON lines file itself with --train_file "
    "(tokenizing happens here, with the model's chat template)",
}


def _expand(name: str, values: list[str], known: dict) -> list[tuple[str, list[str]]] | None:
    """ChatGLM-6B's P-Tuning flags as several of this project's: `--pre_seq_len N` (P-Tuning v2 with
    N virtual tokens) and `--quantization_bit 4|8`; None for any other flag."""
    if name == "pre_seq_len" and "num_virtual_tokens" in known:
        _say(
            name,
            f"{values[0] if values else ''} is read as --use_peft True --peft_type prefix_tuning "
            f"--num_virtual_tokens {values[0] if values else ''}",
        )
        return [
            ("use_peft", ["true"]),
            ("peft_type", ["prefix_tuning"]),
            ("num_virtual_tokens", values),
        ]
    if name == "quantization_bit" and "load_in_4bit" in known:
        if values not in (["4"], ["8"]):
            raise UserError(
                f"--quantization_bit takes 4 or 8, got {' '.join(values) or 'nothing'}."
            )
        _say(name, f"{values[0]} is read as --load_in_{values[0]}bit True")
        return [(f"load_in_{values[0]}bit", ["true"])]
    return None


_SAID: set = set()
_PENDING: list[tuple[logging.Logger, str]] = []


def note(log: logging.Logger, key, text: str) -> None:
    """Queue `text` once per process (per `key`). Parsing has no side effects and runs before
    logging is set up, so the queued notes are said by say_notes(), which setup_logging calls."""
    if key not in _SAID:
        _SAID.add(key)
        _PENDING.append((log, text))


def say_notes() -> None:
    while _PENDING:
        log, text = _PENDING.pop(0)
        log.info("%s", text)


def _say(flag: str, text: str) -> None:
    note(logger, flag, f"--{flag} (as the seed documents spell it) {text}")


def _fields(dataclass_types) -> dict[str, type]:
    out = {}
    for kind in dataclass_types:
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            out[f.name] = hints.get(f.name, f.type)
    return out


def _is_bool(kind) -> bool:
    args = (
        typing.get_args(kind)
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
        else ()
    )
    return kind is bool or (bool in args and all(a in (bool, type(None)) for a in args))


def _split(argv: list[str]) -> list[tuple[str, list[str]]]:
    """argv as (flag, values) pairs; `--flag=value` split; a leading non-flag token kept as ("",
    [token])."""
    out: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            out.append((name, [value] if eq else []))
        elif out:
            out[-1][1].append(token)
        else:
            out.append(("", [token]))
    return out


def _truthy(flag: str, values: list[str]) -> bool:
    text = (values[0] if values else "true").lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise UserError(f"--{flag} takes True or False, got {values[0]!r}.")
    return text in ("true", "1", "yes")


def translate(argv: list[str], dataclass_types) -> list[str]:
    """argv with the seed documents' flags read as this project's (see the module docstring)."""
    known = _fields(dataclass_types)
    pairs, out, modes = _split(argv), [], []
    for name, values in pairs:
        if (
            name in ALREADY
            and (values or ["true"])[0].lower() == ALREADY[name][0]
            and (name != "packing" or name not in known)
        ):
            _say(name, f"{ALREADY[name][0]}: {ALREADY[name][1]}, so it changes nothing")
        elif name in ALREADY and name not in known:
            raise UserError(
                f"--{name} {' '.join(values)} cannot apply here: {ALREADY[name][1]}; drop it "
                f"(or give --{name} {ALREADY[name][0]})."
            )
        elif name in known:
            if _is_bool(known[name]) and not values:
                values = ["true"]  # a bare --bf16 / --use_peft, store-true style
            out.append((name, values))
        elif name == "warmup_ratio" and "warmup_steps" in known:
            # read in place: with --warmup_steps also given the later one wins, as a command-line
            # flag wins over a config file's
            _say(name, "is read as --warmup_steps (a value below 1 is a share of the steps)")
            out.append(("warmup_steps", [_warmup_share(values)]))
        elif name in RENAMED and RENAMED[name] in known:
            target = RENAMED[name]
            if target == "target_modules":
                values = [",".join(v.strip(",") for v in values)]
            _say(name, f"is read as --{target}")
            out.append((target, values or ["true"]))
        elif name in LOSS_MODES and "multi_turn_mode" in known:
            if _truthy(name, values):
                modes.append(name)
        elif (expanded := _expand(name, values, known)) is not None:
            out += expanded
        elif name in REFUSED:
            raise UserError(f"--{name} has no counterpart here: {REFUSED[name]}.")
        else:
            out.append((name, values))
    out += _lengths(out, known)
    if len(modes) > 1:
        raise UserError(
            f"{' and '.join('--' + m for m in modes)} are both True; FastChat allows one (they are "
            "--multi_turn_mode all, last and split here)."
        )
    if modes:
        _say(modes[0], f"True is read as --multi_turn_mode {LOSS_MODES[modes[0]]}")
        out.append(("multi_turn_mode", [LOSS_MODES[modes[0]]]))
    return [tok for name, values in out for tok in ([f"--{name}"] if name else []) + values]


def _warmup_share(values: list[str]) -> str:
    """--warmup_ratio as transformers 5's --warmup_steps: a share in [0, 1), since 1 or more is a
    number of steps there (1.0, the whole run, becomes the largest share below 1)."""
    try:
        (share,) = (float(v) for v in values)
    except ValueError:
        share = math.nan
    if not 0 <= share <= 1:
        raise UserError(
            f"--warmup_ratio must be a share of the training steps, >= 0 and <= 1, got "
            f"{' '.join(values) or 'nothing'}."
        )
    return repr(math.nextafter(1.0, 0.0)) if share == 1 else repr(share)


def _lengths(pairs: list, known: dict) -> list:
    """The seeds' length flags where the stage has no field of that name (RM and DPO read them
    themselves): PPO's --batch_size (prompts a step), --max_target_length (answer budget) and
    --max_source_length (prompt budget); SFT's --max_source_length + --max_target_length (the GLM
    demos' max_input_length and max_output_length), which bound a sample together."""
    extra, values = [], {name: vals for name, vals in pairs}
    names = ("batch_size", "max_target_length", "max_source_length")
    if "max_source_length" in known or not any(n in values for n in names):
        return extra
    if "kl_coef" in known:  # PPO and GRPO
        for name, target in (
            ("batch_size", "per_device_train_batch_size"),
            ("max_target_length", "max_new_tokens"),
        ):
            if name in values and name not in known:
                _say(name, f"is read as --{target}")
                extra.append((target, values[name]))
        if "max_source_length" in values:
            answer = (values.get("max_target_length") or values.get("max_new_tokens") or ["64"])[0]
            extra.append(
                _total(
                    "max_source_length", values["max_source_length"][0], answer, "the answer budget"
                )
            )
        handled = names
    elif "model_max_length" in known and (
        "max_source_length" in values or "max_target_length" in values
    ):
        if ("max_source_length" in values) != ("max_target_length" in values):
            raise UserError(
                "give both --max_source_length and --max_target_length (a sample may hold both), "
                "or --model_max_length alone."
            )
        extra.append(
            _total(
                "max_source_length",
                values["max_source_length"][0],
                values["max_target_length"][0],
                "--max_target_length",
            )
        )
        handled = ("max_target_length", "max_source_length")
    else:
        return extra
    pairs[:] = [(n, v) for n, v in pairs if n not in handled or n in known]
    return extra


def _total(flag: str, source: str, answer: str, what: str) -> tuple[str, list[str]]:
    try:
        total = int(source) + int(answer)
    except ValueError as e:
        raise UserError(
            f"--{flag} and the answer length take whole numbers, got {source!r} and {answer!r}."
        ) from e
    _say(flag, f"plus {what} ({answer}) is read as --model_max_length {total}")
    return "model_max_length", [str(total)]
