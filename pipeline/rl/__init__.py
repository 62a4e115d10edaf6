"""The parts of the RL stages (stages/ppo.py, stages/grpo.py): flags and their checks (config.py), PPO
arithmetic (ppo_math.py: KL, GAE, whitening, clipped losses), rollouts and held-out evaluation
(rollout.py), rewards and the reward-model scorer (rewards.py), the policy / reference / value / reward
models (models.py), checkpoints (checkpoint.py) and data parallelism (distributed.py). The loop itself
is the recipe in stages/ppo.py.
"""
