"""Generation-based evaluation of saved folders: greedy answers through the saved chat template (the
same path as chat and serving), held-out exact match, and reward-model scores of preference pairs.

    python -m pipeline.evaluate MODEL_DIR DATA_DIR [TEMPLATE]
        # prints the exact match of the last answers
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.command_line import command_parser
from pipeline.data.conversations import read_conversations
from pipeline.errors import UserError, run_cli
from pipeline.infer.chat_model import Sampling, load_chat_model
from pipeline.rl.frozen import Separate
from pipeline.rl.rewards import RewardScorer


def _device() -> str:
    """The GPU when there is one: a CPU evaluation on a many-core GPU host is the slow part of a
    pipeline run."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def greedy_answers(
    model_dir: str,
    prompts: list[list[dict]],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    template_name: str | None = None,
) -> list[str]:
    """Answer each prompt (OpenAI-style messages) with the folder's own chat template and stop
    tokens (or with `template_name`, for a model whose tokenizer has no chat template yet)."""
    chat = load_chat_model(model_dir, template_name)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    answers = []
    for start in range(0, len(prompts), batch_size):
        answers += [c.text for c in chat.generate(prompts[start : start + batch_size], sampling)]
    return [a.strip() for a in answers]


def exact_match(
    model_dir: str, conversations: list[dict], template_name: str | None = None
) -> float:
    """Share of conversations whose last assistant answer the model reproduces exactly."""
    prompts = [c["messages"][:-1] for c in conversations]
    wanted = [c["messages"][-1]["content"].strip() for c in conversations]
    got = greedy_answers(model_dir, prompts, template_name=template_name)
    return sum(g == w for g, w in zip(got, wanted)) / len(wanted)


def rewards(model, tokenizer, pairs: list[dict]) -> torch.Tensor:
    """(n, 2) rewards of chosen and rejected, each scored on the chat template's rendering of the
    conversation."""
    scorer = RewardScorer(Separate(model), tokenizer)
    out = []
    for pair in pairs:
        texts = [
            tokenizer.apply_chat_template(
                pair["prompt"] + [{"role": "assistant", "content": pair[k]}], tokenize=False
            )
            for k in ("chosen", "rejected")
        ]
        out.append(scorer(texts).cpu())
    return torch.stack(out)


def pairwise_accuracy(rm_dir: str, pairs: list[dict]) -> float:
    """Share of pairs a saved reward model (plain AutoModelForSequenceClassification) ranks
    correctly."""
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).to(_device()).eval()
    scores = rewards(model, AutoTokenizer.from_pretrained(rm_dir), pairs)
    return (scores[:, 0] > scores[:, 1]).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    """Held-out exact match of the last answer of every chat (earlier turns are the prompt, as the
    PPO stage's evaluation reads them)."""
    parser = command_parser(prog="python -m pipeline.evaluate", description=main.__doc__)
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="a trained folder: full model or adapter"
    )
    parser.add_argument("data_dir", metavar="DATA_DIR", help="a folder of chats")
    parser.add_argument(
        "template",
        metavar="TEMPLATE",
        nargs="?",
        help="render with this template, not the saved one",
    )
    args = parser.parse_args(argv)
    model_dir, data_dir = args.model_dir, args.data_dir
    convs, _ = read_conversations(data_dir, "DATA_DIR")
    answered = [c for c in convs if c["messages"][-1]["role"] == "assistant"]
    if len(answered) < len(convs):  # said on stderr: stdout carries the figure alone
        print(
            f"{len(convs) - len(answered)} of {len(convs)} chats in {data_dir} end without an "
            "assistant answer and are not scored",
            file=sys.stderr,
        )
    if not answered:
        raise UserError(f"no chat in {data_dir} ends with an assistant answer to compare against.")
    print(exact_match(model_dir, answered, args.template))


if __name__ == "__main__":
    run_cli(main)
