"""Build the embedded default model: a tiny random-init Llama and a byte-level BPE tokenizer.

No weights can be downloaded here, so the demo and the tests start from this folder. It is saved
with `save_pretrained` and loads like any hub checkpoint. Deterministic: the same data and seed give
the same files.

    python -m pipeline.tiny_model --output_dir outputs/tiny-llama
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.command_line import command_parser
from pipeline.data.files import read_text, walk_files
from pipeline.errors import UserError, run_cli
from pipeline.tools import synthetic

REPO_DATA = Path(__file__).resolve().parents[2] / "data"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Special tokens used by the chat templates of common families, so that a template can be applied
# to the tiny model without resizing. Templates needing others get them added at load time.
CHAT_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|end|>",
    "<start_of_turn>",
    "<end_of_turn>",
]


def corpus(data_dir: Path) -> list[str]:
    """Every shipped text (pretraining docs, chats, preferences) plus the synthetic task's
    strings."""
    texts: list[str] = []
    for path in walk_files(
        data_dir, "--data_dir"
    ):  # through symbolic links; what cannot be read is refused
        if path.suffix == ".txt":
            texts += [line for line in read_text(path).splitlines() if line.strip()]
        elif path.suffix in (".json", ".jsonl"):
            texts.append(read_text(path))
    items = synthetic.all_items()
    texts += synthetic.pt_lines(items)
    texts += [synthetic.question(i, lang) for i in items for lang in ("en", "zh")]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [UNK, BOS, EOS, PAD] + CHAT_SPECIAL_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=CHAT_SPECIAL_TOKENS,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def build(
    output_dir: str | Path,
    data_dir: str | Path = REPO_DATA,
    vocab_size: int = 3000,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    out = Path(output_dir)
    if not Path(data_dir).is_dir():
        raise UserError(
            f"--data_dir {data_dir} is not a folder; "
            "point it at a folder of .txt/.json/.jsonl files."
        )
    tokenizer = train_tokenizer(corpus(Path(data_dir)), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "tiny_model_info.json").write_text(
        json.dumps({"params": n_params, "vocab_size": len(tokenizer), "seed": seed}, indent=2)
        + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/tiny-llama")
    parser.add_argument("--data_dir", default=str(REPO_DATA))
    parser.add_argument("--vocab_size", type=int, default=3000)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build(
        args.output_dir,
        args.data_dir,
        args.vocab_size,
        args.hidden_size,
        args.num_layers,
        args.seed,
    )
    info = json.loads((out / "tiny_model_info.json").read_text())
    print(f"tiny model saved to {out}: {info['params']:,} parameters, vocab {info['vocab_size']}")


if __name__ == "__main__":
    run_cli(main)
