"""Helpers shared by the tests: repository paths, reading tensorboard scalars, a quick SFT run."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def read_scalars(logdir: Path, tag: str) -> list[float]:
    """Values of one scalar tag from the tensorboard event files under logdir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars(tag)]
    return values


def train_sft(model: Path, out: Path, steps: int, *extra: str) -> Path:
    """Full SFT of `model` on the learnable task (qwen template) for `steps` steps; returns
    `out`."""
    from stages import sft

    sft.main(
        [
            "--model_name_or_path",
            str(model),
            "--template_name",
            "qwen",
            "--train_file_dir",
            str(DATA / "sft"),
            "--validation_split_percentage",
            "0",
            "--output_dir",
            str(out),
            "--use_peft",
            "False",
            "--learning_rate",
            "3e-3",
            "--max_steps",
            str(steps),
            "--per_device_train_batch_size",
            "16",
            "--model_max_length",
            "128",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--seed",
            "0",
            *extra,
        ]
    )
    return out


def changed_parameters(model, reference_state: dict) -> list[str]:
    """Names of the trainable parameters of `model` that differ from `reference_state` (name ->
    tensor)."""
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad
        and name in reference_state
        and not p.detach().cpu().equal(reference_state[name].cpu())
    ]


def lora_b_norms(adapter_file: Path) -> list[float]:
    """Norms of the LoRA B matrices saved in an adapter file (they start at zero, so > 0 means
    trained)."""
    from safetensors.torch import load_file

    return [
        t.float().norm().item()
        for name, t in load_file(str(adapter_file)).items()
        if "lora_B" in name
    ]


def slow_tokenizer(folder, special: list[str] | None = None):
    """A real SentencePiece tokenizer without offsets (transformers' Python SentencePiece backend,
    as the remote-code tokenizers of ChatGLM3, Baichuan2, Yuan2 and InternLM2 are), trained on the
    repository's text the way Llama-2's model was (identity normalization, a dummy prefix,
    whitespace kept)."""
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from pipeline.model.tiny_model import REPO_DATA, corpus

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "sp.model").is_file():
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(corpus(REPO_DATA))),
            model_prefix=str(folder / "sp"),
            vocab_size=2000,
            model_type="bpe",
            character_coverage=0.9995,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            bos_id=1,
            eos_id=2,
            unk_id=0,
            pad_id=-1,
            minloglevel=2,
        )
    tokenizer = SentencePieceBackend(
        vocab_file=str(folder / "sp.model"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if special:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": special}, replace_extra_special_tokens=False
        )
    return tokenizer
