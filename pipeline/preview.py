"""Command alias: `python -m pipeline.preview` runs pipeline.tools.preview (see that module for the
flags)."""

from pipeline.tools.preview import main

if __name__ == "__main__":
    from pipeline.errors import run_cli

    run_cli(main)
