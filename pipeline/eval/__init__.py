"""Measuring saved folders: evaluate.py gives greedy held-out answers, exact match and reward-model
accuracy (`python -m pipeline.evaluate`), predict.py generated answers scored with ROUGE/BLEU
(text_metrics.py) during SFT and after it (`python -m pipeline.predict`), report.py the before ->
after table and loss curves of a pipeline run (`python -m pipeline.report`). Training-time
evaluation is otherwise the Trainer's, or the RL loop's in pipeline/rl/rollout.py.
"""
