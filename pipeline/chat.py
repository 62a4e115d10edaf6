"""Command alias: `python -m pipeline.chat` runs pipeline.infer.cli (see that module for the
flags)."""

from pipeline.infer.cli import main

if __name__ == "__main__":
    from pipeline.errors import run_cli

    run_cli(main)
