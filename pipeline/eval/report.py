"""Before -> after report of a pipeline run: each stage's key metric on held-out data, and every
stage's training-loss curve. Reads only the stage folders under OUTPUT_ROOT (pt sft rm ppo dpo), so
it also works on stage folders made by hand.

    python -m pipeline.report OUTPUT_ROOT \
        # prints the table; writes report.md, report.json, losses.png

"After" is the stage's final evaluation (eval_results.json, plus sft/exact_match_results.json that
run_pipeline.sh writes). "Before" is the same key with `_before` in those files, else the step-0
evaluation in trainer_state.json's log_history (what --eval_on_start True records).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.command_line import command_parser
from pipeline.data.json_text import loads
from pipeline.errors import UserError, run_cli

TITLES = {"pt": "PT", "sft": "SFT", "rm": "RM", "ppo": "PPO", "dpo": "DPO"}
# stage -> (label, key, which way is better: "higher", "lower", or None for shown but not judged)
METRICS = {
    "pt": [("eval perplexity", "perplexity", "lower")],
    "sft": [
        ("eval loss", "eval_loss", "lower"),
        ("exact match (greedy)", "eval_exact_match", "higher"),
    ],
    "rm": [("pairwise accuracy", "eval_accuracy", "higher")],
    "ppo": [
        ("mean reward-model score", "eval_score", "higher"),
        ("exact match (greedy)", "eval_exact_match", "higher"),
        ("KL to the SFT model", "eval_kl", None),
    ],
    # at step 0 the policy is its reference: every reward is 0, so accuracy (chosen strictly above)
    # starts at 0
    "dpo": [
        ("reward accuracy", "eval_rewards/accuracies", "higher"),
        ("reward margin", "eval_rewards/margins", "higher"),
        ("exact match (greedy)", "eval_exact_match", "higher"),
    ],
}
RESULT_FILES = ("eval_results.json", "exact_match_results.json")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(
            f"{path} cannot be read ({e.strerror}); make it readable (chmod a+r)."
        ) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-run the stage that writes it.") from e
    if not isinstance(value, dict):
        raise UserError(
            f"{path} holds a JSON {type(value).__name__}, not an object; re-run the stage that "
            "writes it."
        )
    return value


def _start_eval(state: dict[str, Any]) -> dict[str, float]:
    """The evaluation logged at step 0, if any (a resumed run may log another at its first step)."""
    entry = next(
        (
            h
            for h in state.get("log_history", [])
            if h.get("step") == 0 and any(k.startswith("eval_") for k in h)
        ),
        {},
    )
    if "eval_loss" in entry:
        entry = {**entry, "perplexity": math.exp(min(entry["eval_loss"], 700))}
    return entry


def stage_report(folder: Path, stage: str) -> dict[str, Any]:
    """{"status": finished | unfinished | not run, "metrics": [{label, key, before, after, better,
    improved}]}"""
    if not folder.is_dir():
        return {"status": "not run", "metrics": []}
    if not (folder / "train_results.json").is_file():
        return {"status": "unfinished", "metrics": []}
    after: dict[str, Any] = {}
    for name in RESULT_FILES:
        after.update(_read_json(folder / name))
    before = {
        **_start_eval(_read_json(folder / "trainer_state.json")),
        **{k.removesuffix("_before"): v for k, v in after.items() if k.endswith("_before")},
    }
    metrics = []
    for label, key, better in METRICS[stage]:
        b, a = before.get(key), after.get(key)
        improved = None
        if better and b is not None and a is not None:
            improved = a > b if better == "higher" else a < b
        metrics.append(
            {
                "label": label,
                "key": key,
                "before": b,
                "after": a,
                "better": better,
                "improved": improved,
            }
        )
    return {"status": "finished", "metrics": metrics}


def build_report(root: Path) -> dict[str, Any]:
    return {
        "output_root": str(root),
        "stages": {stage: stage_report(root / stage, stage) for stage in TITLES},
    }


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| Stage | Held-out metric | Before | After | Improved |",
        "| --- | --- | --- | --- | --- |",
    ]
    for stage, title in TITLES.items():
        entry = report["stages"][stage]
        if entry["status"] != "finished":
            why = (
                "no folder"
                if entry["status"] == "not run"
                else "no train_results.json: interrupted or running"
            )
            lines.append(f"| {title} | {entry['status']} ({why}) | — | — | — |")
        for m in entry["metrics"]:
            improved = {True: "yes", False: "no", None: "—"}[m["improved"]]
            better = f", {m['better']} is better" if m["better"] else ""
            lines.append(
                f"| {title} | {m['label']}{better} | {_number(m['before'])} | "
                f"{_number(m['after'])} | {improved} |"
            )
    return "\n".join(lines)


def plot_losses(root: Path, out: Path) -> list[str]:
    """One panel per stage with a logged training loss; returns the stages drawn (nothing written if
    none)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {}
    for stage, title in TITLES.items():
        history = _read_json(root / stage / "trainer_state.json").get("log_history", [])
        points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        if points:
            curves[title] = points
    if not curves:
        return []
    fig = Figure(figsize=(4 * len(curves), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, points) in zip(fig.subplots(1, len(curves), squeeze=False)[0], curves.items()):
        ax.plot(*zip(*points), marker=".")
        ax.set(title=f"{title} training loss", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    return list(curves)


def write_report(root: Path) -> str:
    """Build the report of `root`, write report.md, report.json and losses.png there; return the
    table."""
    if not root.is_dir():
        raise UserError(f"{root} does not exist; give the OUTPUT_ROOT of a pipeline run.")
    report = build_report(root)
    drawn = plot_losses(root, root / "losses.png")
    report["loss_plot"] = "losses.png" if drawn else None
    table = markdown_table(report)
    plot_line = (
        f"![training loss]({report['loss_plot']})" if drawn else "No stage logged a training loss."
    )
    (root / "report.md").write_text(
        f"# Pipeline report: {root}\n\n{table}\n\n{plot_line}\n", encoding="utf-8"
    )
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(
        prog="python -m pipeline.report",
        description="Before -> after table of a run_pipeline.sh run's held-out metrics.",
    )
    parser.add_argument(
        "output_root", metavar="OUTPUT_ROOT", help="the run's output folder (e.g. outputs/demo)"
    )
    root = Path(parser.parse_args(argv).output_root)
    print(write_report(root))
    print(f"report: {root / 'report.md'} (and report.json); training losses: {root / 'losses.png'}")


if __name__ == "__main__":
    run_cli(main)
