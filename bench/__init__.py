"""GPU benchmarks against the peers, side by side in one run (not tests; `--smoke` runs a tiny shape
on the CPU)."""
