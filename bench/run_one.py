"""One benchmark run in its own process (so peak memory is its own): one of this project's stages,
or the TRL trainer it is compared with, on a model folder and a data folder. Prints one JSON line of
results.

    python -m bench.run_one TOOL MODEL DATA BATCH_SIZE MAX_LENGTH OUTPUT_DIR [extra flags ...]

TOOL: project-sft | trl-sft | project-dpo | trl-dpo. Extra flags go to the project stage as they
are; for TRL they are `key=value` fields of its config (values parsed as JSON where they parse).
BENCH_PROFILE=1 profiles training steps 4-6 and prints where the GPU time goes (by kernel) to
stderr; BENCH_PROFILE=host profiles the host side of steps 4-13 with cProfile (where the Python time
of a step goes: the Trainer's bookkeeping, data collation, kernel launches, waits on the GPU);
BENCH_PROFILE=memory says what loading holds and which code's allocations make up the peak of the
first two micro-steps.
Besides the whole run's tokens/s, `steady_tokens_per_s` is the rate after the first WARMUP_STEPS
micro-steps (compilation and first allocations left out).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

# the tiny tokenizer trains the qwen format; BENCH_TEMPLATE=auto for a model folder with its own
# official template
COMMON = [
    "--num_train_epochs",
    "1",
    "--learning_rate",
    "1e-5",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--validation_split_percentage",
    "0",
    "--do_eval",
    "False",
    "--logging_steps",
    "1",
    "--template_name",
    os.environ.get("BENCH_TEMPLATE", "qwen"),
]


def chat_messages(record: dict) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]


def token_count(tool: str, model: str, data: str, max_length: int) -> int:
    """Tokens the step computes on, as the template renders them (what every tool trains on): each
    chat capped at max_length; for DPO, prompt + chosen and prompt + rejected of each pair."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)

    def n(messages, **kw) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))

    total = 0
    for line in (
        (Path(data) / ("pairs.jsonl" if tool.endswith("dpo") else "chats.jsonl"))
        .read_text()
        .splitlines()
    ):
        record = json.loads(line)
        if tool.endswith("dpo"):
            prompt = [{"role": "user", "content": record["question"]}]
            total += sum(
                n(prompt + [{"role": "assistant", "content": record[k]}])
                for k in ("response_chosen", "response_rejected")
            )
        else:
            total += min(max_length, n(chat_messages(record)))
    return total


# kernel name fragments -> the phase a kernel belongs to; the first match wins, in this order.
# Matched on the whole kernel name, template arguments included (an elementwise kernel is named by
# its functor there: direct_copy_kernel)
PHASES = [
    ("optimizer", ("multi_tensor_apply", "adam")),
    ("attention", ("flash", "fmha", "attention", "varlen")),
    ("loss", ("SoftMax", "softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "splitK")),
    ("casts and copies", ("copy_kernel", "CatArrayBatchedCopy", "Memcpy")),
    ("norm, rope, swiglu", ("rms_norm", "rope", "swiglu", "silu", "rsqrt")),
    ("reductions", ("reduce_kernel", "sum_and_scatter", "scan")),
    ("other elementwise", ("elementwise", "fill", "index", "triton")),
]


def phase_of(kernel: str) -> str:
    return next((phase for phase, keys in PHASES if any(k in kernel for k in keys)), "other")


def is_annotation(name: str) -> bool:
    """Ranges the profiler shows on the GPU row that are not kernels (their time is their kernels'
    time again)."""
    return name.startswith(("ProfilerStep", "Optimizer.", "## "))


def phase_table(prof, wall_us: float, steps: int) -> tuple[str, dict]:
    """GPU time of the profiled steps by phase (kernels classified by name), and the host gaps: the
    wall time the GPU ran no kernel (wall minus the kernels' time, streams serial)."""
    from torch.autograd import DeviceType

    by_phase: dict[str, float] = {}
    top: dict[str, dict[str, float]] = {}
    for evt in prof.key_averages():
        if (
            evt.device_type != DeviceType.CUDA
            or evt.self_device_time_total <= 0
            or is_annotation(evt.key)
        ):
            continue
        phase = phase_of(evt.key)
        by_phase[phase] = by_phase.get(phase, 0.0) + evt.self_device_time_total
        top.setdefault(phase, {})[evt.key[:90]] = evt.self_device_time_total
    busy = sum(by_phase.values())
    rows = sorted(by_phase.items(), key=lambda kv: -kv[1]) + [
        ("host gaps (GPU idle)", max(wall_us - busy, 0.0))
    ]
    lines = ["| phase | ms a step | share of wall |", "| --- | --- | --- |"]
    lines += [
        f"| {name} | {us / steps / 1e3:.1f} | {100 * us / wall_us:.1f}% |" for name, us in rows
    ]
    lines.append(f"| wall | {wall_us / steps / 1e3:.1f} | 100% |")
    summary = {
        "steps": steps,
        "wall_ms_per_step": round(wall_us / steps / 1e3, 2),
        "ms_per_step": {name: round(us / steps / 1e3, 2) for name, us in rows},
        "top_kernels": {
            phase: dict(sorted(k.items(), key=lambda kv: -kv[1])[:5]) for phase, k in top.items()
        },
    }
    return "\n".join(lines), summary


def profile_steps(trainer_class) -> None:
    """Profile training steps 4-6 (after warm-up) of every trainer of `trainer_class`: the kernels
    by phase and the host gaps, to stderr (and to BENCH_PROFILE_OUT as JSON when set)."""
    import time

    from torch.profiler import ProfilerActivity, profile, schedule

    prof = profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=3, warmup=1, active=3),
    )
    prof.start()
    original = trainer_class.training_step
    wall = {}

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if prof.step_num in (
            3,
            6,
        ):  # the window: from the end of step 3 to the end of step 6 (3 steps, 3 optimizer steps)
            torch.cuda.synchronize()
            wall[prof.step_num] = time.perf_counter()
        prof.step()
        if prof.step_num == 8:
            prof.stop()
            table, summary = phase_table(prof, (wall[6] - wall[3]) * 1e6, 3)
            print(
                prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40),
                file=sys.stderr,
            )
            print(
                "BENCH PROFILE (3 steps: forward, backward, optimizer)\n" + table, file=sys.stderr
            )
            if os.environ.get("BENCH_PROFILE_OUT"):
                Path(os.environ["BENCH_PROFILE_OUT"]).write_text(
                    json.dumps(summary, indent=2) + "\n"
                )
        return out

    trainer_class.training_step = step


def profile_host(trainer_class, first: int = 3, last: int = 13) -> None:
    """cProfile the host side of training steps first+1..last of every trainer of
    `trainer_class` (the GPU drained at both ends): the functions by own time and by cumulative
    time, to stderr (and to BENCH_PROFILE_OUT as text when set, with the raw stats beside it as
    .prof for pstats' callers)."""
    import cProfile
    import io
    import pstats
    import time

    original = trainer_class.training_step
    seen = {"steps": 0}
    prof = cProfile.Profile()

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen["steps"] += 1
        if seen["steps"] in (first, last):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if seen["steps"] == first:
                seen["start"] = time.perf_counter()
                prof.enable()
            else:
                prof.disable()
                wall = (time.perf_counter() - seen["start"]) / (last - first)
                text = io.StringIO()
                text.write(f"host profile: {last - first} micro-steps, {wall * 1e3:.1f} ms each\n")
                for order in ("tottime", "cumulative"):
                    pstats.Stats(prof, stream=text).sort_stats(order).print_stats(45)
                print(text.getvalue(), file=sys.stderr)
                if os.environ.get("BENCH_PROFILE_OUT"):
                    out = Path(os.environ["BENCH_PROFILE_OUT"])
                    out.with_suffix(".txt").write_text(text.getvalue())
                    prof.dump_stats(out.with_suffix(".prof"))  # callers: pstats print_callers
        return out

    trainer_class.training_step = step


def live_at_peak(events: list[dict]) -> tuple[int, dict]:
    """Replay a CUDA allocator trace: the highest total of live allocations made within it (bytes,
    above what was live before it began) and those allocations summed by the first frame outside
    torch's own files (where in the model, the adapter or the loss the memory was asked for)."""
    cur = top = at = 0
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            cur += e["size"]
        elif e["action"] == "free_completed":
            cur -= e["size"]
        if cur > top:
            top, at = cur, i
    live: dict = {}
    for e in events[: at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups: dict = {}
    for e in live.values():
        frames = e.get("frames") or []
        where = next(
            (f for f in frames if "/torch/" not in f["filename"] and f["filename"][:1] == "/"),
            frames[0] if frames else {"filename": "?", "line": 0, "name": "?"},
        )
        key = f"{'/'.join(where['filename'].split('/')[-2:])}:{where['line']} {where['name']}"
        groups[key] = groups.get(key, 0) + e["size"]
    return top, groups


def profile_memory(trainer_class, steps: int = 2) -> None:
    """Where the peak GPU memory goes: what the model holds when training starts (and the peak of
    loading it), then the allocations live at the highest point of the first `steps` micro-steps,
    by the code that asked for them, to stderr (and to BENCH_PROFILE_OUT as text when set)."""
    train, original = trainer_class.train, trainer_class.training_step
    seen = {"steps": 0}

    def started(self, *args, **kwargs):
        seen["load_peak"] = torch.cuda.max_memory_allocated()
        seen["resident"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        return train(self, *args, **kwargs)

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen["steps"] += 1
        if seen["steps"] == steps:
            torch.cuda.synchronize()
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            top, groups = live_at_peak(snap["device_traces"][torch.cuda.current_device()])
            gib = 2**30
            lines = [
                f"memory profile: loading peaked at {seen['load_peak'] / gib:.2f} GiB; "
                f"{seen['resident'] / gib:.2f} GiB held when training started; the first "
                f"{steps} micro-steps peaked at {torch.cuda.max_memory_allocated() / gib:.2f} GiB, "
                f"{top / gib:.2f} GiB of it allocated within them; live at that point:"
            ]
            for key, size in sorted(groups.items(), key=lambda kv: -kv[1])[:30]:
                lines.append(f"{size / gib:8.3f} GiB  {key}")
            print("\n".join(lines), file=sys.stderr)
            if os.environ.get("BENCH_PROFILE_OUT"):
                Path(os.environ["BENCH_PROFILE_OUT"]).with_suffix(".mem.txt").write_text(
                    "\n".join(lines) + "\n"
                )
        return out

    trainer_class.train, trainer_class.training_step = started, step


WARMUP_STEPS = 5  # micro-steps left out of the steady rate: first allocations, compilation
STEPS: dict = {"count": 0}


def time_steps(trainer_class) -> None:
    """Mark the end of micro-step WARMUP_STEPS and of training (the GPU drained at both), so a run
    reports its rate after warm-up beside the whole run's: compiled layers pay their compilation in
    the first steps."""
    import time

    step, train = trainer_class.training_step, trainer_class.train

    def timed_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        STEPS["count"] += 1
        if STEPS["count"] == WARMUP_STEPS:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            STEPS["warm"] = time.perf_counter()
        return out

    def timed_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        STEPS["end"] = time.perf_counter()
        return result

    trainer_class.training_step, trainer_class.train = timed_step, timed_train


def steady_rate(tokens: int) -> int | None:
    """Tokens a second after warm-up, taking every micro-step to hold the same share of the tokens
    (packed rows nearly do); None for a run of too few steps."""
    if "warm" not in STEPS or STEPS["count"] <= WARMUP_STEPS:
        return None
    share = (STEPS["count"] - WARMUP_STEPS) / STEPS["count"]
    return round(tokens * share / (STEPS["end"] - STEPS["warm"]))


def results_of(out: str) -> dict:
    results = json.loads((Path(out) / "train_results.json").read_text())
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return {
        "train_s": results["train_runtime"],
        "peak_gib": results.get("peak_gpu_memory_gib"),
        "steps": state["global_step"],
        "final_loss": next(h["loss"] for h in reversed(state["log_history"]) if "loss" in h),
    }


def project(
    stage: str, model: str, data: str, batch: int, max_length: int, out: str, extra: list[str]
) -> dict:
    import importlib

    if os.environ.get("BENCH_PROFILE"):
        from transformers import Trainer

        kind = os.environ["BENCH_PROFILE"]
        {"host": profile_host, "memory": profile_memory}.get(kind, profile_steps)(Trainer)
    module = importlib.import_module(f"stages.{stage}")
    module.main(
        [
            "--model_name_or_path",
            model,
            "--train_file_dir",
            data,
            "--output_dir",
            out,
            "--per_device_train_batch_size",
            str(batch),
            "--model_max_length",
            str(max_length),
            *COMMON,
            *extra,
        ]
    )
    return results_of(out)


def trl_config(extra: list[str]) -> dict:
    fields = {}
    for item in extra:
        key, _, value = item.partition("=")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return fields


def trl_run(
    stage: str, model: str, data: str, batch: int, max_length: int, out: str, extra: list[str]
) -> dict:
    from datasets import load_dataset

    gpu = torch.cuda.is_available()
    common = dict(
        output_dir=out,
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        learning_rate=1e-5,
        max_length=max_length,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        bf16=gpu,
        use_cpu=not gpu,
    )
    fields = trl_config(extra)
    peft_config = None
    if fields.pop("lora_r", None):
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    if fields.pop("load_in_4bit", None):
        from transformers import BitsAndBytesConfig

        fields["model_init_kwargs"] = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            "dtype": torch.bfloat16,
        }
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        dataset = load_dataset(
            "json", data_files=str(Path(data) / "chats.jsonl"), split="train"
        ).map(lambda r: {"messages": chat_messages(r)}, remove_columns=["conversations"])
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common, **fields),
            train_dataset=dataset,
            peft_config=peft_config,
        )
    else:
        from trl import DPOConfig, DPOTrainer

        def to_pair(r):
            return {
                "prompt": [{"role": "user", "content": r["question"]}],
                "chosen": [{"role": "assistant", "content": r["response_chosen"]}],
                "rejected": [{"role": "assistant", "content": r["response_rejected"]}],
            }

        dataset = load_dataset(
            "json", data_files=str(Path(data) / "pairs.jsonl"), split="train"
        ).map(to_pair, remove_columns=["question", "response_chosen", "response_rejected"])
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**common, **fields),
            train_dataset=dataset,
            peft_config=peft_config,
        )
    result = trainer.train()
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_s": result.metrics["train_runtime"],
        "peak_gib": peak,
        "steps": trainer.state.global_step,
        "final_loss": losses[-1],
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if (
        not argv or argv[0] in ("-h", "--help") or len(argv) < 6
    ):  # the extra flags are the stage's, not parsed here
        print(__doc__, file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    tool, model, data, batch, max_length, out, *extra = argv
    who, stage = tool.split("-")
    run = project if who == "project" else trl_run
    from transformers import Trainer

    time_steps(Trainer)
    result = run(stage, model, data, int(batch), int(max_length), out, extra)
    tokens = token_count(tool, model, data, int(max_length))
    result.update(
        tokens=tokens,
        tokens_per_s=round(tokens / result["train_s"]),
        steady_tokens_per_s=steady_rate(tokens),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
