"""Preview how a data file will be trained, without training: the rendered text and the token/label
table.

    python -m pipeline.preview --file data/sft/color_qa.jsonl --template_name qwen \
        --tokenizer_name_or_path outputs/tiny-llama [--index 0] [--multi_turn_mode all|last|split]
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from pipeline.command_line import command_parser
from pipeline.data.chat_dataset import sanity_table
from pipeline.data.conversations import FORMATS, InvalidSample, normalize
from pipeline.data.files import iter_json_records
from pipeline.data.masking import MULTI_TURN_MODES, Dropped, cut_to_whole_turns, encode_samples
from pipeline.data.rendering import NotPrefixConsistent, render, render_segments
from pipeline.data.templates import apply_template_to_tokenizer, resolve_template
from pipeline.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(
        description="Show the rendered text and token/label table of one record."
    )
    parser.add_argument("--file", required=True)
    parser.add_argument("--template_name", default="auto")
    parser.add_argument(
        "--chat_template_kwargs",
        default=None,
        help="JSON object given to every render of the template.",
    )
    parser.add_argument("--tokenizer_name_or_path", required=True)
    parser.add_argument("--index", type=int, default=0, help="which record (0-based)")
    parser.add_argument("--data_format", default="auto", choices=FORMATS)
    parser.add_argument("--multi_turn_mode", default="all", choices=MULTI_TURN_MODES)
    parser.add_argument("--model_max_length", type=int, default=None)
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"--file {args.file} does not exist.")
    tokenizer = AutoTokenizer.from_pretrained(
        args.tokenizer_name_or_path, trust_remote_code=args.trust_remote_code
    )
    template = resolve_template(args.template_name, tokenizer, args.chat_template_kwargs)
    apply_template_to_tokenizer(tokenizer, template)
    records = list(iter_json_records(path))
    if not 0 <= args.index < len(records):
        raise UserError(f"--index {args.index} is out of range: {path} has {len(records)} records.")
    line, record = records[args.index]
    try:
        conv = normalize(record, args.data_format)
    except InvalidSample as e:
        raise UserError(f"{path}:{line}: {e}") from e
    print(
        f"== {path}:{line} with template '{template.name}'\n"
        f"{_whole_text(template, tokenizer, conv)}"
    )
    for k, sample in enumerate(
        encode_samples(
            template, tokenizer, conv, args.multi_turn_mode, False, args.model_max_length
        )
    ):
        if isinstance(sample, Dropped):
            print(f"\n== sample {k}: dropped ({sample.reason})")
            continue
        cut = f", {cut_to_whole_turns(args.model_max_length)}" if sample.truncated else ""
        print(f"\n== sample {k}: {len(sample.input_ids)} tokens{cut}")
        print(sanity_table(tokenizer, sample.input_ids, sample.labels))


def _whole_text(template, tokenizer, conv: dict) -> str:
    """The conversation as the template writes it; one that rewrites history is shown as the saved
    chat template renders it (its samples, below, are one answer each)."""
    try:
        return "".join(
            s.text for s in render_segments(template, conv["messages"], conv.get("tools"))
        )
    except NotPrefixConsistent:
        note = (
            "(the template rewrites earlier turns once later ones follow: "
            "each answer is trained in its own sample)"
        )
        return render(tokenizer, conv["messages"], conv.get("tools"), form=template) + "\n" + note


if __name__ == "__main__":
    run_cli(main)
