"""Measuring saved folders: generation.py gives greedy held-out answers, exact match and reward-model
accuracy (`python -m pipeline.evaluate`), report.py the before -> after table and loss curves of a
pipeline run (`python -m pipeline.report`). Training-time evaluation is the Trainer's, or the PPO
loop's in pipeline/rl/rollout.py.
"""
