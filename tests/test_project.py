"""Project furniture: launchers parse, DeepSpeed configs parse, shipped synthetic data is
reproducible, the tiny model is deterministic and loads like a hub checkpoint, and torchrun really
runs DDP."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.model.tiny_model import CHAT_SPECIAL_TOKENS, build
from pipeline.tools import synthetic
from tests.helpers import DATA, REPO


@pytest.mark.parametrize(
    "script", sorted(p.name for p in REPO.glob("*.sh")) + ["scripts/torchrun.sh"]
)
def test_launchers_pass_bash_n(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (REPO / "deepspeed_configs").glob("*.json"))
)
def test_deepspeed_configs_parse(config):
    data = json.loads((REPO / "deepspeed_configs" / config).read_text())
    assert data["zero_optimization"]["stage"] in (2, 3)
    assert data["train_micro_batch_size_per_gpu"] == "auto"


def test_shipped_synthetic_data_is_what_the_generator_writes(tmp_path):
    synthetic.generate(tmp_path)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (DATA / path.relative_to(tmp_path)).read_bytes(), path


def test_synthetic_rule_and_split():
    train, heldout = synthetic.split_items()
    assert not set(train) & set(heldout)
    assert {i.split("-")[0] for i in heldout} <= {i.split("-")[0] for i in train}
    assert synthetic.answer("ka-xe") == "red" and synthetic.answer("lo-bo", "zh") == "蓝色"


def test_tiny_model_is_deterministic_and_loads(tiny_model, tmp_path):
    again = build(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "llama" and model.get_input_embeddings().weight.shape[
        0
    ] == len(tokenizer)
    assert 100_000 < model.num_parameters() < 1_000_000
    for token in CHAT_SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    text = "The color of ka-bo is red. 训练语言模型"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


@pytest.mark.slow
def test_torchrun_two_processes_train_in_sync(tiny_model, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, NPROC_PER_NODE="2")
    proc = subprocess.run(
        [
            "bash",
            "run_pt.sh",
            "--model_name_or_path",
            str(tiny_model),
            "--train_file_dir",
            str(DATA / "pt"),
            "--output_dir",
            str(out),
            "--block_size",
            "64",
            "--max_steps",
            "4",
            "--use_peft",
            "False",
            "--per_device_train_batch_size",
            "4",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # 2 processes x 4 blocks per step: an epoch takes half the steps it takes on one process
    n_blocks = int(re.search(r"train: .* in (\d+) blocks", proc.stdout).group(1))
    assert state["log_history"][-1]["epoch"] == pytest.approx(4 / math.ceil(n_blocks / 8), rel=1e-3)
    assert proc.stdout.count("--train_file_dir documents:") == 1, "only rank 0 should log"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = 'pip install -e ".[dev]" && python -m pytest'
    assert f"```bash\n{command}\n```" in readme and command in ci


@pytest.fixture(scope="module")
def padded_vocab_model(tiny_model, tmp_path_factory):
    """The tiny model with 64 spare embedding rows, as real checkpoints often have
    (Qwen2.5: 151936 > 151665)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(model.config.vocab_size + 64)
    out = tmp_path_factory.mktemp("padded") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, method", [("zero2.json", "full"), ("zero3.json", "full"), ("zero3.json", "lora-bf16")]
)
def test_deepspeed_zero_trains_under_torchrun(padded_vocab_model, tmp_path, config, method):
    """Real DeepSpeed on CPU (gloo), two processes; the first run compiles its comm op (~40 s).
    The spare vocabulary rows must survive ZeRO-3 (its local weight shape is 0), and LoRA with bf16
    weights plus full embeddings must give DeepSpeed one trainable dtype."""
    out = tmp_path / config.split(".")[0]
    env = dict(os.environ, NPROC_PER_NODE="2")
    extra = (
        ["--use_peft", "False"]
        if method == "full"
        else [
            "--use_peft",
            "True",
            "--torch_dtype",
            "bfloat16",
            "--bf16",
            "True",
            "--modules_to_save",
            "embed_tokens,lm_head",
        ]
    )
    proc = subprocess.run(
        [
            "bash",
            "run_pt.sh",
            "--model_name_or_path",
            str(padded_vocab_model),
            "--train_file_dir",
            str(DATA / "pt"),
            "--output_dir",
            str(out),
            "--block_size",
            "64",
            "--max_steps",
            "6",
            *extra,
            "--per_device_train_batch_size",
            "4",
            "--logging_steps",
            "1",
            "--learning_rate",
            "3e-3",
            "--report_to",
            "none",
            "--deepspeed",
            f"deepspeed_configs/{config}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embeddings resized" not in proc.stdout + proc.stderr
    assert (out / "checkpoint-6" / "global_step6").is_dir(), "not a DeepSpeed checkpoint"
    losses = [
        h["loss"]
        for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "loss" in h
    ]
    assert losses[-1] < losses[0]
    if method == "full":  # ZeRO-3 gathers the full weights on save
        model = AutoModelForCausalLM.from_pretrained(out)
        assert (
            model.get_input_embeddings().weight.shape[0]
            == len(AutoTokenizer.from_pretrained(out)) + 64
        )


def _python_files(*folders: str) -> list:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_layout_limits_and_package_docstrings():
    """The architecture rules newcomers rely on, as ruff formats the code at line length 100:
    modules <= 600 lines, stage scripts <= 400, functions < 100 (guides against god-modules, not a
    reason to pack code), and every package says in its __init__ what lives there, naming each
    module."""
    import ast

    too_long = [
        f"{p.relative_to(REPO)}: {n} lines"
        for p in _python_files("pipeline")
        if (n := len(p.read_text().splitlines())) > 600
    ]
    too_long += [
        f"{p.relative_to(REPO)}: {n} lines"
        for p in _python_files("stages")
        if (n := len(p.read_text().splitlines())) > 400
    ]
    long_functions = [
        f"{p.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} "
        "lines"
        for p in _python_files("pipeline", "stages", "scripts")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno >= 100
    ]
    assert not too_long and not long_functions, too_long + long_functions
    packages = [
        p for p in (REPO / "pipeline").iterdir() if p.is_dir() and (p / "__init__.py").exists()
    ]
    assert {p.name for p in packages} >= {
        "args",
        "run",
        "data",
        "model",
        "train",
        "rl",
        "infer",
        "eval",
        "tools",
    }
    for package in [*packages, REPO / "pipeline"]:
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and len(doc.split()) > 25, (
            f"{package.name}/__init__.py needs a paragraph on what lives there"
        )
        words = set(re.findall(r"[\w/]+", doc))
        unnamed = [
            m.stem
            for m in package.glob("*.py")
            if m.stem != "__init__"
            and m.name not in words
            and m.stem not in words
            and f"{m.stem}/" not in words
        ]
        assert not unnamed, (
            f"{package.name}/__init__.py does not name {unnamed}: a newcomer finds a module by its "
            "paragraph"
        )


def test_ruff_is_clean():
    ruff = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert ruff.returncode == 0, ruff.stdout[-3000:]


def test_every_module_imports_first():
    """No import cycle hides behind an import order: each module of pipeline/ and stages/ imports in
    a process where no project module is loaded yet (the libraries stay loaded; only the project's
    modules are dropped in between)."""
    names = [
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in _python_files("pipeline", "stages")
    ]
    script = (
        "import importlib, sys\nfailed = []\nfor name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('pipeline', 'stages')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except ImportError as e:\n        failed.append(f'{name}: {e}')\n"
        "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
