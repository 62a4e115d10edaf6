"""The flags the seed documents' readers type (the staged README, FastChat's Yuan2 scripts, the ChatGLM and
GLM-4 demos), read as this project's flags before parsing. Each translation is logged once with the flag it
becomes; a flag that cannot mean anything here is refused in one sentence naming what to use.

- renamed: `--evaluation_strategy` (transformers' old name), `--lora_target_modules` (comma or space list),
  `--q_lora`, `--warmup_ratio` (transformers 5 reads a `--warmup_steps` below 1 as a ratio);
- FastChat's multi-turn loss switches: `--efficient_loss True` / `--last_response_loss True` /
  `--split_example_loss True` are `--multi_turn_mode all|last|split` (exactly one may be True);
- PPO's `--batch_size` (prompts a step), `--max_target_length` (answer budget) and `--max_source_length`
  (prompt budget: `--model_max_length` is prompt + answer);
- what training already does: `--device_map auto` (each process holds its model on its own device),
  `--model_type auto` (detected from the checkpoint), `--lazy_preprocess True` (data is tokenized once, up
  front), PT's `--packing True` (PT always packs);
- a bare boolean (`--bf16`, `--use_peft`) means True.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

RENAMED = {"evaluation_strategy": "eval_strategy", "lora_target_modules": "target_modules", "q_lora": "qlora",
           "warmup_ratio": "warmup_steps"}
LOSS_MODES = {"efficient_loss": "all", "last_response_loss": "last", "split_example_loss": "split"}
ALREADY = {  # flag: (the value that means what happens anyway, what happens)
    "device_map": ("auto", "each training process holds its model on its own device"),
    "model_type": ("auto", "the model type is read from the checkpoint's config"),
    "lazy_preprocess": ("true", "the data is tokenized once before training (--preprocessing_num_workers processes)"),
    "packing": ("true", "PT always packs its text into --block_size rows"),
}
REFUSED = {
    "early_stopping": "PPO here steers the KL with --target_kl (adaptive KL) and stops on --max_steps; drop "
                      "--early_stopping",
    "reward_baseline": "PPO here centers rewards with --whiten_rewards True and a learned value baseline; drop "
                       "--reward_baseline",
}
_SAID: set[str] = set()


def _say(flag: str, text: str) -> None:
    if flag not in _SAID:
        _SAID.add(flag)
        logger.info("--%s (as the seed documents spell it) %s", flag, text)


def _fields(dataclass_types) -> dict[str, type]:
    out = {}
    for kind in dataclass_types:
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            out[f.name] = hints.get(f.name, f.type)
    return out


def _is_bool(kind) -> bool:
    args = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union else ()
    return kind is bool or (bool in args and all(a in (bool, type(None)) for a in args))


def _split(argv: list[str]) -> list[tuple[str, list[str]]]:
    """argv as (flag, values) pairs; `--flag=value` split; a leading non-flag token kept as ("", [token])."""
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
        if name in ALREADY and (values or ["true"])[0].lower() == ALREADY[name][0] and (name != "packing" or name not in known):
            _say(name, f"{ALREADY[name][0]}: {ALREADY[name][1]}, so it changes nothing")
        elif name in ALREADY and name not in known:
            raise UserError(f"--{name} {' '.join(values)} cannot apply here: {ALREADY[name][1]}; drop it "
                            f"(or give --{name} {ALREADY[name][0]}).")
        elif name in known:
            if _is_bool(known[name]) and not values:
                values = ["true"]  # a bare --bf16 / --use_peft, store-true style
            out.append((name, values))
        elif name in RENAMED and RENAMED[name] in known:
            target = RENAMED[name]
            if target == "target_modules":
                values = [",".join(v.strip(",") for v in values)]
            _say(name, f"is read as --{target}")
            out.append((target, values or ["true"]))
        elif name in LOSS_MODES and "multi_turn_mode" in known:
            if _truthy(name, values):
                modes.append(name)
        elif name in REFUSED:
            raise UserError(f"--{name} has no counterpart here: {REFUSED[name]}.")
        else:
            out.append((name, values))
    out += _ppo_lengths(out, known)
    if len(modes) > 1:
        raise UserError(f"{' and '.join('--' + m for m in modes)} are both True; FastChat allows one (they are "
                        "--multi_turn_mode all, last and split here).")
    if modes:
        _say(modes[0], f"True is read as --multi_turn_mode {LOSS_MODES[modes[0]]}")
        out.append(("multi_turn_mode", [LOSS_MODES[modes[0]]]))
    return [tok for name, values in out for tok in ([f"--{name}"] if name else []) + values]


def _ppo_lengths(pairs: list, known: dict) -> list:
    """PPO's seed flags: --batch_size, --max_target_length and --max_source_length, where the stage has no
    field of that name (RM and DPO read the two lengths themselves)."""
    extra, values = [], {name: vals for name, vals in pairs}
    if "max_new_tokens" not in known:
        return extra
    for name, target in (("batch_size", "per_device_train_batch_size"), ("max_target_length", "max_new_tokens")):
        if name in values and name not in known:
            _say(name, f"is read as --{target}")
            extra.append((target, values[name]))
    if "max_source_length" in values and "max_source_length" not in known:
        answer = (values.get("max_target_length") or values.get("max_new_tokens") or ["64"])[0]
        total = int(values["max_source_length"][0]) + int(answer)
        _say("max_source_length", f"plus the answer budget ({answer}) is read as --model_max_length {total}")
        extra.append(("model_max_length", [str(total)]))
    pairs[:] = [(n, v) for n, v in pairs if n not in ("batch_size", "max_target_length", "max_source_length")
                or n in known]
    return extra
