"""Command alias: `python -m pipeline.webui` runs pipeline.infer.webui (see that module for the
flags)."""

from pipeline.infer.webui import main

if __name__ == "__main__":
    from pipeline.errors import run_cli

    run_cli(main)
