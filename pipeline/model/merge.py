"""Merge a LoRA adapter into its base model and save a plain safetensors checkpoint.

The merged folder is the next stage's --model_name_or_path: it loads with AutoModelForCausalLM (or
AutoModelForSequenceClassification for a reward-model adapter, whose trained score head is kept),
and carries the tokenizer, chat template and generation config that training used. It is written
beside the output folder and renamed into place, so an interrupted merge never looks like a finished
one.

Also here: where an adapter's base is. Training records it (`record_base`) as an absolute path when
it is a local folder, so peft, chat, serve and merge load the adapter from any working directory;
`resolve_base` also finds it relative to the adapter and beside it (both folders copied elsewhere
together), and `check_same_base` refuses a base other than the one trained on, by a fingerprint of
its weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from pipeline.errors import UserError, first_line
from pipeline.model.integrity import check_folder_whole, read_json_file
from pipeline.model.loading import check_loaded_weights, resize_embeddings

logger = logging.getLogger(__name__)


def _tokenizer_source(lora_model: Path, tokenizer_path: str | None, base_model: str) -> str:
    # The adapter folder's tokenizer is the one training used (it may carry added tokens and the
    # chat template), so it wins over --tokenizer_path; the choice is logged.
    if (lora_model / "tokenizer_config.json").is_file():
        if tokenizer_path and Path(tokenizer_path).resolve() != lora_model.resolve():
            logger.warning(
                "using the tokenizer saved with the adapter in %s (the one training used), not %s",
                lora_model,
                tokenizer_path,
            )
        return str(lora_model)
    return tokenizer_path or base_model


def merge_adapter(
    base_model: str | None,
    lora_model: str,
    output_dir: str,
    tokenizer_path: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """`base_model` None: the base the adapter records (see `resolve_base`)."""
    lora_dir, out = Path(lora_model), Path(output_dir)
    if not (lora_dir / "adapter_config.json").is_file():
        raise UserError(
            f"--lora_model {lora_model} has no adapter_config.json; "
            "point it at a LoRA output folder."
        )
    check_folder_whole(lora_dir, "--lora_model")
    base = resolve_base(lora_dir, base_model)
    base_model = base.path
    _check_output_dir(out, base_model, lora_dir)
    check_folder_whole(base_model, "--base_model")
    try:
        base_config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise base.load_error(e) from e
    if getattr(base_config, "quantization_config", None):
        raise UserError(
            f"--base_model {base_model} is quantized; merging LoRA into 4/8-bit weights loses "
            "precision. Merge into the original full-precision model instead (the one QLoRA "
            "training quantized)."
        )
    peft_config = PeftConfig.from_pretrained(lora_model)
    check_same_base(lora_dir, base_model, base.given_as, "merge into")
    if peft_config.peft_type != "LORA":
        raise UserError(
            f"--lora_model {lora_model} is a {peft_config.peft_type} adapter, which cannot be "
            "merged into weights; load it with peft's AutoPeftModelForCausalLM instead."
        )
    tokenizer = AutoTokenizer.from_pretrained(
        _tokenizer_source(lora_dir, tokenizer_path, base_model), trust_remote_code=trust_remote_code
    )
    if peft_config.task_type == "SEQ_CLS":
        base_config.num_labels = 1
        base_config.pad_token_id = tokenizer.pad_token_id
        auto_class = AutoModelForSequenceClassification
    else:
        auto_class = AutoModelForCausalLM
    base, info = auto_class.from_pretrained(
        base_model,
        config=base_config,
        dtype="auto",
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    # a reward adapter brings its trained score head (modules_to_save); a language-model base must
    # have its own
    check_loaded_weights(
        base_model,
        base_config,
        "reward" if auto_class is AutoModelForSequenceClassification else "lm",
        info["missing_keys"],
        new_head=auto_class is AutoModelForSequenceClassification,
    )
    resize_embeddings(base, tokenizer)
    merged = PeftModel.from_pretrained(base, lora_model).merge_and_unload()
    merged.config.use_cache = True
    partial = _sibling(out, "merging")
    try:
        merged.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        _save_generation_config(merged, lora_dir, base_model, partial)
        _publish(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("merged %s into %s -> %s (%s)", lora_model, base_model, out, auto_class.__name__)
    return out


FINGERPRINT = "base_model_fingerprint.json"
FINGERPRINT_TENSORS = (
    16  # tensors sampled, 8 leading values each: cheap to read even for a 70B folder
)


def base_fingerprint(
    model_dir: str | Path, names: list[str] | None = None
) -> dict[str, list[float]] | None:
    """Up to 8 leading values (float32) of a spread of the folder's tensors, or of `names`; None
    without safetensors files. Values rather than a hash of bytes, so the same base saved in another
    dtype matches."""
    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            where.update({name: file for name in f.keys()})
    if names is None:
        ordered = sorted(where)
        names = ordered[:: max(1, len(ordered) // FINGERPRINT_TENSORS)][:FINGERPRINT_TENSORS]
    out = {}
    for name in names:
        if name not in where:
            continue
        with safe_open(str(where[name]), "pt") as f:
            piece = f.get_slice(name)
            rank = len(piece.get_shape())
            values = piece[:1] if rank > 1 else piece[:8] if rank == 1 else f.get_tensor(name)
        out[name] = values.reshape(-1)[:8].float().tolist()
    return out


def record_base(adapter_dir: str | Path, base_model: str) -> None:
    """Record where the adapter's base is, so the adapter loads from anywhere, and the base's
    fingerprint (merge, chat and serve check it). A local base folder goes into adapter_config.json
    as an absolute path (peft reads that one) and into the fingerprint file also relative to the
    adapter; a hub id stays as it is."""
    adapter_dir, recorded = Path(adapter_dir), str(base_model)
    if Path(base_model).is_dir():
        recorded = str(Path(base_model).resolve())
        config_file = adapter_dir / "adapter_config.json"
        config = read_json_file(config_file, "the adapter config")
        if config.get("base_model_name_or_path") != recorded:
            config["base_model_name_or_path"] = recorded
            partial = _sibling(config_file, "writing")
            partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            os.replace(partial, config_file)  # never a half-written config
    fingerprint = base_fingerprint(base_model)
    if fingerprint is not None:
        where = {"base_model": recorded, "tensors": fingerprint}
        if Path(recorded).is_absolute():
            where["relative_to_adapter"] = os.path.relpath(recorded, adapter_dir.resolve())
        Path(adapter_dir, FINGERPRINT).write_text(json.dumps(where))


@dataclass(frozen=True)
class AdapterBase:
    """The base model an adapter applies to, and how it was found."""

    path: str  # a local folder or a hub id
    recorded: str  # base_model_name_or_path in the adapter's adapter_config.json
    adapter_config: Path
    given_as: str  # "--base_model" (given), or words saying where it was found

    def load_error(self, error: BaseException) -> UserError:
        if self.given_as == "--base_model":
            return UserError(f"cannot load --base_model {self.path} ({first_line(error)}).")
        return UserError(
            f"cannot load the base model {self.recorded} recorded in {self.adapter_config}: it is "
            "no folder here, relative to or beside the adapter, and as a hub id it fails "
            f"({first_line(error)}); pass --base_model with the base model's folder."
        )


def resolve_base(adapter_dir: str | Path, base_model: str | None = None) -> AdapterBase:
    """`base_model` (--base_model) when given; else the base adapter_config.json records, as
    recorded (absolute, or from the working directory), relative to the adapter folder, then a
    folder of the same name beside the adapter (both copied elsewhere together). A name found
    nowhere that could be a hub id is kept; anything else is refused."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    recorded = (
        read_json_file(config_file, "the adapter config").get("base_model_name_or_path") or ""
    )
    if base_model:
        if not Path(base_model).is_dir() and not _could_be_hub_id(str(base_model)):
            raise UserError(
                f"--base_model {base_model} does not exist; give the folder of the base model the "
                f"adapter was trained on ({recorded or 'not recorded'})."
            )
        return AdapterBase(str(base_model), recorded, config_file, "--base_model")
    if not recorded:
        raise UserError(
            f"{config_file} names no base model; "
            "pass --base_model with the folder it was trained on."
        )
    fingerprint = adapter_dir / FINGERPRINT
    relative = (
        read_json_file(fingerprint, "the base fingerprint").get("relative_to_adapter")
        if fingerprint.is_file()
        else None
    )
    candidates = [(Path(recorded), "as recorded")]
    candidates += [(adapter_dir / relative, "relative to the adapter")] if relative else []
    candidates += [
        (adapter_dir / recorded, "relative to the adapter"),
        (adapter_dir.resolve().parent / Path(recorded).name, "beside the adapter"),
    ]
    for folder, how in candidates:
        if folder.is_dir():
            path = str(folder) if how == "as recorded" else str(folder.resolve())
            return AdapterBase(path, recorded, config_file, f"the base found {how} at")
    if not Path(recorded).is_absolute() and _could_be_hub_id(recorded):
        return AdapterBase(recorded, recorded, config_file, "the hub id")
    raise UserError(
        f"the base model {recorded} recorded in {config_file} is not there, nor relative to the "
        f"adapter, nor beside it as {candidates[-1][0]}; "
        "pass --base_model with the base model's folder."
    )


def _could_be_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# The same weights saved in another dtype differ by at most half a bf16 step, 2**-8 of the value
# (a little more when rounded twice, float32 -> float16 -> bf16); the tolerance is a whole step,
# 2**-7. A fine-tuned copy moves the sampled values by more (four full steps at a learning rate
# of 2e-5 already do: tests/test_merge.py), so it is another base, not this one.
SAME_VALUES = {"rtol": 2**-7, "atol": 1e-6}


def check_same_base(
    lora_dir: Path,
    base_model: str,
    given_as: str = "--base_model",
    fix: str = "merge into",
    adapter_as: str = "--lora_model",
) -> None:
    """Merging into (or loading on) another base than the one trained on gives a silently wrong
    model: refuse it. `given_as` says how the base came (--base_model, or where it was found), `fix`
    what to do with the right one."""
    recorded = Path(lora_dir) / FINGERPRINT
    if not recorded.is_file():
        return  # an adapter from elsewhere: nothing to compare with
    trained = read_json_file(recorded, "the base fingerprint")
    given = base_fingerprint(base_model, list(trained["tensors"]))
    if given is None:
        return
    differs = [
        name
        for name, values in trained["tensors"].items()
        if name not in given
        or not torch.allclose(torch.tensor(values), torch.tensor(given[name]), **SAME_VALUES)
    ]
    if differs:
        advice = (
            f"{fix} {trained['base_model']}"
            if given_as == "--base_model"
            else f"pass --base_model with the folder of {trained['base_model']}"
        )
        raise UserError(
            f"{adapter_as} {lora_dir} was trained on {trained['base_model']}, but {given_as} "
            f"{base_model} holds other weights ({len(differs)} of {len(trained['tensors'])} "
            f"sampled tensors differ, e.g. {differs[0]}); {advice}."
        )


def _check_output_dir(out: Path, base_model: str, lora_dir: Path) -> None:
    if out.resolve() in (Path(base_model).resolve(), lora_dir.resolve()):
        raise UserError(
            f"--output_dir {out} is the base model or adapter folder; merge into a new folder."
        )
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise UserError(
            f"--output_dir {out} already holds files but no model (no config.json); "
            "give a new or empty folder, so nothing in it is overwritten."
        )


def _sibling(out: Path, what: str) -> Path:
    """A hidden folder beside `out`, unique to this process (also across nodes sharing the disk)."""
    return out.parent / f".{out.name}.{what}-{socket.gethostname()}-{os.getpid()}"


def _publish(partial: Path, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        # a previous merge: swap it out whole, so none of its files (e.g. shards of another size)
        # remain
        old = _sibling(out, "replaced")
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
        return
    try:
        os.replace(partial, out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
        # another process (the same pipeline on another node) published the same merge meanwhile
        logger.info("%s appeared while merging; keeping it", out)


def _save_generation_config(model, lora_dir: Path, base_model: str, out: Path) -> None:
    """Prefer the adapter folder's generation config (stop tokens set by training), else the
    base's."""
    for source in (lora_dir, Path(base_model)):
        if (source / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(source).save_pretrained(out)
            return
    if model.can_generate():
        model.generation_config.save_pretrained(out)
