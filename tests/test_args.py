"""Argument parsing: seed flag names, config file + CLI overrides, unknown flags, CPU defaults,
resume."""

import os
import subprocess
import sys

import pytest

from pipeline.args import (
    DataArguments,
    ModelArguments,
    PeftArguments,
    PipelineTrainingArguments,
    parse_args,
)
from pipeline.errors import UserError
from pipeline.run.resume import resolve_resume_checkpoint
from pipeline.run.setup import setup_run
from tests.helpers import REPO

TYPES = (ModelArguments, DataArguments, PeftArguments, PipelineTrainingArguments)
BASE = ["--model_name_or_path", "m", "--train_file_dir", "d", "--output_dir"]


def test_seed_flags_parse(tmp_path):
    model, data, peft, train = parse_args(
        TYPES,
        BASE
        + [
            str(tmp_path),
            "--target_modules",
            "q_proj,v_proj",
            "--lora_rank",
            "4",
            "--modules_to_save",
            "embed_tokens,lm_head",
            "--max_train_samples",
            "-1",
            "--max_eval_samples",
            "50",
            "--qlora",
            "True",
            "--torch_dtype",
            "float32",
        ],
    )
    assert peft.target_module_list == ["q_proj", "v_proj"] and peft.lora_rank == 4
    assert peft.modules_to_save_list == ["embed_tokens", "lm_head"]
    assert data.max_train_samples is None and data.max_eval_samples == 50
    assert model.load_in_4bit and model.tokenizer_name_or_path == "m"
    assert PeftArguments().target_module_list == "all"


def test_seed_length_flags_set_the_pair_budget():
    from pipeline.args import PreferenceArguments

    assert PreferenceArguments(max_source_length=256, max_target_length=256).model_max_length == 512
    assert PreferenceArguments(model_max_length=300).model_max_length == 300
    with pytest.raises(UserError, match="give both --max_source_length and --max_target_length"):
        PreferenceArguments(max_source_length=256)


def test_cpu_defaults_need_no_flags(tmp_path):
    *_, train = parse_args(TYPES, BASE + [str(tmp_path)])
    assert train.bf16 is False and train.use_cpu is True
    assert train.report_to == ["tensorboard"] and train.do_train and train.do_eval


def test_step_counts_with_their_strategy_parse(tmp_path, caplog):
    _, _, _, training = parse_args(
        TYPES, BASE + [str(tmp_path), "--eval_strategy", "steps", "--eval_steps", "7"]
    )
    assert training.eval_steps == 7
    _, _, _, training = parse_args(TYPES, BASE + [str(tmp_path), "--save_steps", "9"])
    assert training.save_steps == 9  # save_strategy's default is steps
    with caplog.at_level("WARNING"):  # a strategy given beside it is the user's choice: said
        parse_args(TYPES, BASE + [str(tmp_path), "--save_steps", "9", "--save_strategy", "no"])
    assert "--save_steps 9 is not read: --save_strategy is no" in caplog.text


def test_yaml_config_with_cli_override(tmp_path):
    config = tmp_path / "pt.yaml"
    config.write_text(
        f"model_name_or_path: m\ntrain_file_dir: d\noutput_dir: {tmp_path}\nlora_rank: 16\n"
        "use_peft: true\nlearning_rate: 0.001\n"
    )
    _, _, peft, train = parse_args(TYPES, [str(config), "--lora_rank", "32"])
    assert peft.lora_rank == 32 and peft.use_peft is True and train.learning_rate == 0.001
    _, _, peft, _ = parse_args(TYPES, ["--config", str(config)])
    assert peft.lora_rank == 16


def test_unknown_flag_is_an_error(tmp_path):
    with pytest.raises(UserError, match="--no_such_flag"):
        parse_args(TYPES, BASE + [str(tmp_path), "--no_such_flag", "1"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--load_in_4bit", "True", "--load_in_8bit", "True"], "exclude each other"),
        (["--peft_path", "nowhere"], "no adapter_config.json"),
        (["--use_peft", "False", "--peft_path", "x"], "needs --use_peft True"),
        (["--fp16", "True"], "needs a CUDA GPU"),
        (["--validation_split_percentage", "120"], "validation_split_percentage"),
        # a step count beside another strategy would do nothing: no evaluation at all here
        (["--eval_steps", "100"], "--eval_steps 100 is read only with --eval_strategy steps"),
    ],
)
def test_invalid_combinations_are_rejected(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        parse_args(TYPES, BASE + [str(tmp_path)] + flags)


def test_resume_values_and_incomplete_checkpoints(tmp_path, caplog):
    from pipeline.run.checkpoints import mark_complete

    for step in (5, 12, 15):
        (tmp_path / f"checkpoint-{step}").mkdir()
    mark_complete(tmp_path / "checkpoint-5", 5)
    mark_complete(tmp_path / "checkpoint-12", 12)  # checkpoint-15: a save that was killed half way

    def resolve(value):
        *_, train = parse_args(TYPES, BASE + [str(tmp_path), "--resume_from_checkpoint", value])
        return resolve_resume_checkpoint(train)

    assert resolve("yes").endswith("checkpoint-12") and resolve("auto").endswith("checkpoint-12")
    assert "skipping" in caplog.text and "checkpoint-15" in caplog.text
    assert resolve("5").endswith("checkpoint-5")
    with pytest.raises(UserError, match="does not exist"):
        resolve("7")
    with pytest.raises(UserError, match="checkpoint-15 is incomplete"):
        resolve("15")


def test_parsing_has_no_side_effects(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    *_, train = parse_args(TYPES, BASE + [str(tmp_path / "out")])
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # parsing sets nothing; setup_run does, once
    setup_run(train)
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "out" / "logs")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--load_in_4bit", "True", "--use_peft", "False"], "cannot be trained in full"),
        (["--rope_scaling", "linear", "--model_max_length", "512"], "set --model_max_length above"),
        (["--model_type", "qwen2"], "is a 'llama' model"),
    ],
)
def test_cross_flag_checks_run_at_parse_time(tiny_model, tmp_path, flags, message):
    """The validation pass stops a wrong combination before any tokenizer, data or weights are
    loaded."""
    from stages import sft

    argv = [
        "--model_name_or_path",
        str(tiny_model),
        "--train_file_dir",
        str(tmp_path / "no-data-needed"),
        "--output_dir",
        str(tmp_path / "out"),
        *flags,
    ]
    with pytest.raises(UserError, match=message):
        sft.parse(argv)


def test_a_user_error_keeps_its_cause(tmp_path):
    script = (
        "from pipeline.errors import run_cli\nfrom pipeline.data.files import iter_json_records\n"
        "from pathlib import Path\nrun_cli(lambda: list(iter_json_records(Path(r'%s'))))\n"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "run.py").write_text(script % bad)
    plain = subprocess.run(
        [sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, cwd=REPO
    )
    assert plain.returncode == 2 and plain.stderr.strip().startswith(
        f"error: {bad}:2: not a valid JSON line"
    )
    assert "Traceback" not in plain.stderr  # one sentence by default
    debug = subprocess.run(
        [sys.executable, str(tmp_path / "run.py")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PIPELINE_DEBUG": "1"},
    )
    assert debug.returncode == 2 and "JSONDecodeError" in debug.stderr  # the cause, chained
    assert (
        "The above exception was the direct cause" in debug.stderr
        and f"error: {bad}:2" in debug.stderr
    )


def _flag_classes() -> set[type]:
    """Every project class a stage parses, with the project classes it inherits flags from."""
    from pipeline.args import STAGE_ARGUMENTS

    return {
        base
        for classes in STAGE_ARGUMENTS.values()
        for cls in classes
        for base in cls.__mro__
        if base.__module__.startswith("pipeline.")
    }


def test_each_flag_is_declared_once_in_the_args_package():
    """A flag two stages share lives in one class they both take or inherit: its name, default and
    help are written once. The Trainer's own flags the project re-declares (defaults it changes)
    count as the project's."""
    import typing

    declared: dict[str, list[str]] = {}
    for cls in _flag_classes():
        assert cls.__module__.startswith("pipeline.args."), (
            f"{cls.__name__} is declared in {cls.__module__}"
        )
        for name, kind in cls.__dict__.get("__annotations__", {}).items():
            if (
                not str(kind).startswith("ClassVar")
                and typing.get_origin(kind) is not typing.ClassVar
            ):
                declared.setdefault(name, []).append(cls.__name__)
    twice = {name: owners for name, owners in declared.items() if len(owners) > 1}
    assert not twice, f"flags declared in more than one class: {twice}"
    assert {"template_name", "model_max_length", "packing", "max_new_tokens", "algorithm"} <= set(
        declared
    )


def test_stages_parse_the_table_and_declare_no_flags():
    """stages/*.py hold no argument classes: each parses the classes STAGE_ARGUMENTS names for
    it."""
    import ast
    import importlib

    from pipeline.args import STAGE_ARGUMENTS

    for stage, classes in STAGE_ARGUMENTS.items():
        source = (REPO / "stages" / f"{stage}.py").read_text(encoding="utf-8")
        dataclasses_there = [
            node.name
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ClassDef)
            and any("dataclass" in ast.unparse(d) for d in node.decorator_list)
        ]
        assert not dataclasses_there, f"stages/{stage}.py declares {dataclasses_there}"
        assert importlib.import_module(f"stages.{stage}").ARGUMENTS is classes


def test_shared_flags_keep_each_stages_default():
    """One declaration, each stage's own default: SFT's held-out answers 512 tokens, PPO's rollouts
    64; the algorithm ppo in stages/ppo.py, grpo in stages/grpo.py."""
    from pipeline.args import GroupRelativeArguments, PPOArguments, SFTArguments

    assert SFTArguments(predict_with_generate=True).max_new_tokens == 512
    rm = {"reward_model_name_or_path": "rm"}
    assert PPOArguments(**rm).max_new_tokens == 64 and PPOArguments(**rm).algorithm == "ppo"
    assert (
        GroupRelativeArguments(**rm).algorithm == "grpo"
        and GroupRelativeArguments(**rm).ppo_epochs == 1
    )
    assert PPOArguments(**rm).ppo_epochs == 4
    with pytest.raises(UserError, match="--model_max_length must be at least 8"):
        PPOArguments(model_max_length=4, max_new_tokens=2, **rm)


def test_each_rl_script_names_the_other_for_its_algorithms():
    """stages/grpo.py given --algorithm ppo (and PPO given a group algorithm) says which script runs
    it, before the checks of flags that script would need; SFT takes its default --max_new_tokens as
    given (the GLM demos' configs write it), and the seeds' two length budgets are named when they
    add up to too little."""
    from pipeline.args import (
        GroupRelativeArguments,
        PPOArguments,
        PreferenceArguments,
        SFTArguments,
    )

    with pytest.raises(UserError, match="PPO runs in stages/ppo.py"):
        GroupRelativeArguments(algorithm="ppo", reward_funcs="exact_match")
    with pytest.raises(UserError, match="bash run_grpo.sh --algorithm dapo"):
        PPOArguments(algorithm="dapo", reward_model_name_or_path="rm")
    assert SFTArguments(max_new_tokens=512).max_new_tokens == 512
    with pytest.raises(UserError, match="--max_new_tokens sets the held-out answers"):
        SFTArguments(max_new_tokens=64)
    with pytest.raises(
        UserError, match="--max_source_length \\+ --max_target_length must be at least 8"
    ):
        PreferenceArguments(max_source_length=3, max_target_length=4)
