"""train.py end to end on the tiny preset: evaluations, exact resume, NaN skipping, atomic checkpoints, 2 processes."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from pipeline_engraving import EngravingPipeline
from train import TRAINING_STATE_NAME, parse_args, resolve_resume_path


# 24 training images at batch 8: 3 steps per epoch, an evaluation at the end of each.
TINY_RUN = [
    "--preset",
    "tiny",
    "--train_batch_size",
    "8",
    "--report_to",
    "none",
    "--num_validation_samples",
    "2",
    "--eval_batch_size",
    "8",
    "--logging_steps",
    "1",
    "--vocab_size",
    "300",
]


def run_train(dataset_dir, output_dir, *flags, launcher=(sys.executable,), environment=None):
    """Runs train.py in a fresh process (as a user would) and returns the finished process."""
    command = [
        *launcher,
        str(REPO_ROOT / "train.py"),
        "--dataset_path",
        str(dataset_dir),
        "--output_dir",
        str(output_dir),
    ]
    command += ["--cache_dir", str(output_dir.parent / "cache"), *TINY_RUN, *flags]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(environment or {})}
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=240)


def two_cpu_processes(port):
    """Accelerate's multi-process launcher for train.py, on two CPU processes that talk over gloo on `port`."""
    return (
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    )


def step_losses(output_dir):
    """`{step: losses}` of the per-step training log lines (the last logged for each step), throughput left out."""
    lines = [
        re.sub(r" (step_)?images_per_second \S+", "", line)
        for line in (output_dir / "training.log").read_text().splitlines()
    ]
    return {
        int(m.group(1)): m.group(2) for m in (re.search(r"step (\d+)/\d+ epoch \d+ (.*)", line) for line in lines) if m
    }


def validation_records(output_dir):
    return [
        {k: v for k, v in r.items() if k == "step" or k.startswith("val_")}
        for r in json.loads((output_dir / "metrics.json").read_text())
    ]


# Warmup across the interruption, the EMA, the discriminator, DiffAugment, flips and crops: every piece of state
# matters on resume.
RESUME_FLAGS = [
    "--random_flip",
    "--random_crop_scale",
    "0.8",
    "--lr_scheduler",
    "constant_with_warmup",
    "--lr_warmup_steps",
    "5",
    "--learning_rate",
    "1e-3",
    "--checkpointing_steps",
    "4",
]


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_dataset_dir, tmp_path_factory):
    """7 steps (evaluations after steps 3, 6 and 7) with a checkpoint at step 4, never interrupted."""
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_train(tiny_dataset_dir, output_dir, "--max_train_steps", "7", *RESUME_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_training_writes_evaluations_and_a_loadable_model_with_the_ema_generator(uninterrupted_run):
    run = uninterrupted_run
    records = json.loads((run / "metrics.json").read_text())
    assert [record["step"] for record in records] == [3, 6, 7]
    assert all(record[f"val_{name}"] > 0 for record in records for name in ("loss_reconstruction", "loss_caption"))
    for name in ("samples-0000003.png", "reconstructions-0000006.png", "samples.png", "training.log"):
        assert (run / name).is_file(), name
    card = (run / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "samples.png" in card and "val_loss_caption" in card
    assert (run / "model" / "samples.png").is_file() and (run / "model" / "tokenizer.json").is_file()
    assert (run / "model" / "pipeline_engraving.py").is_file()
    output = EngravingPipeline.from_pretrained(run / "model")(seeds=[0, 1])
    assert (
        len(output.images) == 2
        and output.images[0].size == (32, 32)
        and all(isinstance(c, str) for c in output.captions)
    )
    # The saved generator is the EMA of the trained one, kept in the last checkpoint: not the trained weights.
    checkpoint = torch.load(run / "checkpoint-7" / "custom_checkpoint_2.pkl", weights_only=False)
    ema = {name.removeprefix("module."): value for name, value in checkpoint.items() if name.startswith("module.")}
    trained = torch.load(run / "checkpoint-7" / "custom_checkpoint_0.pkl", weights_only=False)
    saved = EngravingPipeline.from_pretrained(run / "model").model.generator.state_dict()
    assert all(torch.equal(saved[name], ema[name]) for name in saved)
    assert not all(torch.equal(saved[name], trained[f"generator.{name}"]) for name in saved)


def test_resumed_run_gives_the_same_losses_as_an_uninterrupted_one(tiny_dataset_dir, uninterrupted_run, tmp_path):
    # The interrupted run stops after step 4 (mid-epoch 2) and is resumed from its checkpoint.
    interrupted = run_train(tiny_dataset_dir, tmp_path / "b", "--max_train_steps", "4", *RESUME_FLAGS)
    assert interrupted.returncode == 0, interrupted.stderr[-3000:]
    resumed = run_train(
        tiny_dataset_dir, tmp_path / "b", "--max_train_steps", "7", "--resume_from_checkpoint", "latest", *RESUME_FLAGS
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in (tmp_path / "b" / "training.log").read_text()

    expected, actual = step_losses(uninterrupted_run), step_losses(tmp_path / "b")
    assert sorted(expected) == list(range(1, 8))
    for step in (5, 6, 7):
        assert actual[step] == expected[step], f"step {step} differs after resume"
    assert validation_records(tmp_path / "b") == validation_records(uninterrupted_run)


def test_non_finite_losses_are_skipped_counted_and_stop_training(tiny_dataset_dir, tmp_path):
    # A learning rate of 1e30 makes the weights overflow after the first step: every later loss is infinite or NaN.
    result = run_train(
        tiny_dataset_dir,
        tmp_path / "run",
        "--max_train_steps",
        "20",
        "--learning_rate",
        "1e30",
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--max_consecutive_nonfinite_steps",
        "3",
    )
    assert result.returncode != 0
    assert "the loss was NaN or infinite for 3 consecutive steps (3 skipped in all)" in result.stderr
    assert "Traceback" not in result.stderr
    assert step_losses(tmp_path / "run")[1]  # the first step was finite and trained
    assert not (tmp_path / "run" / "model").exists()


def test_latest_skips_checkpoints_whose_save_was_interrupted(tmp_path):
    def checkpoint(name, complete):
        path = tmp_path / name
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"weights")
        if complete:
            (path / TRAINING_STATE_NAME).write_text("{}")

    checkpoint("checkpoint-4", complete=True)
    checkpoint("checkpoint-12", complete=True)
    checkpoint("checkpoint-16.tmp", complete=True)  # killed before the rename
    checkpoint("checkpoint-20", complete=False)  # killed before its training state was written
    args = parse_args(
        ["--dataset_path", "unused", "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"]
    )
    assert resolve_resume_path(args) == tmp_path / "checkpoint-12"


def test_checkpoints_are_renamed_into_place_and_pruned_to_the_limit(tiny_dataset_dir, tmp_path):
    result = run_train(
        tiny_dataset_dir,
        tmp_path / "run",
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "2",
        "--validation_epochs",
        "10",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(path.name for path in (tmp_path / "run").iterdir() if path.name.startswith("checkpoint"))
    assert names == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((tmp_path / "run" / "checkpoint-6" / TRAINING_STATE_NAME).read_text())
    assert state["global_step"] == 6 and state["epoch"] == 2 and state["batches_done_in_epoch"] == 0


def test_two_processes_split_the_batch_and_only_the_main_one_logs_and_saves(tiny_dataset_dir, tmp_path):
    result = run_train(
        tiny_dataset_dir,
        tmp_path / "run",
        "--max_train_steps",
        "3",
        "--train_batch_size",
        "4",
        "--checkpointing_steps",
        "3",
        launcher=two_cpu_processes(29517),
        environment={"ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    log = (run / "training.log").read_text()
    # 24 images at 2 x 4 per step: 3 steps make one epoch, and one evaluation logged once.
    assert "2 process(es) x batch 4" in log and "3 per epoch" in log
    assert log.count("Evaluation at step 3") == 1
    assert [record["step"] for record in json.loads((run / "metrics.json").read_text())] == [3]
    checkpoint = run / "checkpoint-3"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert not any(path.name.endswith(".tmp") for path in run.iterdir())
    assert len(EngravingPipeline.from_pretrained(run / "model")(seeds=[3]).captions) == 1


def test_image_folder_splits_train_without_the_datasets_library_exactly_as_the_datasetdict(
    tiny_dataset_dir, tiny_image_folder_dir, without_datasets_library, uninterrupted_run, tmp_path
):
    output_dir = tmp_path / "run"
    result = run_train(
        tiny_image_folder_dir,
        output_dir,
        "--max_train_steps",
        "7",
        *RESUME_FLAGS,
        environment=without_datasets_library,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert step_losses(output_dir) == step_losses(uninterrupted_run)
    assert validation_records(output_dir) == validation_records(uninterrupted_run)


def test_push_to_hub_offline_fails_with_one_sentence_after_the_local_model(tiny_dataset_dir, tmp_path):
    output_dir = tmp_path / "run"
    result = run_train(
        tiny_dataset_dir, output_dir, "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "someone/engraving"
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Could not push to the Hub model repo someone/engraving")
    assert EngravingPipeline.from_pretrained(output_dir / "model").tokenizer is not None


def test_throughput_benchmark_times_the_training_step_and_the_whole_loop(tiny_dataset_dir, tmp_path):
    command = [
        sys.executable,
        str(REPO_ROOT / "bench" / "train_throughput.py"),
        "--preset",
        "tiny",
        "--image_size",
        "32",
        "--train_batch_size",
        "8",
        "--num_steps",
        "2",
        "--warmup_steps",
        "1",
        "--dataset_path",
        str(tiny_dataset_dir),
        "--output_dir",
        str(tmp_path / "work"),
        "--output_json",
        str(tmp_path / "throughput.json"),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["step_images_per_second"] > 0 and report["train_loop_images_per_second"] > 0
    # The step is part of the loop, so the loop is never faster than its steps.
    assert 0 < report["ratio"] <= 1.0 + 1e-3
    assert report["ratio"] == pytest.approx(
        report["train_loop_images_per_second"] / report["step_images_per_second"], abs=1e-3
    )


def test_a_loss_weighted_zero_is_skipped_in_training_and_validation(tiny_dataset_dir, tmp_path):
    result = run_train(
        tiny_dataset_dir,
        tmp_path / "run",
        "--max_train_steps",
        "2",
        "--config_overrides",
        "reconstruction_loss_weight=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]
    assert record["val_loss_reconstruction"] == 0.0 and record["val_loss_caption"] > 0
    assert step_losses(tmp_path / "run")[2]


def datasetdict_of(tmp_path, splits):
    """A DatasetDict of `{split: [(image, caption), ...]}` saved at `tmp_path / "data" / "dataset"`."""
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "caption": Value("string")})
    dataset = DatasetDict(
        {
            name: Dataset.from_dict(
                {"image": [r[0] for r in rows], "caption": [r[1] for r in rows]}, features=features
            )
            for name, rows in splits.items()
        }
    )
    dataset.save_to_disk(tmp_path / "data" / "dataset")
    return tmp_path / "data"


def test_bad_inputs_stop_training_with_one_sentence_and_no_traceback(tiny_dataset_dir, tmp_path):
    from conftest import shape_pairs

    pairs = shape_pairs() * 3
    empty_validation = datasetdict_of(tmp_path / "empty", {"train": pairs, "validation": []})
    run = tmp_path / "run"
    assert run_train(tiny_dataset_dir, run, "--max_train_steps", "3", "--checkpointing_steps", "3").returncode == 0
    (run / "checkpoint-3" / "custom_checkpoint_0.pkl").write_bytes(b"truncated")
    cases = [
        (tmp_path / "missing", [], "holds no dataset"),
        (empty_validation, [], "a split is empty or a file is damaged"),
        (tiny_dataset_dir, ["--resume_from_checkpoint", str(run / "checkpoint-3")], "the checkpoint is damaged"),
    ]
    for dataset, flags, message in cases:
        result = run_train(dataset, run, "--max_train_steps", "6", *flags)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert message in result.stderr.strip().splitlines()[-1], result.stderr[-500:]


def test_images_of_mixed_sizes_and_shapes_train(tmp_path):
    from conftest import shape_picture

    pictures = [shape_picture("circle", "left", size)[0] for size in (24, 40, 64)] + [
        Image.new("RGB", (50, 20), "white")
    ]
    rows = [(picture, "An engraving depicting a circle on the left") for picture in pictures * 3]
    dataset = datasetdict_of(tmp_path, {"train": rows, "validation": rows[:4]})
    result = run_train(dataset, tmp_path / "run", "--max_train_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_caption_drawing_trains_the_text_posterior_and_resumes_exactly(tiny_dataset_dir, tmp_path):
    flags = [
        "--checkpointing_steps",
        "2",
        "--config_overrides",
        "caption_drawing_loss_weight=10",
        "caption_prior_share=0.5",
    ]
    whole = run_train(tiny_dataset_dir, tmp_path / "a", "--max_train_steps", "4", *flags)
    assert whole.returncode == 0, whole.stderr[-3000:]
    interrupted = run_train(tiny_dataset_dir, tmp_path / "b", "--max_train_steps", "2", *flags)
    assert interrupted.returncode == 0, interrupted.stderr[-3000:]
    resumed = run_train(
        tiny_dataset_dir, tmp_path / "b", "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *flags
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, actual = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert "train_loss_caption_drawing" in expected[4] and "train_loss_caption_kl" in expected[4]
    assert [actual[step] for step in (3, 4)] == [expected[step] for step in (3, 4)]
    # Only the caption drawing's losses reach the posterior's spread: its bias starts at zero.
    pipeline = EngravingPipeline.from_pretrained(tmp_path / "a" / "model")
    assert pipeline.model.text_encoder.to_log_variance.bias.abs().sum() > 0
    output = pipeline(seeds=[0, 1])
    assert len(output.images) == 2 and all(output.captions)
    assert "seed samples its caption first" in (tmp_path / "a" / "model" / "README.md").read_text()
