"""Command alias: `python -m pipeline.serve` runs pipeline.infer.server (see that module for the
flags)."""

from pipeline.infer.server import main

if __name__ == "__main__":
    from pipeline.errors import run_cli

    run_cli(main)
