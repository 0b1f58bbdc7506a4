"""
Training throughput, in images per second, of train.py itself on one machine, measured twice in one run:

(a) the training step: the time inside `training_step` (the discriminator's, the generator's and the encoder's
    steps), which train.py logs as `step_images_per_second`;
(b) the whole loop, with its cache, batching and augmentation: train.py's `images_per_second`.

Both come from train.py's throughput log over the last window of steps. The ratio (b)/(a) says how much the input
pipeline and the bookkeeping cost (goal: >= 0.9):

    python bench/train_throughput.py --preset base --image_size 256 --train_batch_size 64 --mixed_precision bf16
    python bench/train_throughput.py --preset small --image_size 128 --train_batch_size 16 --num_steps 5   # CPU

Without --dataset_path it first makes a procedural demo dataset with prepare_dataset.py.
"""

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    parser = argparse.ArgumentParser(
        description="Images/s of the compute-only training step and of train.py's real loop."
    )
    parser.add_argument("--preset", default="base", help="Model preset.")
    parser.add_argument("--image_size", type=int, default=512, help="Image size.")
    parser.add_argument("--train_batch_size", type=int, default=64, help="Images per step.")
    parser.add_argument("--num_steps", type=int, default=20, help="Timed steps of each measurement.")
    parser.add_argument(
        "--warmup_steps",
        type=int,
        default=10,
        help="Untimed steps (compilation, allocator, cuDNN autotuning), rounded up to a multiple of --num_steps.",
    )
    parser.add_argument(
        "--mixed_precision",
        default="bf16" if torch.cuda.is_available() else "no",
        choices=["no", "fp16", "bf16"],
        help="Autocast precision.",
    )
    parser.add_argument(
        "--config_overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="EngravingConfig fields for both measurements, e.g. encoder_channels=[8,16,32,64,128,256,256,256].",
    )
    parser.add_argument(
        "--dataset_path",
        default=None,
        help="A prepared dataset for (b); default: a procedural demo dataset made here.",
    )
    parser.add_argument(
        "--num_images", type=int, default=512, help="Size of the procedural demo dataset, without --dataset_path."
    )
    parser.add_argument("--output_dir", default=None, help="Working folder (default: a temporary one).")
    parser.add_argument("--output_json", default=None, help="Also write the results here.")
    return parser.parse_args()


def make_demo_dataset(args, output_dir):
    path = output_dir / "demo_data"
    command = [
        sys.executable,
        str(REPO_ROOT / "prepare_dataset.py"),
        "--source",
        "demo",
        "--num_images",
        str(args.num_images),
    ]
    command += ["--image_size", str(args.image_size), "--output_dir", str(path)]
    subprocess.run(command, check=True, capture_output=True)
    return path


def train_flags(args, dataset_path, output_dir, total_steps):
    """train.py flags shared by both measurements: no evaluation or checkpoints."""
    flags = [
        "--dataset_path",
        str(dataset_path),
        "--output_dir",
        str(output_dir / "train"),
        "--cache_dir",
        str(output_dir / "cache"),
    ]
    flags += [
        "--preset",
        args.preset,
        "--image_size",
        str(args.image_size),
        "--train_batch_size",
        str(args.train_batch_size),
    ]
    flags += ["--mixed_precision", args.mixed_precision, "--max_train_steps", str(total_steps)]
    flags += [
        "--logging_steps",
        str(args.num_steps),
        "--validation_epochs",
        "1000000",
        "--checkpointing_steps",
        "1000000000",
    ]
    flags += ["--num_validation_samples", "1", "--report_to", "none"]
    if args.config_overrides:
        flags += ["--config_overrides", *args.config_overrides]
    return flags


def logged_throughput(flags, output_dir):
    """Runs train.py and reads (a) and (b) from the throughput it logged for its last window of steps."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *flags], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"train.py failed:\n{result.stderr[-3000:]}")
    log = (output_dir / "train" / "training.log").read_text()
    step = float(re.findall(r"step_images_per_second (\S+)", log)[-1])
    loop = float(re.findall(r" images_per_second (\S+)", log)[-1])
    return step, loop


def main():
    args = parse_args()
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="train_throughput_"))
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset_path = args.dataset_path or make_demo_dataset(args, output_dir)
    warmup_steps = math.ceil(args.warmup_steps / args.num_steps) * args.num_steps
    flags = train_flags(args, dataset_path, output_dir, warmup_steps + args.num_steps)

    step, loop = logged_throughput(flags, output_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {
        "preset": args.preset,
        "image_size": args.image_size,
        "train_batch_size": args.train_batch_size,
        "mixed_precision": args.mixed_precision,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'}",
        "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
        "timed_steps": args.num_steps,
        "config_overrides": args.config_overrides,
        "step_images_per_second": round(step, 2),
        "train_loop_images_per_second": round(loop, 2),
        "ratio": round(loop / step, 3),
    }
    print(json.dumps(results, indent=2))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
