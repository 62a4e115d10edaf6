"""Generated answers to held-out conversations, scored with ROUGE-1/2/L and BLEU-4
(text_metrics.py), as the ChatGLM3 / GLM-4 fine-tuning demos' `predict_with_generate` does.

The last assistant answer of each conversation is the label; the messages before it (and its tools)
are the prompt, rendered with the model's own chat template and answered greedily through the one
generation path (pipeline/infer). A conversation that does not end with an assistant answer in text
is not scored; how many is said in the log.

    python -m pipeline.predict --model outputs/sft --data data/sft_eval \
        --output_dir outputs/sft-predict

writes generated_predictions.jsonl ({"prompt": messages, "label": ..., "predict": ...} per line) and
predict_results.json (predict_rouge-1, ..., predict_bleu-4, all x100). The SFT stage's
--predict_with_generate does the same with the model being trained (GenerationEval below):
eval_rouge-1 ... at every evaluation.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from transformers import GenerationConfig, TrainerCallback

from pipeline.args.checks import check_writable_folder
from pipeline.command_line import command_parser
from pipeline.data.conversations import read_conversations
from pipeline.data.files import shown
from pipeline.data.templates import render
from pipeline.errors import UserError, run_cli
from pipeline.eval.text_metrics import check_installed, score_texts
from pipeline.infer.chat_model import ChatModel, Sampling, load_chat_model
from pipeline.model.adapters import unwrap
from pipeline.model.attention import PACKED_VARLEN

logger = logging.getLogger("pipeline.predict")
PREDICTIONS, RESULTS = "generated_predictions.jsonl", "predict_results.json"


@dataclass
class HeldOut:
    """Conversations to answer: each ends with the assistant answer that is its label."""

    conversations: list[dict]
    skipped: Counter = field(default_factory=Counter)  # conversations not scored, by reason

    @property
    def labels(self) -> list[str]:
        return [c["messages"][-1]["content"] for c in self.conversations]


def held_out(conversations: list[dict], where: str, limit: int | None = None) -> HeldOut:
    """The conversations that end with an assistant answer in text (the first `limit` of them); the
    others are counted by reason and said in the log. None left is an error."""
    held = HeldOut([])
    for conversation in conversations:
        last = conversation["messages"][-1]
        if last["role"] != "assistant":
            held.skipped["end without an assistant answer"] += 1
        elif last.get("tool_calls"):
            held.skipped["end with a tool call, not an answer in text"] += 1
        else:
            held.conversations.append(conversation)
    for reason, n in held.skipped.items():
        logger.info(
            "%d of %d chats in %s %s and are not scored", n, len(conversations), where, reason
        )
    if not held.conversations:
        raise UserError(
            f"no chat in {where} ends with an assistant answer to compare generated answers "
            "against."
        )
    if limit is not None and limit < len(held.conversations):
        logger.info(
            "generating answers for the first %d of %d chats in %s (--max_eval_samples)",
            limit,
            len(held.conversations),
            where,
        )
        held.conversations = held.conversations[:limit]
    return held


def prompt_text(chat: ChatModel, conversation: dict) -> str:
    """The conversation up to its last answer, rendered as the model's prompt for that answer (tools
    included)."""
    messages, tools = conversation["messages"][:-1], conversation.get("tools") or None
    if chat.template_name:
        return render(chat.template_name, messages, add_generation_prompt=True, tools=tools)
    try:
        return chat.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
    except jinja2.TemplateError as e:
        raise UserError(f"the model's chat template rejects a held-out conversation ({e}).") from e


def generate_answers(
    chat: ChatModel,
    conversations: list[dict],
    max_new_tokens: int,
    batch_size: int,
    **generate_kwargs,
) -> list[str]:
    """Greedy answers (stripped) of the conversations' last turns, `batch_size` prompts at a time;
    `generate_kwargs` go to `model.generate`."""
    sampling, texts = (
        Sampling(max_new_tokens=max_new_tokens),
        [prompt_text(chat, c) for c in conversations],
    )
    answers = []
    for start in range(0, len(texts), batch_size):
        batch = chat.tokenize(texts[start : start + batch_size])
        answers += [c.text.strip() for c in chat.answer(batch, sampling, **generate_kwargs)]
    return answers


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


def write_predictions(path: Path, held: HeldOut, predictions: list[str]) -> None:
    """One {"prompt": messages before the answer, "label", "predict"} line per conversation."""
    rows = (
        {"prompt": c["messages"][:-1], "label": label, "predict": predicted}
        for c, label, predicted in zip(held.conversations, held.labels, predictions)
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    except OSError as e:
        raise UserError(
            f"cannot write {path} ({e.strerror or e}); give an --output_dir you can write to."
        ) from e


# -------------------------------------------------------------- during SFT: the model being trained


def check_predict_with_generate(data_args, training_args) -> None:
    """--predict_with_generate needs held-out conversations (a validation folder or files, or
    --test_file): the eval set of a --validation_split_percentage split is tokenized training data,
    no longer conversations."""
    check_installed()
    if not data_args.has_validation and data_args.validation_split_percentage > 0:
        raise UserError(
            "--predict_with_generate True generates the answers of held-out conversations, which a "
            "--validation_split_percentage split of the training data does not keep; give "
            "--validation_file_dir (or --validation_file), or --validation_split_percentage 0 with "
            "--test_file."
        )
    if not (data_args.has_validation and training_args.do_eval) and not data_args.test_file:
        raise UserError(
            "--predict_with_generate True has no held-out conversations to answer; give "
            "--validation_file_dir (or --validation_file) or --test_file."
        )
    if training_args.fsdp:
        raise UserError(
            "--predict_with_generate True cannot generate from FSDP-sharded weights; use "
            "--deepspeed (ZeRO-2 or ZeRO-3) or drop one of the two flags."
        )


@contextmanager
def generating(trainer):
    """The model being trained, unwrapped and in eval mode (so no dropout and no gradient
    checkpointing), with an attention that takes padded batches. Under ZeRO-3 every rank gathers the
    whole weights for the time of the generation and DeepSpeed's partitioning hooks are lifted, as
    trl's online trainers do."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    engine = trainer.model_wrapped
    model = trainer.accelerator.unwrap_model(engine)
    base = unwrap(model)
    with (
        ExitStack() as restore
    ):  # undone in reverse order: attention, mode, hooks, then the gathered weights
        if is_deepspeed_zero3_enabled():
            import deepspeed
            from trl.models.utils import add_hooks, remove_hooks

            restore.enter_context(deepspeed.zero.GatheredParameters(list(engine.parameters())))
            remove_hooks(engine)
            restore.callback(add_hooks, engine)
        restore.callback(model.train, model.training)
        model.eval()
        if (
            base.config._attn_implementation == PACKED_VARLEN
        ):  # takes flattened packed rows only, no padding
            base.set_attn_implementation("sdpa")
            restore.callback(base.set_attn_implementation, PACKED_VARLEN)
        yield model


class GenerationEval(TrainerCallback):
    """--predict_with_generate for a Trainer: at every evaluation the held-out answers are generated
    with the model being trained (each rank answers a share), scored on every rank alike, added to
    the evaluation's metrics (eval_results.json) and logged as eval_rouge-1 ... (trainer_state.json,
    tensorboard)."""

    def __init__(self, trainer, held: HeldOut | None, max_new_tokens: int):
        self.trainer, self.held, self.max_new_tokens = trainer, held, max_new_tokens
        self.tokenizer = copy.deepcopy(
            trainer.processing_class
        )  # the saved tokenizer keeps its padding side
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.latest: tuple[int, list[str], dict[str, float]] | None = (
            None  # (step, predictions, metrics)
        )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.held is None:
            return
        predictions = self.predict(self.held)
        scores = score_texts(predictions, self.held.labels)
        self.latest = (state.global_step, predictions, scores)
        logs = prefixed(scores, "eval")
        if metrics is not None:
            metrics.update(logs)
        self.trainer.log(dict(logs))

    def predict(self, held: HeldOut) -> list[str]:
        """Every rank answers its share of the conversations; all ranks get all the answers, in
        order."""
        from accelerate.utils import gather_object

        rank, world = self.trainer.args.process_index, self.trainer.args.world_size
        start = time.perf_counter()
        with generating(self.trainer) as model:
            config = GenerationConfig.from_dict(
                unwrap(model).generation_config.to_dict()
            )  # the template's stops
            config.pad_token_id = self.tokenizer.pad_token_id
            chat = ChatModel(model, self.tokenizer, config)
            # the weights are whole on every rank, so no rank waits for the others' forward passes
            # (generate would under ZeRO-3, and the ranks' shares may take different numbers of
            # batches and tokens)
            mine = generate_answers(
                chat,
                held.conversations[rank::world],
                self.max_new_tokens,
                self.trainer.args.per_device_eval_batch_size,
                synced_gpus=False,
            )
        answers = dict(gather_object(list(zip(range(rank, len(held.conversations), world), mine))))
        logger.info(
            "generated %d held-out answers in %.1f s", len(answers), time.perf_counter() - start
        )
        return [answers[i] for i in range(len(held.conversations))]

    def finish(self, test: HeldOut | None) -> dict[str, float]:
        """After training: the final evaluation's answers (when it ran) and the --test_file answers
        of the final model, written into output_dir with their metrics (predict_results.json: eval_*
        and test_* keys)."""
        trainer, out = self.trainer, Path(self.trainer.args.output_dir)
        results: dict[str, float] = {}
        if self.latest is not None and self.latest[0] == trainer.state.global_step:
            _, predictions, scores = self.latest
            results.update(prefixed(scores, "eval"))
            if trainer.args.should_save:
                write_predictions(out / PREDICTIONS, self.held, predictions)
        if test is not None:
            predictions = self.predict(test)
            results.update(prefixed(score_texts(predictions, test.labels), "test"))
            if trainer.args.should_save:
                write_predictions(out / f"test_{PREDICTIONS}", test, predictions)
        if results:
            trainer.log_metrics("predict", results)
            trainer.save_metrics("predict", results)
        return results


def held_out_sources(data_args, sft_args) -> tuple[HeldOut | None, HeldOut | None]:
    """(the eval conversations, the --test_file conversations), read as the SFT stage read its
    data."""

    def read(source, flag: str, limit: int | None = None) -> HeldOut:
        conversations, _ = read_conversations(
            source, flag, sft_args.data_format, sft_args.skip_invalid_samples
        )
        return held_out(conversations, shown(source), limit)

    evaluation = (
        read(*data_args.validation_source, data_args.max_eval_samples)
        if data_args.has_validation
        else None
    )
    return evaluation, read(data_args.test_file, "--test_file") if data_args.test_file else None


# ---------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        prog="python -m pipeline.predict",
        description=(
            "Generate the last assistant answer of every held-out conversation with a trained "
            "folder and score them with ROUGE-1/2/L and BLEU-4 (jieba words, x100), as the "
            "ChatGLM3 / GLM-4 demos' predict_with_generate."
        ),
    )
    parser.add_argument("--model", required=True, help="a trained folder: full model or adapter")
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH",
        help="a folder of .json/.jsonl conversations, or one such file; repeat for more",
    )
    parser.add_argument(
        "--output_dir", required=True, help=f"where {PREDICTIONS} and {RESULTS} are written"
    )
    parser.add_argument(
        "--max_new_tokens", type=int, default=512, help="tokens generated per answer at most"
    )
    parser.add_argument("--batch_size", type=int, default=16, help="prompts answered at once")
    parser.add_argument(
        "--template_name", default=None, help="render with this template instead of the saved one"
    )
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}.")
    Sampling(max_new_tokens=args.max_new_tokens)  # a bad budget stops here, before the model loads
    check_writable_folder(args.output_dir, "--output_dir")
    check_installed()
    _log_to_stderr()
    conversations = []
    for path in args.data:  # a folder, or a file
        conversations += read_conversations([path] if Path(path).is_file() else path, "--data")[0]
    held = held_out(conversations, " ".join(args.data))
    chat = load_chat_model(args.model, args.template_name, args.trust_remote_code)
    predictions = generate_answers(chat, held.conversations, args.max_new_tokens, args.batch_size)
    metrics = prefixed(score_texts(predictions, held.labels), "predict")
    out = Path(args.output_dir)
    write_predictions(out / PREDICTIONS, held, predictions)
    (out / RESULTS).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(metrics), flush=True)
    return metrics


def _log_to_stderr() -> None:
    """The command's notes (chats not scored) on stderr; stdout carries the metrics alone."""
    root = logging.getLogger("pipeline")
    if not root.handlers:
        root.addHandler(_StderrHandler())
    root.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (the command run twice in one process, e.g. by tests
    that capture output, must not log into the closed stream of the first run)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


if __name__ == "__main__":
    run_cli(main)
