"""A trained folder ready to answer: loading (full model or adapter), prompt rendering with its chat
template, and answers through the one generation path (pipeline/infer/generation.py), whole or streamed.

The folder is a full model or an adapter (a folder with adapter_config.json, applied with peft to the
base it names). Prompts are rendered with the folder's saved chat template (or --template_name, for a
base model that has none) and generation stops on the end-of-turn tokens of its generation config.
cli.py (terminal chat, batch files) and server.py (OpenAI-compatible HTTP) use it.
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
    finish_reason: str  # "stop": an end-of-turn token was generated; "length": max_new_tokens ran out
    prompt_tokens: int
    completion_tokens: int


class _Cancelled(StoppingCriteria):
    """Ends a streamed generation early when its reader has gone (e.g. the HTTP client disconnected)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as e:
            raise UserError(f"the model's chat template rejects these messages ({e}).") from e

    def encode(self, conversations: list[list[dict]]) -> BatchEncoding:
        return self.tokenize([self.render(messages) for messages in conversations])

    def tokenize(self, texts: list[str]) -> BatchEncoding:
        """Rendered prompts as a left-padded batch; the text already holds BOS where the template writes one,
        so none is added here."""
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return batch.to(self.model.device)

    def answer(self, batch: BatchEncoding, sampling: Sampling, **kwargs) -> list[Completion]:
        """Answer an encoded batch (from `encode`); `kwargs` go to `model.generate` (a streamer, stopping criteria)."""
        config = sampling_config(self.generation_config, sampling.max_new_tokens, sampling.temperature, sampling.top_p)
        out = generate(self.model, batch["input_ids"], batch["attention_mask"], config, **kwargs)
        completions = []
        for row, mask, ended, prompt_mask in zip(out.responses, out.mask, out.ended, batch["attention_mask"]):
            n = int(mask.sum())
            text = self.tokenizer.decode(row[:n - 1] if ended else row[:n], skip_special_tokens=True)
            completions.append(Completion(text, "stop" if ended else "length", int(prompt_mask.sum()), n))
        return completions

    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[Completion]:
        """Answer a batch of conversations at once (left-padded)."""
        return self.answer(self.encode(conversations), sampling)

    def stream(self, prompt: list[dict] | BatchEncoding, sampling: Sampling, on_text: Callable[[str], None],
               stopping_criteria: list[StoppingCriteria] | None = None) -> Completion:
        """Answer one conversation (its messages, or already encoded), handing each new piece of text to on_text
        as soon as it is decoded; `stopping_criteria` can end it early (the server's timeout and disconnect check)."""
        batch = prompt if isinstance(prompt, BatchEncoding) else self.encode([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel, result = threading.Event(), {}

        def work() -> None:
            try:
                result["output"] = self.answer(batch, sampling, streamer=streamer,
                                             stopping_criteria=[_Cancelled(cancel), *(stopping_criteria or ())])[0]
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

def _load(what: str, loader: Callable, source: str, **kwargs):
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {what} from {source} ({first_line(e)}).") from e


def _stop_ids(config: GenerationConfig, tokenizer, template_name: str | None) -> list[int]:
    """The generation config's end-of-turn ids, plus those of --template_name (a base model stops on EOS only)."""
    ids = list(config.eos_token_id) if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    if template_name:
        vocab = tokenizer.get_vocab()
        ids += [vocab[s] for s in get_template(template_name).stop if s in vocab]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids or [tokenizer.eos_token_id]


def load_chat_model(path: str, template_name: str | None = None, trust_remote_code: bool = False,
                    num_gpus: int = 1) -> ChatModel:
    """A full model folder, or an adapter folder applied to the base named in its adapter_config.json; on one
    GPU (or the CPU), or its layers spread over the first `num_gpus` GPUs."""
    if num_gpus < 1 or num_gpus > max(torch.cuda.device_count(), 1):
        raise UserError(f"--num_gpus {num_gpus}: this machine has {torch.cuda.device_count()} GPUs; give a number from "
                        f"1 to {max(torch.cuda.device_count(), 1)}.")
    folder = Path(path)
    if not folder.exists() and (folder.is_absolute() or path.startswith(".")):
        raise UserError(f"--model {path} does not exist; point it at a trained folder (or a hub model id).")
    check_folder_whole(folder, "--model")
    adapter = (folder / "adapter_config.json").is_file()
    base, tokenizer_source = path, path
    if adapter:
        from peft import PeftConfig  # peft (and bitsandbytes under it) take seconds to import; only adapters need it

        peft_config = PeftConfig.from_pretrained(path)
        if peft_config.task_type == "SEQ_CLS":
            raise UserError(f"{path} is a reward-model adapter; chat needs a causal LM (an SFT, DPO or PPO output).")
        base = peft_config.base_model_name_or_path
        check_folder_whole(base, f"the base model named in {folder / 'adapter_config.json'}")
        tokenizer_source = path if (folder / "tokenizer_config.json").is_file() else base
    tokenizer = _load("a tokenizer", AutoTokenizer.from_pretrained, tokenizer_source, trust_remote_code=trust_remote_code)
    if template_name:
        get_template(template_name)  # an unknown name fails here, before the model loads
    elif not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {tokenizer_source} has no chat template; pass --template_name "
                        f"(one of {', '.join(template_names())}).")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    what = f"the base model named in {folder / 'adapter_config.json'}" if adapter else "a causal LM"
    config = _load(what, AutoConfig.from_pretrained, base, trust_remote_code=trust_remote_code)
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise UserError(f"{base} is a reward model; chat needs a causal LM (an SFT, DPO or PPO output).")
    spread = {"device_map": "auto", "max_memory": {i: torch.cuda.mem_get_info(i)[0] for i in range(num_gpus)}} \
        if num_gpus > 1 else {}
    model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype="auto", trust_remote_code=trust_remote_code,
                                                 **spread)
    if adapter:
        from peft import PeftModel

        from pipeline.model.loading import resize_embeddings

        resize_embeddings(model, tokenizer)  # training may have added tokens (modules_to_save holds their rows)
        model = PeftModel.from_pretrained(model, path)
    if not spread:
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    # An adapter folder carries the stop tokens its training set; without one, the base model's apply.
    config = GenerationConfig.from_pretrained(path) if (folder / "generation_config.json").is_file() else \
        GenerationConfig.from_dict(model.generation_config.to_dict())
    config.eos_token_id = _stop_ids(config, tokenizer, template_name)
    config.pad_token_id = tokenizer.pad_token_id if config.pad_token_id is None else config.pad_token_id
    return ChatModel(model, tokenizer, config, template_name)


# ---------------------------------------------------------------- prompts

def _text(content: Any, i: int) -> str:
    """A message's text: a string, or OpenAI content parts of type text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
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
        raise ValueError("the last message must be from the user (or a tool result), for the model to answer it")
    return out


def add_model_arguments(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    """Flags shared with pipeline.serve (where the sampling ones are defaults for requests that omit them)."""
    parser.add_argument("--model", required=model_required, help="a trained folder: full model or adapter")
    parser.add_argument("--template_name", default=None, help="render with this template instead of the saved one")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--num_gpus", "--num-gpus", type=int, default=1,
                        help="places the model on this many GPUs, its layers spread over them (1: one GPU, or the CPU)")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
