"""A trained folder ready to answer: loading (full model or adapter), prompt rendering with its chat
template, and answers through the one generation path (pipeline/infer/generation.py), whole or
streamed.

The folder is a full model or an adapter (a folder with adapter_config.json, applied with peft to
the base it names, found from any working directory, or --base_model), in full precision or 4/8-bit,
with RoPE optionally stretched (--rope_scaling). Prompts are rendered with the folder's saved chat
template (or --template_name, for a base model that has none) and generation stops on the
end-of-turn tokens of its generation config. cli.py (terminal chat, batch files) and server.py
(OpenAI-compatible HTTP) use it.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    GenerationConfig,
    StoppingCriteria,
    TextIteratorStreamer,
)

from pipeline.data.templates import get_template, render, template_names
from pipeline.errors import UserError, first_line
from pipeline.infer.generation import generate, sampling_config
from pipeline.model.integrity import check_folder_whole
from pipeline.model.stops import with_template_stops

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Sampling:
    """How to generate: temperature 0 means greedy decoding."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if not 0 <= self.temperature <= 2:
            raise UserError(f"temperature must be between 0 and 2, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}.")


@dataclass
class Completion:
    text: str
    finish_reason: (
        str  # "stop": an end-of-turn token was generated; "length": max_new_tokens ran out
    )
    prompt_tokens: int
    completion_tokens: int


class _Cancelled(StoppingCriteria):
    """Ends a streamed generation early when its reader has gone (e.g. the HTTP client
    disconnected)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    generation_config: GenerationConfig
    template_name: str | None = None

    def render(self, messages: list[dict]) -> str:
        if self.template_name:
            return render(self.template_name, messages, add_generation_prompt=True)
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except jinja2.TemplateError as e:
            raise UserError(f"the model's chat template rejects these messages ({e}).") from e

    def encode(self, conversations: list[list[dict]]) -> BatchEncoding:
        return self.tokenize([self.render(messages) for messages in conversations])

    def tokenize(self, texts: list[str]) -> BatchEncoding:
        """Rendered prompts as a left-padded batch; the text already holds BOS where the template
        writes one, so none is added here."""
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return batch.to(self.model.device)

    def answer(self, batch: BatchEncoding, sampling: Sampling, **kwargs) -> list[Completion]:
        """Answer an encoded batch (from `encode`); `kwargs` go to `model.generate` (a streamer,
        stopping criteria)."""
        config = sampling_config(
            self.generation_config, sampling.max_new_tokens, sampling.temperature, sampling.top_p
        )
        out = generate(self.model, batch["input_ids"], batch["attention_mask"], config, **kwargs)
        completions = []
        for row, mask, ended, prompt_mask in zip(
            out.responses, out.mask, out.ended, batch["attention_mask"]
        ):
            n = int(mask.sum())
            text = self.tokenizer.decode(
                row[: n - 1] if ended else row[:n], skip_special_tokens=True
            )
            completions.append(
                Completion(text, "stop" if ended else "length", int(prompt_mask.sum()), n)
            )
        return completions

    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[Completion]:
        """Answer a batch of conversations at once (left-padded)."""
        return self.answer(self.encode(conversations), sampling)

    def stream(
        self,
        prompt: list[dict] | BatchEncoding,
        sampling: Sampling,
        on_text: Callable[[str], None],
        stopping_criteria: list[StoppingCriteria] | None = None,
    ) -> Completion:
        """Answer one conversation (its messages, or already encoded), handing each new piece of
        text to on_text as soon as it is decoded; `stopping_criteria` can end it early (the server's
        timeout and disconnect check)."""
        batch = prompt if isinstance(prompt, BatchEncoding) else self.encode([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel, result = threading.Event(), {}

        def work() -> None:
            try:
                result["output"] = self.answer(
                    batch,
                    sampling,
                    streamer=streamer,
                    stopping_criteria=[_Cancelled(cancel), *(stopping_criteria or ())],
                )[0]
            except BaseException as e:  # handed to the reader below; the streamer must still end
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            for text in streamer:
                if text:  # the streamer yields "" while a word is still incomplete
                    on_text(text)
        finally:
            cancel.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        return result["output"]


# ---------------------------------------------------------------- loading

ROPE_KINDS = ("linear", "dynamic", "yarn")


@dataclass(frozen=True)
class LoadOptions:
    """How the weights load: an adapter's base (--base_model, default: the one it records), 4/8-bit
    with bitsandbytes, RoPE stretched to --model_max_length positions (default: twice the model's)
    by --rope_scaling."""

    base_model: str | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    rope_scaling: str | None = None
    model_max_length: int | None = None

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise UserError("--load_in_4bit and --load_in_8bit exclude each other; choose one.")
        if self.rope_scaling is not None and self.rope_scaling not in ROPE_KINDS:
            raise UserError(
                f"--rope_scaling {self.rope_scaling}: choose one of {', '.join(ROPE_KINDS)}."
            )
        if self.model_max_length is not None and not self.rope_scaling:
            raise UserError(
                "--model_max_length is the context --rope_scaling stretches to; add --rope_scaling "
                f"({', '.join(ROPE_KINDS)}) or drop it."
            )

    @property
    def quantization_flag(self) -> str | None:
        return (
            "--load_in_4bit"
            if self.load_in_4bit
            else "--load_in_8bit"
            if self.load_in_8bit
            else None
        )


def _load(what: str, loader: Callable, source: str, **kwargs):
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {what} from {source} ({first_line(e)}).") from e


def _adapter_base(folder: Path, base_model: str | None):
    """The base of an adapter folder (see pipeline/model/merge.py: resolve_base), checked whole and,
    by its weights' fingerprint, the one the adapter was trained on."""
    from peft import (
        PeftConfig,
    )  # peft (and bitsandbytes under it) take seconds to import; only adapters need it

    from pipeline.model.merge import check_same_base, resolve_base

    if PeftConfig.from_pretrained(str(folder)).task_type == "SEQ_CLS":
        raise UserError(
            f"{folder} is a reward-model adapter; "
            "chat needs a causal LM (an SFT, DPO or PPO output)."
        )
    base = resolve_base(folder, base_model)
    check_folder_whole(base.path, f"the base model of {folder}")
    check_same_base(
        folder, base.path, base.given_as, "give --base_model the folder of", adapter_as="--model"
    )
    return base


def _chat_tokenizer(source: str, template_name: str | None, trust_remote_code: bool):
    tokenizer = _load(
        "a tokenizer", AutoTokenizer.from_pretrained, source, trust_remote_code=trust_remote_code
    )
    if template_name:
        get_template(template_name)  # an unknown name fails here, before the model loads
    elif not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of {source} has no chat template; pass --template_name "
            f"(one of {', '.join(template_names())})."
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _stretch_rope(config, options: LoadOptions) -> None:
    """--rope_scaling at inference means what it means in training (pipeline/model/loading.py:
    apply_rope_scaling): positions up to --model_max_length, by default twice the model's; it
    replaces any scaling the folder saved."""
    from pipeline.model.loading import apply_rope_scaling

    apply_rope_scaling(
        config, options.rope_scaling, options.model_max_length or 2 * config.max_position_embeddings
    )


def _quantized(options: LoadOptions, placement: dict) -> dict:
    """from_pretrained arguments for 4/8-bit weights, after transformers' own check that
    bitsandbytes can quantize here (it places quantized weights at load time, so never without a
    device map)."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    if (
        options.load_in_8bit
    ):  # LLM.int8() computes in float16: other inputs are cast, with a warning at every call
        dtype, quant = torch.float16, BitsAndBytesConfig(load_in_8bit=True)
    else:
        dtype = (
            torch.bfloat16
            if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            else torch.float32
        )
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    device_map = placement.get("device_map") or {"": 0 if torch.cuda.is_available() else "cpu"}
    try:
        AutoHfQuantizer.from_config(quant).validate_environment(device_map=device_map)
    except (ImportError, RuntimeError, ValueError) as e:
        raise UserError(
            f"{options.quantization_flag}: bitsandbytes cannot quantize on this machine "
            f"({first_line(e)}); drop the flag, or install bitsandbytes for this device."
        ) from e
    return {**placement, "device_map": device_map, "quantization_config": quant, "dtype": dtype}


def load_chat_model(
    path: str,
    template_name: str | None = None,
    trust_remote_code: bool = False,
    num_gpus: int = 1,
    options: LoadOptions | None = None,
) -> ChatModel:
    """A full model folder, or an adapter folder applied to its base (the one its
    adapter_config.json records, found from anywhere, or options.base_model); on one GPU (or the
    CPU), or its layers spread over the first `num_gpus`."""
    options = options or LoadOptions()
    if num_gpus < 1 or num_gpus > max(torch.cuda.device_count(), 1):
        raise UserError(
            f"--num_gpus {num_gpus}: this machine has {torch.cuda.device_count()} GPUs; give a "
            f"number from 1 to {max(torch.cuda.device_count(), 1)}."
        )
    folder = Path(path)
    if not folder.exists() and (folder.is_absolute() or path.startswith(".")):
        raise UserError(
            f"--model {path} does not exist; point it at a trained folder (or a hub model id)."
        )
    check_folder_whole(folder, "--model")
    adapter = (folder / "adapter_config.json").is_file()
    if options.base_model and not adapter:
        raise UserError(
            f"--base_model is the base of an adapter, but --model {path} is a full model (no "
            "adapter_config.json); drop --base_model."
        )
    placement = (
        {
            "device_map": "auto",
            "max_memory": {i: torch.cuda.mem_get_info(i)[0] for i in range(num_gpus)},
        }
        if num_gpus > 1
        else {}
    )
    weights = (
        _quantized(options, placement)
        if options.quantization_flag
        else {**placement, "dtype": "auto"}
    )
    base = _adapter_base(folder, options.base_model) if adapter else None
    source = base.path if base else path
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise (
            base.load_error(e)
            if base
            else UserError(f"cannot load a causal LM from {path} ({first_line(e)}).")
        ) from e
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise UserError(
            f"{source} is a reward model; chat needs a causal LM (an SFT, DPO or PPO output)."
        )
    if options.rope_scaling:
        _stretch_rope(config, options)
    tokenizer = _chat_tokenizer(
        path if not adapter or (folder / "tokenizer_config.json").is_file() else source,
        template_name,
        trust_remote_code,
    )
    model = AutoModelForCausalLM.from_pretrained(
        source, config=config, trust_remote_code=trust_remote_code, **weights
    )
    if adapter:
        from peft import PeftModel

        from pipeline.model.loading import resize_embeddings

        resize_embeddings(
            model, tokenizer
        )  # training may have added tokens (modules_to_save holds their rows)
        model = PeftModel.from_pretrained(model, path)
    if "device_map" not in weights:
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    # An adapter folder carries the stop tokens its training set; without one, the base model's
    # apply.
    generation = (
        GenerationConfig.from_pretrained(path)
        if (folder / "generation_config.json").is_file()
        else GenerationConfig.from_dict(model.generation_config.to_dict())
    )
    generation.eos_token_id = with_template_stops(
        generation, tokenizer, get_template(template_name).stop if template_name else []
    )
    generation.pad_token_id = (
        tokenizer.pad_token_id if generation.pad_token_id is None else generation.pad_token_id
    )
    return ChatModel(model, tokenizer, generation, template_name)


def load_chat_model_from_args(args: argparse.Namespace) -> ChatModel:
    """The model the flags of `add_model_arguments` describe (chat and serve load through this)."""
    options = LoadOptions(
        args.base_model,
        args.load_in_4bit,
        args.load_in_8bit,
        args.rope_scaling,
        args.model_max_length,
    )
    return load_chat_model(
        args.model, args.template_name, args.trust_remote_code, args.num_gpus, options
    )


# ---------------------------------------------------------------- prompts


def _text(content: Any, i: int) -> str:
    """A message's text: a string, or OpenAI content parts of type text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ValueError(f"message {i} needs a content: a string or a list of text parts")


def check_messages(messages: Any) -> list[dict]:
    """OpenAI-style messages reduced to role and text; ValueError names what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i} needs a role, one of {', '.join(ROLES)}")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"message {i} is a system message; only the first message may be one")
        out.append({"role": m["role"], "content": _text(m.get("content"), i)})
    if out[-1]["role"] not in ("user", "tool"):
        raise ValueError(
            "the last message must be from the user (or a tool result), for the model to answer it"
        )
    return out


def add_model_arguments(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    """Flags shared with pipeline.serve (where the sampling ones are defaults for requests that omit
    them); load the model they describe with `load_chat_model_from_args`."""
    parser.add_argument(
        "--model", required=model_required, help="a trained folder: full model or adapter"
    )
    parser.add_argument(
        "--base_model",
        default=None,
        help="an adapter's base model folder (default: the one its adapter_config.json records, "
        "also looked for relative to the adapter and beside it)",
    )
    parser.add_argument(
        "--template_name", default=None, help="render with this template instead of the saved one"
    )
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument(
        "--num_gpus",
        "--num-gpus",
        type=int,
        default=1,
        help="places the model on this many GPUs, "
        "its layers spread over them (1: one GPU, or the CPU)",
    )
    for bits in (4, 8):
        parser.add_argument(
            f"--load_in_{bits}bit",
            action="store_true",
            help=f"load the weights in {bits}-bit (bitsandbytes)",
        )
    parser.add_argument(
        "--rope_scaling",
        default=None,
        choices=ROPE_KINDS,
        help="stretch RoPE to --model_max_length positions, as in training (e.g. dynamic for a "
        "model trained with linear)",
    )
    parser.add_argument(
        "--model_max_length",
        type=int,
        default=None,
        help="the context --rope_scaling stretches to (default: twice the model's)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
