"""Command alias: `python -m pipeline.synthetic` runs pipeline.tools.synthetic (see that module for
the flags)."""

from pipeline.tools.synthetic import main

if __name__ == "__main__":
    main()
