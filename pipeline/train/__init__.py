"""Training on top of the HF Trainer and trl. trainer_steps.py holds the steps every Trainer-based
stage shares after setup (train with resume, save, evaluate); causal_lm.py the PT/SFT trainer
(padding-free rows, the loss without full-vocabulary logits) with losses.py; master_weights.py the
optimizer that keeps float32 masters of bf16 weights (--master_weights optimizer); reward.py the
pairwise reward-model trainer; preference.py the DPO / KTO / SimPO / ORPO trainers; divergence.py
the guard that stops a diverged run before it is saved (the RL loop uses it too). The life of a run
around them (launch, signals, checkpoints, resume) is pipeline/run/; the RL loop, which has no
Trainer, is pipeline/rl/.
"""
