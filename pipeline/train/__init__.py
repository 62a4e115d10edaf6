"""Training on top of the HF Trainer and trl: run.py holds the steps every Trainer-based stage shares
(setup, train with resume, save, evaluate), reward.py the pairwise reward-model Trainer, preference.py
the DPO / KTO / SimPO / ORPO trainers, losses.py the losses the project computes itself,
zero_resume.py the resume of a DeepSpeed checkpoint on another number of processes. The PPO loop,
which has no Trainer, lives in stages/ppo.py with its parts in pipeline/rl/.
"""
