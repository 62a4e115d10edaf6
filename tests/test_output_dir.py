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
