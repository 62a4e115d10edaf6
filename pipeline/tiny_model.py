"""Command alias: `python -m pipeline.tiny_model` runs pipeline.model.tiny_model (see that module
for the flags)."""

from pipeline.errors import run_cli
from pipeline.model.tiny_model import main

if __name__ == "__main__":
    run_cli(main)
