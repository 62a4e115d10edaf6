"""Merge a LoRA adapter into its base model; the output is the next stage's --model_name_or_path.

    python merge_peft_adapter.py --base_model outputs/base --tokenizer_path outputs/base \
        --lora_model outputs/pt --output_dir outputs/pt-merged
    python merge_peft_adapter.py --lora_model outputs/pt \
        --output_dir outputs/pt-merged   # the base it recorded

Without --base_model the adapter's recorded base is used: the folder named in its
adapter_config.json, or that path relative to the adapter, or a folder of the same name beside it
(both folders copied elsewhere together).
"""

import argparse
import logging

from pipeline.command_line import command_parser
from pipeline.errors import run_cli
from pipeline.model.merge import merge_adapter


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(description="Merge a LoRA adapter into its base model.")
    parser.add_argument(
        "--base_model",
        default=None,
        help="Base model folder or hub id the adapter was trained on "
        "(default: the one it records).",
    )
    parser.add_argument(
        "--tokenizer_path",
        default=None,
        help="Tokenizer to save with the merged model; "
        "the adapter folder's own tokenizer wins if present.",
    )
    parser.add_argument(
        "--lora_model", required=True, help="Adapter folder (holds adapter_config.json)."
    )
    parser.add_argument("--output_dir", required=True, help="Where the merged model is written.")
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="Allow model code from the checkpoint."
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = merge_adapter(
        args.base_model,
        args.lora_model,
        args.output_dir,
        args.tokenizer_path,
        args.trust_remote_code,
    )
    print(f"merged model saved to {out}")


if __name__ == "__main__":
    run_cli(main)
