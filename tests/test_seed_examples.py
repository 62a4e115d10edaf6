"""Every example record in data/examples/sft (the seed documents' formats), and seed 000's tool
chat, trained as inference renders it, with every project template and with a slow
SentencePiece tokenizer as ChatGLM3's is: each conversation either trains with each answer after
exactly its prompt's ids, ending with the token that stops it, or is refused in one sentence (a
template that writes no tools)."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.data.conversations import read_conversations
from pipeline.data.masking import IGNORE_INDEX, Encoded, encode_samples
from pipeline.data.rendering import standard_messages
from pipeline.data.templates import apply_template_to_tokenizer, resolve_template, template_names
from pipeline.errors import UserError
from tests.helpers import DATA, slow_tokenizer

EXAMPLES = DATA / "examples" / "sft"
# seed 000's own tool chat shape (kept out of data/, whose text trains the tiny tokenizer every test
# uses)
SEED_CHAT = "chatglm3_seed_tool_chat.json"
NO_TOOLS = (
    "does not write tool definitions",
    "does not write tool calls",
    "does not write the tool call",
    "ignores tool definitions",
    "rejects a conversation",
)


def check_every_answer(template, tokenizer, conv, stop_ids) -> int:
    """Each trained answer follows the ids apply_chat_template gives for its prompt; its trained run
    ends with a stop token. Returns the number of answers checked."""
    samples = [s for s in encode_samples(template, tokenizer, conv) if isinstance(s, Encoded)]
    messages, checked = conv["messages"], 0
    form = template
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("loss") is False:
            continue
        prompt = list(
            tokenizer.apply_chat_template(
                standard_messages(messages[:i], form),
                tools=conv.get("tools"),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
        sample = next(
            s
            for s in samples
            if s.input_ids[: len(prompt)] == prompt
            and len(s.labels) > len(prompt)
            and s.labels[len(prompt)] != IGNORE_INDEX
        )
        end = len(prompt)
        while end < len(sample.labels) and sample.labels[end] != IGNORE_INDEX:
            end += 1
        assert sample.input_ids[end - 1] in stop_ids, tokenizer.decode(
            sample.input_ids[len(prompt) : end]
        )
        checked += 1
    return checked


@pytest.mark.parametrize("name", template_names())
def test_every_example_record_trains_as_inference_renders_it(tiny_model, name, tmp_path):
    (tmp_path / "examples").mkdir()
    for path in [*EXAMPLES.iterdir(), Path(__file__).parent / "data" / SEED_CHAT]:
        (tmp_path / "examples" / path.name).write_bytes(path.read_bytes())
    conversations, _ = read_conversations(str(tmp_path / "examples"), "--train_file_dir")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = resolve_template(name, tokenizer)
    stop_ids = apply_template_to_tokenizer(tokenizer, template)
    trained = 0
    for conv in conversations:
        try:
            trained += check_every_answer(template, tokenizer, conv, stop_ids)
        except UserError as e:
            calls = conv.get("tools") or any(
                m.get("tool_calls") or m["role"] == "tool" for m in conv["messages"]
            )
            assert calls and any(x in str(e) for x in NO_TOOLS), str(e)
    assert trained >= 14


def test_chatglm3_seed_tool_chat_with_a_slow_tokenizer(tmp_path):
    """Seed 000's shape (system, a thought then a tool call with parameters and observation, later
    turns with loss false) under the chatglm3 template, with a Python SentencePiece tokenizer that
    has no offsets: each answer after its prompt's own ids, the trained turn closed by a role tag or
    by EOS itself (its id, never '</s>' written as text)."""
    tokenizer = slow_tokenizer(tmp_path / "sp")
    template = resolve_template("chatglm3", tokenizer)
    stop_ids = apply_template_to_tokenizer(tokenizer, template)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chatglm3_tools.json").write_bytes(
        (EXAMPLES / "chatglm3_tools.json").read_bytes()
    )
    (tmp_path / "data" / "seed.json").write_bytes(
        (Path(__file__).parent / "data" / SEED_CHAT).read_bytes()
    )
    conversations, _ = read_conversations(str(tmp_path / "data"), "--train_file_dir")
    conversations = [c for c in conversations if c.get("tools")]
    assert len(conversations) == 2
    assert (
        sum(check_every_answer(template, tokenizer, conv, stop_ids) for conv in conversations) == 7
    )
    [sample] = encode_samples(template, tokenizer, conversations[-1])
    assert (
        sample.input_ids[-1] == tokenizer.eos_token_id
        and sample.labels[-1] == tokenizer.eos_token_id
    )
