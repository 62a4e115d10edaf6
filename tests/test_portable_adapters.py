"""An adapter loads from anywhere: training records its local base folder as an absolute path (and
relative to the adapter), so chat, merge and plain peft load it from another working directory; with
both folders copied elsewhere together the base is found relative to the adapter or beside it;
--base_model overrides; a base with other weights is refused by its fingerprint; and when nothing
resolves, one sentence names the recorded base."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from pipeline.errors import UserError
from pipeline.infer import chat_model as chat
from pipeline.model.merge import FINGERPRINT, merge_adapter
from pipeline.model.tiny_model import build
from pipeline.tools import synthetic
from tests.helpers import DATA, REPO

pytestmark = pytest.mark.slow  # trains an adapter first
QUESTION = synthetic.question(synthetic.split_items()[1][0])


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """This interpreter on `args` in `cwd`, importing this checkout, never asking the hub."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> Path:
    """A LoRA SFT of 2 steps, run in `train/` with the paths typed relative to it: models/tiny ->
    outputs/lora."""
    root = tmp_path_factory.mktemp("portable") / "train"
    shutil.copytree(tiny_model, root / "models" / "tiny")
    proc = run(
        str(REPO / "stages" / "sft.py"),
        "--model_name_or_path",
        "models/tiny",
        "--output_dir",
        "outputs/lora",
        "--template_name",
        "qwen",
        "--train_file_dir",
        str(DATA / "sft"),
        "--validation_split_percentage",
        "0",
        "--use_peft",
        "True",
        "--learning_rate",
        "3e-2",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--model_max_length",
        "64",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--seed",
        "0",
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def want(trained) -> str:
    """The answer with plain transformers + peft, given the base folder by hand."""
    base, adapter = trained / "models" / "tiny", trained / "outputs" / "lora"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=GenerationConfig.from_pretrained(adapter).eos_token_id,
        )
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@contextlib.contextmanager
def base_gone(trained: Path):
    """The training-time base folder is not where it was (the adapter's recorded absolute path
    fails)."""
    os.rename(trained / "models" / "tiny", trained / "models" / "tiny-away")
    try:
        yield
    finally:
        os.rename(trained / "models" / "tiny-away", trained / "models" / "tiny")


def chat_answer(adapter: Path, cwd: Path, *flags: str) -> str:
    proc = run(
        "-m",
        "pipeline.chat",
        str(adapter),
        "--prompt",
        QUESTION,
        "--max_new_tokens",
        "8",
        *flags,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.removesuffix("\n")


def logits(model_dir: Path, adapter: Path | None = None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(model, adapter) if adapter else model
    with torch.no_grad():
        return model.eval()(torch.tensor([[1, 5, 9, 200, 31, 7]])).logits


PEFT = """import sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(torch.tensor([[1, 5, 9, 200, 31, 7]])).logits, sys.argv[2])
"""


def test_training_records_where_the_base_is(trained):
    adapter = trained / "outputs" / "lora"
    base = str((trained / "models" / "tiny").resolve())
    assert (
        json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    )
    fingerprint = json.loads((adapter / FINGERPRINT).read_text())
    assert (
        fingerprint["base_model"] == base
        and fingerprint["relative_to_adapter"] == "../../models/tiny"
    )


def test_chat_merge_and_peft_load_it_from_another_directory(trained, want, tmp_path):
    adapter = trained / "outputs" / "lora"
    assert chat_answer(adapter, tmp_path) == want
    merged = run(
        str(REPO / "merge_peft_adapter.py"),
        "--lora_model",
        str(adapter),
        "--output_dir",
        "merged",
        cwd=tmp_path,
    )
    assert merged.returncode == 0, merged.stderr[-3000:]
    peft = run("-c", PEFT, str(adapter), "peft.pt", cwd=tmp_path)
    assert peft.returncode == 0, peft.stderr[-3000:]
    adapted, plain = torch.load(tmp_path / "peft.pt"), logits(trained / "models" / "tiny")
    assert torch.allclose(logits(tmp_path / "merged"), adapted, atol=1e-4)
    assert not torch.allclose(adapted, plain, atol=1e-4)  # the adapter was applied


def test_both_folders_moved_together_still_load(trained, want, tmp_path):
    tree, flat, cwd = tmp_path / "tree", tmp_path / "flat", tmp_path / "cwd"
    shutil.copytree(
        trained, tree
    )  # the whole tree: models/tiny is found at ../../models/tiny from the adapter
    shutil.copytree(
        trained / "models" / "tiny", flat / "tiny"
    )  # side by side: found beside the adapter
    shutil.copytree(trained / "outputs" / "lora", flat / "lora")
    cwd.mkdir()
    with base_gone(trained):
        assert chat_answer(tree / "outputs" / "lora", cwd) == want
        merged = run(
            str(REPO / "merge_peft_adapter.py"),
            "--lora_model",
            str(flat / "lora"),
            "--output_dir",
            "merged",
            cwd=cwd,
        )
        assert merged.returncode == 0, merged.stderr[-3000:]
        assert torch.allclose(
            logits(cwd / "merged"), logits(tree / "models" / "tiny", flat / "lora"), atol=1e-4
        )
        model = chat.load_chat_model(str(flat / "lora"))
        assert (
            model.generate(
                [[{"role": "user", "content": QUESTION}]], chat.Sampling(max_new_tokens=8)
            )[0].text
            == want
        )


def test_base_model_override_and_the_sentence_when_nothing_resolves(trained, want, tmp_path):
    lone = tmp_path / "lone" / "lora"
    shutil.copytree(trained / "outputs" / "lora", lone)
    recorded = (trained / "models" / "tiny").resolve()
    sentence = (
        f"error: the base model {recorded} recorded in {lone / 'adapter_config.json'} is not "
        f"there, nor relative to the adapter, nor beside it as {lone.parent / 'tiny'}; pass "
        "--base_model with the base model's folder."
    )
    with base_gone(trained):
        proc = run("-m", "pipeline.chat", str(lone), "--prompt", QUESTION, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == sentence
        proc = run(
            str(REPO / "merge_peft_adapter.py"),
            "--lora_model",
            str(lone),
            "--output_dir",
            "m",
            cwd=tmp_path,
        )
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == sentence
        assert (
            chat_answer(lone, tmp_path, "--base_model", str(trained / "models" / "tiny-away"))
            == want
        )
        merge_adapter(str(trained / "models" / "tiny-away"), str(lone), str(tmp_path / "merged"))
    # an adapter from elsewhere whose base is a hub id: the hub is asked, and its failure named in
    # the same way
    config = json.loads((lone / "adapter_config.json").read_text())
    (lone / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "some-org/tiny-base"})
    )
    (lone / FINGERPRINT).unlink()
    proc = run("-m", "pipeline.chat", str(lone), "--prompt", QUESTION, cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        proc.returncode == 2
        and last.startswith(
            "error: cannot load the base model some-org/tiny-base recorded in "
            f"{lone / 'adapter_config.json'}: it is no folder here, relative to or beside the "
            "adapter, and as a hub id it fails ("
        )
        and last.endswith("); pass --base_model with the base model's folder.")
    )


def test_a_base_with_other_weights_is_refused(trained, tmp_path):
    adapter = trained / "outputs" / "lora"
    other = build(
        tmp_path / "other" / "tiny", seed=7
    )  # same architecture and shapes, other weights
    recorded = (trained / "models" / "tiny").resolve()
    with pytest.raises(
        UserError,
        match=f"--model {adapter} was trained on {recorded}, but --base_model {other} holds "
        "other weights .*; give --base_model the folder of",
    ):
        chat.load_chat_model(str(adapter), options=chat.LoadOptions(base_model=str(other)))
    with pytest.raises(
        UserError,
        match=f"--lora_model {adapter} was trained on {recorded}, but --base_model {other} "
        f"holds other weights .*; merge into {recorded}",
    ):
        merge_adapter(str(other), str(adapter), str(tmp_path / "wrong"))
    # a folder of the same name beside the adapter, but not its base
    beside = tmp_path / "other" / "lora"
    shutil.copytree(adapter, beside)
    with base_gone(trained):
        for load in (
            lambda: chat.load_chat_model(str(beside)),
            lambda: merge_adapter(None, str(beside), str(tmp_path / "wrong")),
        ):
            with pytest.raises(
                UserError,
                match=f"was trained on {recorded}, but the base found beside the adapter at "
                f"{other} holds other weights .*; pass --base_model with the folder of",
            ):
                load()
    assert not (tmp_path / "wrong").exists()
