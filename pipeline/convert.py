"""Command alias: `python -m pipeline.convert` runs pipeline.tools.convert (see that module for the
flags)."""

from pipeline.tools.convert import main

if __name__ == "__main__":
    from pipeline.errors import run_cli

    run_cli(main)
