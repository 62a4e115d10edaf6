"""One run per output folder: --overwrite_output_dir starts afresh (the old checkpoints go), and
resuming a finished run trains zero more steps and keeps its weights."""

import json

from safetensors.torch import load_file

from stages import sft
from tests.helpers import DATA


def run_sft(model, out, *flags):
    sft.main(
        [
            "--model_name_or_path",
            str(model),
            "--template_name",
            "qwen",
            "--train_file_dir",
            str(DATA / "sft"),
            "--validation_split_percentage",
            "0",
            "--output_dir",
            str(out),
            "--use_peft",
            "False",
            "--learning_rate",
            "1e-3",
            "--lr_scheduler_type",
            "constant",
            "--per_device_train_batch_size",
            "4",
            "--model_max_length",
            "128",
            "--report_to",
            "none",
            "--seed",
            "0",
            "--packing",
            "False",
            *flags,
        ]
    )


def global_step(out) -> int:
    return json.loads((out / "trainer_state.json").read_text())["global_step"]


def test_resuming_a_finished_run_trains_no_more_steps(tiny_model, tmp_path):
    out = tmp_path / "sft"
    run_sft(tiny_model, out, "--max_steps", "4", "--save_steps", "2")
    weights = load_file(out / "model.safetensors")
    run_sft(
        tiny_model, out, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "auto"
    )
    assert global_step(out) == 4
    again = load_file(out / "model.safetensors")
    assert all(again[name].equal(tensor) for name, tensor in weights.items())


def test_overwrite_output_dir_starts_afresh(tiny_model, tmp_path):
    out = tmp_path / "sft"
    run_sft(tiny_model, out, "--max_steps", "4", "--save_steps", "2")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (out / "notes.txt").write_text("the user's own file")
    run_sft(
        tiny_model, out, "--max_steps", "3", "--save_steps", "3", "--overwrite_output_dir", "True"
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-3"
    ]  # the old run's are gone
    assert (
        global_step(out) == 3 and (out / "notes.txt").is_file()
    )  # files the stages do not write stay


def test_a_checkpoint_of_another_run_is_refused_not_resumed(tiny_model, tmp_path):
    import pytest

    from pipeline.errors import UserError
    from stages import pt

    out = tmp_path / "sft"
    run_sft(tiny_model, out, "--max_steps", "2", "--save_steps", "1")
    resume = ("--max_steps", "4", "--save_steps", "1", "--resume_from_checkpoint", "auto")
    # the checkpoint's schedule would bring back 1e-3 without a word
    with pytest.raises(UserError, match=r"another learning rate \(0.001, not 0.0005\)"):
        run_sft(tiny_model, out, *resume, "--learning_rate", "5e-4")
    with pytest.raises(UserError, match=r"another method \(full, not LoRA rank 8 on all\)"):
        run_sft(tiny_model, out, *resume, "--use_peft", "True")
    # an explicit checkpoint of another folder: its run is compared too
    other = ("--max_steps", "4", "--resume_from_checkpoint", str(out / "checkpoint-1"))
    with pytest.raises(UserError, match="checkpoint-1 is a checkpoint of another method"):
        run_sft(tiny_model, tmp_path / "lora", *other, "--use_peft", "True")
    pt.main(
        [
            *("--model_name_or_path", str(tiny_model), "--train_file_dir", str(DATA / "pt")),
            *("--output_dir", str(tmp_path / "pt"), "--use_peft", "False", "--block_size", "64"),
            *("--learning_rate", "1e-3", "--lr_scheduler_type", "constant"),
            *("--max_steps", "1", "--save_steps", "1", "--report_to", "none"),
            *("--validation_split_percentage", "0", "--per_device_train_batch_size", "4"),
        ]
    )
    with pytest.raises(UserError, match=r"is a checkpoint of another stage \(pt, not sft\)"):
        run_sft(
            tiny_model, tmp_path / "s2", *other[:2], other[2], str(tmp_path / "pt" / "checkpoint-1")
        )
    run_sft(tiny_model, out, *resume)  # the run itself resumes
    assert global_step(out) == 4
