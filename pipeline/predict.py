"""Command alias: `python -m pipeline.predict` runs pipeline.eval.predict (see that module for the
flags)."""

from pipeline.eval.predict import main

if __name__ == "__main__":
    from pipeline.errors import run_cli

    run_cli(main)
