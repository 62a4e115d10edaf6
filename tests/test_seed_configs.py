"""The GLM demos' nested config files and positional command line (pipeline/seed_configs.py), and
data given as files (--train_file / --validation_file / --test_file) rather than folders."""

import logging
from pathlib import Path

import pytest
import yaml

from pipeline import seed_flags
from pipeline.data.files import find_files
from pipeline.errors import UserError
from stages import rm, sft
from tests.helpers import DATA, REPO

GLM = REPO / "configs" / "glm"


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A demo-style data folder: train.json and dev.json side by side."""
    folder = tmp_path / "AdvertiseGen"
    folder.mkdir()
    lines = (DATA / "sft" / "color_qa.jsonl").read_text().splitlines()
    (folder / "train.json").write_text("\n".join(lines[:20]) + "\n")
    (folder / "dev.json").write_text("\n".join(lines[20:24]) + "\n")
    return folder


@pytest.fixture(autouse=True)
def fresh_log_once(monkeypatch):
    """Each mapping is logged once per process; other test files may have said it already."""
    monkeypatch.setattr(seed_flags, "_SAID", set())
    monkeypatch.setattr(seed_flags, "_PENDING", [])


def parse(*argv):
    parsed = sft.parse([str(a) for a in argv])
    seed_flags.say_notes()  # what a stage's setup_logging does
    return parsed


def test_the_lora_config_maps_onto_the_flags(tiny_model, data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    model, data, peft, args, train = parse(
        data_dir, tiny_model, GLM / "lora.yaml", "--output_dir", tmp_path / "out"
    )
    assert model.model_name_or_path == str(tiny_model)
    assert data.train_file == [str(data_dir / "train.json")] and data.validation_file == [
        str(data_dir / "dev.json")
    ]
    assert data.test_file == [str(data_dir / "dev.json")] and data.preprocessing_num_workers == 1
    assert args.model_max_length == 512 + 512  # max_input_length + max_output_length
    assert (
        peft.use_peft
        and peft.peft_type == "lora"
        and (peft.lora_rank, peft.lora_alpha, peft.lora_dropout) == (8, 32, 0.1)
    )
    assert peft.target_module_list == ["q_proj", "k_proj", "v_proj", "o_proj"]  # a YAML list
    assert (
        str(train.eval_strategy.value) == "steps"
        and train.eval_steps == 500
        and train.max_steps == 3000
    )
    assert train.learning_rate == 5e-4 and train.remove_unused_columns is False
    assert (
        args.predict_with_generate is True and args.max_new_tokens == 512
    )  # training_args.generation_config
    said = caplog.text
    assert (
        f"is read as --model_name_or_path {tiny_model}" in said and "--evaluation_strategy" in said
    )


def test_ptuning_and_full_configs(tiny_model, data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _, _, peft, args, _ = parse(
        data_dir, tiny_model, GLM / "ptuning_v2.yaml", "--output_dir", tmp_path / "a"
    )
    assert peft.use_peft and peft.peft_type == "prefix_tuning" and peft.num_virtual_tokens == 128
    assert args.model_max_length == 256
    assert "peft_config.num_attention_heads is read from the model's config" in caplog.text
    _, _, peft, args, train = parse(
        data_dir, tiny_model, GLM / "sft.yaml", "--output_dir", tmp_path / "b", "--deepspeed", ""
    )
    assert (
        peft.use_peft is False and args.model_max_length == 768
    )  # no peft_config: every weight trained
    assert (
        "combine is how the demo tokenizes" in caplog.text
        and "freezeV freezes a vision tower" in caplog.text
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["data_config"].update(shuffle=True),
            r"data_config.shuffle has no counterpart here; data_config takes",
        ),
        (lambda c: c["data_config"].pop("train_file"), r"data_config.train_file is missing"),
        (lambda c: c["peft_config"].update(peft_type="P_TUNING"), r"use LORA or PREFIX_TUNING"),
        (lambda c: c["peft_config"].update(task_type="SEQ_CLS"), r"use CAUSAL_LM"),
        (
            lambda c: c["peft_config"].update(fan_in_fan_out=True),
            r"peft_config.fan_in_fan_out has no counterpart here",
        ),
        (
            lambda c: c["training_args"]["generation_config"].update(num_beams=4),
            r"generation_config.num_beams has no ",
        ),
        (lambda c: c.update(data_config=["train.json"]), r"data_config must be a mapping"),
    ],
)
def test_config_keys_without_a_meaning_here_are_refused(
    tiny_model, data_dir, tmp_path, edit, message
):
    config = yaml.safe_load((GLM / "lora.yaml").read_text())
    edit(config)
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=message):
        parse(data_dir, tiny_model, path, "--output_dir", tmp_path / "out")


@pytest.mark.parametrize(
    "fourth, flag, value",
    [
        ("yes", "resume_from_checkpoint", "yes"),
        ("600", "resume_from_checkpoint", "600"),
        (
            str(REPO / "deepspeed_configs" / "zero2.json"),
            "deepspeed",
            str(REPO / "deepspeed_configs" / "zero2.json"),
        ),
    ],
)
def test_the_fourth_positional_argument(tiny_model, data_dir, tmp_path, fourth, flag, value):
    *_, train = parse(
        data_dir, tiny_model, GLM / "lora.yaml", fourth, "--output_dir", tmp_path / "out"
    )
    assert getattr(train, flag) == value


def test_a_wrong_fourth_argument_is_refused(tiny_model, data_dir, tmp_path):
    with pytest.raises(UserError, match="is not yes, a checkpoint step or a DeepSpeed .json file"):
        parse(data_dir, tiny_model, GLM / "lora.yaml", "maybe", "--output_dir", tmp_path / "out")


def test_a_flat_config_in_the_positional_form_reads_data_dir_as_the_training_folder(
    tiny_model, tmp_path
):
    config = tmp_path / "flat.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nlora_rank: 4\n")
    _, data, peft, _, _ = parse(DATA / "sft", tiny_model, config)
    assert data.train_file_dir == str(DATA / "sft") and peft.lora_rank == 4


def test_a_training_folder_holding_dev_data_is_refused_naming_the_split(data_dir):
    with pytest.raises(
        UserError,
        match=rf"--train_file {data_dir / 'train.json'} --validation_file {data_dir / 'dev.json'}",
    ):
        find_files(str(data_dir), "--train_file_dir")
    assert (
        len(find_files(str(data_dir), "--validation_file_dir")) == 2
    )  # a held-out folder may hold both


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train_file_dir", "FILE"], r"is a file, not a folder; give it as --train_file "),
        (["--train_file", "DIR"], r"is a folder; give it as --train_file_dir"),
        (
            ["--train_file_dir", "DIR", "--train_file", "FILE"],
            r"give --train_file_dir \(a folder\) or --train_file",
        ),
        (
            ["--train_file", "FILE", "--test_file", "FILE"],
            r"--test_file is predicted and scored .* --predict_with_generate True",
        ),
        (
            ["--train_fil", "FILE"],
            r"--train_fil",
        ),  # no abbreviations: a prefix is not taken as --train_file(_dir)
    ],
)
def test_data_flag_mistakes_are_refused(tiny_model, tmp_path, flags, message):
    names = {"FILE": str(DATA / "sft" / "color_qa.jsonl"), "DIR": str(DATA / "sft")}
    argv = [
        "--model_name_or_path",
        tiny_model,
        "--output_dir",
        tmp_path / "out",
        *[names.get(f, f) for f in flags],
    ]
    with pytest.raises(UserError, match=message):
        _, data, *_ = parse(*argv)
        find_files(*data.train_source)


def test_test_file_is_refused_where_nothing_predicts(tiny_model, tmp_path):
    argv = [
        "--model_name_or_path",
        str(tiny_model),
        "--output_dir",
        str(tmp_path / "out"),
        "--train_file_dir",
        str(DATA / "reward"),
        "--test_file",
        str(DATA / "reward" / "x.jsonl"),
    ]
    with pytest.raises(UserError, match="--test_file is read by the SFT stage"):
        rm.parse(argv)


@pytest.mark.slow
def test_sft_trains_on_named_files(tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    sft.main(
        [
            "--model_name_or_path",
            str(tiny_model),
            "--train_file",
            str(data_dir / "train.json"),
            "--validation_file",
            str(data_dir / "dev.json"),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--template_name",
            "qwen",
            "--report_to",
            "none",
        ]
    )
    assert (out / "adapter_model.safetensors").is_file() and (out / "eval_results.json").is_file()


def test_prompt_and_response_columns_reach_sft_and_ppo(tiny_model, tmp_path):
    from stages import ppo

    *_, args, _ = parse(
        "--model_name_or_path",
        tiny_model,
        "--output_dir",
        tmp_path / "a",
        "--train_file_dir",
        DATA / "sft",
        "--prompt_column",
        "q",
        "--response_column",
        "a",
    )
    assert args.data_format == "columns:q:a"
    parsed = ppo.parse(
        [
            "--model_name_or_path",
            str(tiny_model),
            "--reward_model_name_or_path",
            str(tiny_model),
            "--train_file_dir",
            str(DATA / "sft"),
            "--output_dir",
            str(tmp_path / "b"),
            "--prompt_column",
            "q",
            "--response_column",
            "a",
            "--max_steps",
            "1",
        ]
    )
    assert [p.data_format for p in parsed if hasattr(p, "data_format")] == ["columns:q:a"]
    with pytest.raises(UserError, match="--response_column needs --prompt_column too"):
        parse(
            "--model_name_or_path",
            tiny_model,
            "--output_dir",
            tmp_path / "c",
            "--train_file_dir",
            DATA / "sft",
            "--response_column",
            "a",
        )
