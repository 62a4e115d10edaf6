"""llm-pipeline: the shared package every stage script (stages/*.py) imports, one sub-package per
concern.

    args/    every flag, declared once (one class per concern, STAGE_ARGUMENTS: which stage parses
             which), and the checks across flags
    run/     the life of a run: launcher, parent-death signals, folder lock and claim, SIGTERM,
             checkpoints, resume
    data/    reading files, record formats, templates and their resolution, masking (labels),
             packing, collators, prompts
    model/   loading (dtype, quantization, RoPE, attention), adapters, merge, padding-free rows, the
             run-time patches
    train/   the Trainer stages' steps (train, save, evaluate), the causal-LM, reward and preference
             trainers, losses, the divergence guard, the optimizer-held master weights
    rl/      the own RL loop (PPO, GRPO family): arithmetic, rollouts, rewards, models, updates,
             saving, data parallelism
    infer/   the one generation path, the chat model, terminal chat / batch CLI, OpenAI-compatible
             server, web page
    eval/    generation-based evaluation, ROUGE/BLEU predictions, the pipeline report
    tools/   preview, convert, synthetic data, the run_pipeline.sh config

errors.py holds UserError and run_cli (one sentence and exit 2 for a user's mistake);
command_line.py the parser of every command that is not a stage (flags typed as for the stages,
both spellings, switches bare or with True/False). config_file.py
reads a YAML/JSON config given before the flags; seed_flags.py and seed_configs.py translate the
spellings and config layouts of the documents users come from. The top-level modules chat, serve,
webui, preview, convert, report, evaluate, predict, tiny_model and synthetic are command aliases
(`python -m pipeline.chat` ...), and `templates` keeps `pipeline.templates.render`. library_noise.py
names the libraries' harmless warnings that are filtered out, before anything else loads.
"""

from pipeline import library_noise

library_noise.silence()
