"""The own RL loop of stages/ppo.py and stages/grpo.py. loop.py is the recipe (read train_step top
to bottom); beside it: ppo_math.py (KL, GAE, whitening, clipped losses) and group_math.py
(group-relative advantages of GRPO, DAPO, Dr. GRPO, GSPO, RLOO), rollout.py (generation of rollouts,
log-probs, held-out evaluation), decode_copy.py (the bf16 copy full training decodes from),
rewards.py (reward-model and rule rewards), models.py (policy, reference, value and reward models;
frozen.py: a frozen role's weights, its own or a LoRA model's with the adapter off), engine.py (the
update: torch AdamW or DeepSpeed), saving.py (checkpoints and the final model), distributed.py
(prompts and metrics across ranks) and timing.py (the wall time of each phase). Their flags and
checks are in pipeline/args/.
"""
