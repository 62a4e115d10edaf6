"""Several GPUs for real: every stage under torchrun on N GPUs with ZeRO-2 and ZeRO-3, a two-node \
launch
emulated on one host, scaling figures, and a ZeRO checkpoint resumed on another GPU count. One
scripted run; each run's log, results.json and results.md under --out (rows are written as they
finish).

    python -m bench.multi_gpu \
        --out $OUT/mg                               # 2 GPUs, 1B shape, every part
    python -m bench.multi_gpu --parts matrix --stages pt,sft \
        --out ...                                   # a slice (a device call is <= 10 min)
    python -m bench.multi_gpu --smoke \
        --out /tmp/mg                               # tiny shape, 2 gloo processes, CPU

Parts:
  matrix    NPROC_PER_NODE=N bash run_<stage>.sh for PT, SFT, RM, DPO, PPO x LoRA/full x ZeRO-2/3:
            the run finishes, its output loads with from_pretrained with no missing weight and no
            empty tensor (ZeRO-3 gathers on save), and a LoRA output merges with
            merge_peft_adapter.py (the RM score head included).
  two_node  two run_sft.sh with NNODES=2, NODE_RANK=0/1, MASTER_ADDR=127.0.0.1, one GPU each,
            against the single-node N=2 run's weights (difference as a share of how far training
            moved them).
  scaling   SFT full with packing, one epoch, same per-GPU batch, tokens/s on N GPUs vs 1 (ZeRO-2,
            ZeRO-3); PPO full ZeRO-2 samples/s on N vs 1.
  resume    a ZeRO-2 SFT checkpoint of N processes resumed on 1 with the same global batch, against
            the uninterrupted N-process run.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import time
from pathlib import Path

from bench.ppo import build_reward_model
from bench.run_one import token_count
from bench.sft import REPO, build_model, make_chats, make_pairs

STAGES = ("pt", "sft", "rm", "dpo", "ppo")
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


class Bench:
    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.out = Path(args.out).resolve()
        self.work = self.out / "work"
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.gpu = not self.smoke

    # ------------------------------------------------------------------ inputs
    def build(self) -> None:
        shape = "tiny" if self.smoke else self.args.model_shape
        self.model = self.work / f"model-{shape}"
        if not (self.model / "config.json").is_file():
            build_model(shape, self.model)
        self.reward = self.work / f"reward-{shape}"
        if not (self.reward / "config.json").is_file():
            build_reward_model(self.model, self.reward)
        data = self.work / "data"
        median, cap = (60, 200) if self.smoke else (534, 1000)
        make_chats(self.args.samples, median, cap, data / "sft")
        make_pairs(self.args.samples, median, self.max_length, data / "pairs")
        (data / "pt").mkdir(parents=True, exist_ok=True)
        texts = [
            " ".join(t["value"] for t in json.loads(line)["conversations"])
            for line in (data / "sft" / "chats.jsonl").read_text().splitlines()
        ]
        (data / "pt" / "text.txt").write_text("\n".join(texts) + "\n")
        self.data = data

    @property
    def max_length(self) -> int:
        return 256 if self.smoke else 1024

    def flags(
        self, stage: str, mode: str, zero: int | None, out: Path, steps: int | None
    ) -> list[str]:
        data = {"pt": "pt", "sft": "sft", "rm": "pairs", "dpo": "pairs", "ppo": "sft"}[stage]
        flags = [
            "--model_name_or_path",
            str(self.model),
            "--train_file_dir",
            str(self.data / data),
            "--output_dir",
            str(out),
            "--template_name",
            "qwen",
            "--model_max_length",
            str(self.max_length),
            "--per_device_train_batch_size",
            str(self.args.batch_size),
            "--learning_rate",
            "1e-5",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--logging_steps",
            "1",
            "--seed",
            "0",
            "--use_peft",
            str(mode == "lora"),
            *(["--bf16", "True"] if self.gpu else []),
        ]
        flags += ["--max_steps", str(steps)] if steps else ["--num_train_epochs", "1"]
        if zero:
            flags += ["--deepspeed", f"deepspeed_configs/zero{zero}.json"]
        if stage == "pt":
            flags += ["--block_size", str(self.max_length)]
        if stage == "ppo":
            flags += [
                "--reward_model_name_or_path",
                str(self.reward),
                "--max_new_tokens",
                "8" if self.smoke else "64",
                "--per_device_train_batch_size",
                "4" if self.smoke else "8",
            ]
        else:
            flags += ["--do_eval", "False", "--validation_split_percentage", "0"]
        return flags

    # ------------------------------------------------------------------ running
    def env(self, nproc: int, **extra: str) -> dict:
        env = {
            **os.environ,
            **NO_MULTICAST,
            "NPROC_PER_NODE": str(nproc),
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
        if self.smoke:
            env["OMP_NUM_THREADS"] = "1"
        return env

    def launch(self, name: str, stage: str, flags: list[str], env: dict) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        log.write(
            f"NPROC_PER_NODE={env['NPROC_PER_NODE']} NNODES={env.get('NNODES', 1)} "
            f"bash run_{stage}.sh {' '.join(flags)}\n"
        )
        log.flush()
        return subprocess.Popen(
            ["bash", f"run_{stage}.sh", *flags],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stage_run(self, name: str, stage: str, flags: list[str], nproc: int) -> dict:
        start = time.monotonic()
        code = self.launch(name, stage, flags, self.env(nproc)).wait()
        row = {
            "run": name,
            "processes": nproc,
            "rc": code,
            "wall_s": round(time.monotonic() - start, 1),
        }
        if code != 0:
            row["error"] = self.last_error(name)
        return row

    def last_error(self, name: str) -> str:
        lines = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        hits = [line for line in lines if "Error" in line or line.startswith("error")]
        return (hits or lines or ["failed"])[-1][:300]

    def record(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        (self.out / "results.json").write_text(json.dumps(self.rows, indent=2) + "\n")

    # ------------------------------------------------------------------ parts
    def matrix(self) -> None:
        from bench.multi_gpu_check import check_output

        for stage in self.args.stages:
            for mode in self.args.modes:
                for zero in self.args.zero:
                    name = f"{stage}-{mode}-zero{zero}"
                    out = self.work / name
                    shutil.rmtree(out, ignore_errors=True)
                    steps = (
                        (2 if stage == "ppo" else 4)
                        if self.smoke
                        else (8 if stage == "ppo" else 30)
                    )
                    row = self.stage_run(
                        name, stage, self.flags(stage, mode, zero, out, steps), self.args.gpus
                    )
                    if row["rc"] == 0:
                        row.update(
                            check_output(
                                stage, mode, out, self.model, self.logs / f"{name}-check.log"
                            )
                        )
                        row.update(trained(out))
                    self.record({"part": "matrix", **row})
                    if not self.args.keep:
                        shutil.rmtree(out, ignore_errors=True)

    def two_node(self) -> None:
        from bench.multi_gpu_check import weight_difference

        steps = 4 if self.smoke else 20
        single = self.work / "two-node-reference"
        shutil.rmtree(single, ignore_errors=True)
        row = self.stage_run(
            "sft-full-zero2-1node", "sft", self.flags("sft", "full", 2, single, steps), 2
        )
        nodes = self.work / "two-node"
        shutil.rmtree(nodes, ignore_errors=True)
        port = str(free_port())
        start = time.monotonic()
        procs = [
            self.launch(
                f"sft-full-zero2-node{rank}",
                "sft",
                self.flags("sft", "full", 2, nodes, steps),
                self.env(
                    1,
                    NNODES="2",
                    NODE_RANK=str(rank),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port,
                    **({"CUDA_VISIBLE_DEVICES": str(rank)} if self.gpu else {}),
                ),
            )
            for rank in (0, 1)
        ]
        codes = [p.wait() for p in procs]
        result = {
            "part": "two_node",
            "run": "sft full zero2: 2 nodes x 1 vs 1 node x 2",
            "rc": max(codes),
            "wall_s": round(time.monotonic() - start, 1),
            "single_node_rc": row["rc"],
        }
        if row["rc"] == 0 and max(codes) == 0:
            result.update(weight_difference(nodes, single, self.model))
        self.record(result)

    def scaling(self) -> None:
        tokens = token_count(
            "project-sft", str(self.model), str(self.data / "sft"), self.max_length
        )
        figures = {}
        for zero in self.args.zero:
            for n in sorted({1, self.args.gpus}):
                name = f"scaling-sft-zero{zero}-{n}gpu"
                out = self.work / name
                row = self.stage_run(name, "sft", self.flags("sft", "full", zero, out, None), n)
                if row["rc"] == 0:
                    result = json.loads((out / "train_results.json").read_text())
                    row.update(
                        tokens=tokens,
                        tokens_per_s=round(tokens / result["train_runtime"]),
                        peak_gib=result.get("peak_gpu_memory_gib"),
                    )
                    figures[(zero, n)] = row["tokens_per_s"]
                if (zero, 1) in figures and (zero, n) in figures and n > 1:
                    row["efficiency"] = round(figures[(zero, n)] / (n * figures[(zero, 1)]), 3)
                self.record({"part": "scaling", **row})
                shutil.rmtree(out, ignore_errors=True)
        for n in sorted({1, self.args.gpus}):
            name = f"scaling-ppo-zero2-{n}gpu"
            out = self.work / name
            row = self.stage_run(
                name, "ppo", self.flags("ppo", "full", 2, out, 3 if self.smoke else 8), n
            )
            if row["rc"] == 0:
                history = json.loads((out / "trainer_state.json").read_text())["log_history"]
                later = [h["samples_per_second"] for h in history if "samples_per_second" in h][1:]
                row["samples_per_s"] = round(statistics.median(later), 3) if later else None
            self.record({"part": "scaling", **row})
            shutil.rmtree(out, ignore_errors=True)

    def resume(self) -> None:
        from bench.multi_gpu_check import weight_difference

        n, steps = self.args.gpus, 6 if self.smoke else 16
        whole = self.work / "resume-whole"
        shutil.rmtree(whole, ignore_errors=True)
        flags = self.flags("sft", "full", 2, whole, steps) + [
            "--save_strategy",
            "steps",
            "--save_steps",
            str(steps // 2),
        ]
        row = self.stage_run(f"resume-sft-zero2-{n}gpu", "sft", flags, n)
        if row["rc"] != 0:
            self.record({"part": "resume", **row})
            return
        part = self.work / "resume-on-1"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        shutil.copytree(whole / f"checkpoint-{steps // 2}", part / f"checkpoint-{steps // 2}")
        batch = str(self.args.batch_size * n)  # the same global batch on one process
        flags = self.flags("sft", "full", 2, part, steps) + [
            "--per_device_train_batch_size",
            batch,
            "--resume_from_checkpoint",
            "auto",
        ]
        again = self.stage_run(f"resume-sft-zero2-{n}to1", "sft", flags, 1)
        log = (self.logs / f"resume-sft-zero2-{n}to1.log").read_text(errors="replace")
        result = {
            "part": "resume",
            "run": f"sft full zero2 checkpoint of {n} processes resumed on 1",
            "rc": again["rc"],
            "universal": "universal checkpoint" in log,
            "wall_s": again["wall_s"],
        }
        if again["rc"] == 0:
            result.update(weight_difference(part, whole, self.model))
        else:
            result["error"] = again.get("error")
        self.record(result)


def trained(out: Path) -> dict:
    """Steps and last loss (or PPO score) of a finished run."""
    state = json.loads((out / "trainer_state.json").read_text())
    history = [h for h in state["log_history"] if "loss" in h]
    return {
        "steps": state["global_step"],
        "final_loss": round(history[-1]["loss"], 4) if history else None,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_table(bench: Bench) -> None:
    lines = [
        "| part | run | processes | rc | result | wall s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    keys = (
        "error",
        "loads",
        "merged",
        "steps",
        "final_loss",
        "tokens_per_s",
        "efficiency",
        "peak_gib",
        "samples_per_s",
        "max_abs_diff",
        "share_of_update",
        "universal",
    )
    for r in bench.rows:
        result = ", ".join(f"{k}={r[k]}" for k in keys if r.get(k) is not None)
        lines.append(
            f"| {r['part']} | {r['run']} | {r.get('processes', '')} "
            f"| {r['rc']} | {result} | {r['wall_s']} |"
        )
    (bench.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/multi_gpu")
    parser.add_argument("--parts", default="matrix,two_node,scaling,resume")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--zero", default="2,3")
    parser.add_argument(
        "--gpus", type=int, default=2, help="processes per node of the multi-GPU runs"
    )
    parser.add_argument("--model_shape", default="1b")
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="chats and pairs generated (default 1600; 64 smoke)",
    )
    parser.add_argument("--batch_size", type=int, default=4, help="per-GPU batch")
    parser.add_argument("--keep", action="store_true", help="keep each matrix run's output folder")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shape, a few steps, 2 gloo processes on the CPU"
    )
    args = parser.parse_args(argv)
    args.samples = args.samples or (64 if args.smoke else 1600)
    args.stages, args.modes = args.stages.split(","), args.modes.split(",")
    args.zero = [int(z) for z in args.zero.split(",")]
    bench = Bench(args)
    bench.build()
    for part in args.parts.split(","):
        getattr(bench, part)()
    write_table(bench)
    return 0 if all(r["rc"] == 0 and r.get("ok", True) for r in bench.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
