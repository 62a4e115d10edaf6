"""Command alias: `python -m pipeline.report` runs pipeline.eval.report (see that module for the
flags)."""

from pipeline.eval.report import main

if __name__ == "__main__":
    from pipeline.errors import run_cli

    run_cli(main)
