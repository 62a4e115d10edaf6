"""Use a trained folder: multi-turn chat in the terminal, or answers for a whole file of prompts.

The folder is a full model or an adapter (a folder with adapter_config.json, applied with peft to the
base it names). Prompts are rendered with the folder's saved chat template (or --template_name, for a
base model that has none) and generation stops on the end-of-turn tokens of its generation config.

    python -m pipeline.chat --model outputs/sft-merged                 # interactive: clear / exit
    python -m pipeline.chat --model outputs/sft --input_file prompts.jsonl --output_file answers.jsonl

An input line is {"prompt": "...", "system"?: "..."} or {"messages": [OpenAI-style messages]}; each
output line is the input record plus "answer". Greedy by default (--temperature 0). pipeline/serve.py
serves the same model over an OpenAI-compatible HTTP API.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jinja2
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BatchEncoding, GenerationConfig,
                          StoppingCriteria, TextIteratorStreamer)

from pipeline.data import iter_json_records
from pipeline.errors import UserError, run_cli
from pipeline.templates import get_template, render, template_names

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
            raise UserError(f"the model's chat template rejects these messages ({e}).") from None

    def encode(self, conversations: list[list[dict]]) -> BatchEncoding:
        # The rendered text already holds BOS where the template writes one, so none is added here.
        texts = [self.render(messages) for messages in conversations]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return batch.to(self.model.device)

    def _config(self, sampling: Sampling) -> GenerationConfig:
        config = GenerationConfig.from_dict(self.generation_config.to_dict())
        sample = sampling.temperature > 0
        config.update(max_new_tokens=sampling.max_new_tokens, do_sample=sample,
                      temperature=sampling.temperature if sample else None, top_p=sampling.top_p if sample else None,
                      top_k=config.top_k if sample else None)
        return config

    @torch.no_grad()
    def _generate(self, batch: BatchEncoding, sampling: Sampling, **kwargs) -> torch.Tensor:
        return self.model.generate(**batch, generation_config=self._config(sampling), **kwargs)

    def _completions(self, batch: BatchEncoding, output: torch.Tensor) -> list[Completion]:
        stops = set(self.generation_config.eos_token_id)
        out = []
        for row, mask in zip(output[:, batch["input_ids"].shape[1]:].tolist(), batch["attention_mask"]):
            end = next((i for i, token in enumerate(row) if token in stops), None)
            text = self.tokenizer.decode(row[:end], skip_special_tokens=True)
            out.append(Completion(text, "length" if end is None else "stop", int(mask.sum()),
                                  len(row) if end is None else end + 1))
        return out

    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[Completion]:
        """Answer a batch of conversations at once (left-padded)."""
        batch = self.encode(conversations)
        return self._completions(batch, self._generate(batch, sampling))

    def stream(self, messages: list[dict], sampling: Sampling, on_text: Callable[[str], None]) -> Completion:
        """Answer one conversation, handing each new piece of text to on_text as soon as it is decoded."""
        batch = self.encode([messages])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel, result = threading.Event(), {}

        def work() -> None:
            try:
                result["output"] = self._generate(batch, sampling, streamer=streamer, stopping_criteria=[_Cancelled(cancel)])
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
        return self._completions(batch, result["output"])[0]


# ---------------------------------------------------------------- loading

def _load(what: str, loader: Callable, source: str, **kwargs):
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {what} from {source} ({str(e).splitlines()[0]}).") from None


def _stop_ids(config: GenerationConfig, tokenizer, template_name: str | None) -> list[int]:
    """The generation config's end-of-turn ids, plus those of --template_name (a base model stops on EOS only)."""
    ids = list(config.eos_token_id) if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    if template_name:
        vocab = tokenizer.get_vocab()
        ids += [vocab[s] for s in get_template(template_name).stop if s in vocab]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids or [tokenizer.eos_token_id]


def load_chat_model(path: str, template_name: str | None = None, trust_remote_code: bool = False) -> ChatModel:
    """A full model folder, or an adapter folder applied to the base named in its adapter_config.json."""
    folder = Path(path)
    if not folder.exists() and (folder.is_absolute() or path.startswith(".")):
        raise UserError(f"--model {path} does not exist; point it at a trained folder (or a hub model id).")
    adapter = (folder / "adapter_config.json").is_file()
    base, tokenizer_source = path, path
    if adapter:
        from peft import PeftConfig  # peft (and bitsandbytes under it) take seconds to import; only adapters need it

        peft_config = PeftConfig.from_pretrained(path)
        if peft_config.task_type == "SEQ_CLS":
            raise UserError(f"{path} is a reward-model adapter; chat needs a causal LM (an SFT, DPO or PPO output).")
        base = peft_config.base_model_name_or_path
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
    model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype="auto", trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        from pipeline.models import resize_embeddings

        resize_embeddings(model, tokenizer)  # training may have added tokens (modules_to_save holds their rows)
        model = PeftModel.from_pretrained(model, path)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
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


def record_messages(record: Any, system: str | None) -> list[dict]:
    """The conversation of one input record; --system applies where the record has no system message."""
    if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
        raise ValueError('a record needs exactly one of "prompt" (a string) or "messages" (a list)')
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record.get("system", ""), str):
            raise ValueError('"prompt" and "system" must be strings')
        messages = [{"role": "user", "content": record["prompt"]}]
        system = record.get("system", system)
    else:
        messages = check_messages(record["messages"])
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages


def read_prompts(input_file: str, system: str | None) -> list[tuple[dict, list[dict]]]:
    """(record, messages) for every record of a JSON-lines file; a broken one stops with file:line."""
    path = Path(input_file)
    if not path.is_file():
        raise UserError(f"--input_file {input_file} does not exist.")
    out = []
    for line, record in iter_json_records(path):
        try:
            out.append((record, record_messages(record, system)))
        except ValueError as e:
            raise UserError(f"{path}:{line}: {e}.") from None
    if not out:
        raise UserError(f"--input_file {input_file} holds no records.")
    return out


# ---------------------------------------------------------------- the two modes

def answer_file(chat: ChatModel, prompts: list[tuple[dict, list[dict]]], output_file: str, sampling: Sampling,
                batch_size: int) -> None:
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for start in range(0, len(prompts), batch_size):
            part = prompts[start: start + batch_size]
            for (record, _), completion in zip(part, chat.generate([m for _, m in part], sampling)):
                f.write(json.dumps({**record, "answer": completion.text}, ensure_ascii=False) + "\n")
            f.flush()
            print(f"answered {start + len(part)}/{len(prompts)}", file=sys.stderr, flush=True)


def _print_piece(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def interact(chat: ChatModel, sampling: Sampling, system: str | None) -> None:
    """Read user lines from stdin and stream the answers to stdout; `clear` resets, `exit` (or EOF) quits."""
    start = [{"role": "system", "content": system}] if system is not None else []
    history = list(start)
    prompt = "user> " if sys.stdin.isatty() else ""
    print("type a message; `clear` starts over, `exit` quits", file=sys.stderr, flush=True)
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            break
        if line == "exit":
            break
        if line == "clear":
            history = list(start)
            print("(history cleared)", file=sys.stderr, flush=True)
        elif line:
            history.append({"role": "user", "content": line})
            completion = chat.stream(history, sampling, _print_piece)
            print(flush=True)
            history.append({"role": "assistant", "content": completion.text})


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with pipeline.serve (where the sampling ones are defaults for requests that omit them)."""
    parser.add_argument("--model", required=True, help="a trained folder: full model or adapter")
    parser.add_argument("--template_name", default=None, help="render with this template instead of the saved one")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Chat with a trained folder, or answer a file of prompts.")
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt (batch: for records that have none)")
    parser.add_argument("--input_file", default=None, help="JSON lines of {prompt, system?} or {messages}")
    parser.add_argument("--output_file", default=None, help="JSON lines: each input record plus answer")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    if (args.input_file is None) != (args.output_file is None):
        raise UserError("--input_file and --output_file go together; give both for batch mode, or neither to chat.")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}.")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    prompts = read_prompts(args.input_file, args.system) if args.input_file else None
    chat = load_chat_model(args.model, args.template_name, args.trust_remote_code)
    if prompts is None:
        interact(chat, sampling, args.system)
    else:
        answer_file(chat, prompts, args.output_file, sampling, args.batch_size)


if __name__ == "__main__":
    run_cli(main)
