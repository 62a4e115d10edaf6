"""Command alias: `python -m pipeline.evaluate` runs pipeline.eval.evaluate (see that module for the
flags)."""

from pipeline.eval.evaluate import main

if __name__ == "__main__":
    from pipeline.errors import run_cli

    run_cli(main)
