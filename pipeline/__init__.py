"""llm-pipeline: the shared package every stage script (stages/*.py) imports, one sub-package per concern.

    args.py errors.py validation.py   flags (one dataclass per concern), UserError + run_cli, cross-flag checks
    data/    reading files, record formats, templates and their resolution, masking (labels), packing, collators, prompts
    model/   loading (dtype, quantization, RoPE, attention), adapters, merge, the tiny model
    train/   shared Trainer steps (setup, train, save), reward and preference trainers, losses
    rl/      PPO arithmetic, rollouts, rewards, the four PPO models, checkpointing, data parallelism
    infer/   the one generation path, the chat model, terminal chat / batch CLI, OpenAI-compatible server
    eval/    generation-based evaluation, the pipeline report
    tools/   preview, convert, synthetic data, the run_pipeline.sh config

The top-level modules chat, serve, preview, convert, report, evaluate, tiny_model and synthetic are
command aliases (`python -m pipeline.chat` ...), and `templates` keeps `pipeline.templates.render`.
library_noise.py names the libraries' harmless warnings that are filtered out, before anything else loads.
"""

from pipeline import library_noise

library_noise.silence()
