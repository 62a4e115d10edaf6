"""The life of a run, from launch to exit, whatever stage it is.

A stage starts as `run_<stage>.sh` -> `python -m pipeline.run.launch` (torchrun's agent,
launch.py) -> one worker per GPU. Each link dies with its parent (process.py: parent-death signals),
so nothing outlives a killed launcher. After parsing, a worker sets itself up (setup.py: logging,
seed, tensorboard folder) and global rank 0 takes an flock on the output folder (process.py), so a
second trainer cannot write there. The stage then claims the folder for its run (output_dir.py): a
folder holding another run's results is refused unless --overwrite_output_dir, and a resume must be
of the same run. Checkpoints count only once complete (checkpoints.py writes the mark); SIGTERM
becomes "save a checkpoint at the end of this step and exit 143" (checkpoints.py: Preemption). A
rerun with --resume_from_checkpoint auto takes the newest complete checkpoint (resume.py),
converting a DeepSpeed ZeRO checkpoint saved by another number of processes once. The Trainer stages
run these through pipeline/train/trainer_steps.py, the RL loops through pipeline/rl/loop.py.
"""
