"""
Training throughput, in images per second, measured twice in one run on the same machine:

(a) compute only: train.py's `training_step` (the discriminator's, the generator's and the encoder's steps) on one
    fixed batch already on the device, with train.py's own helpers and settings;
(b) train.py's real loop on real data: the script itself, with its cache, batching and augmentation, timed by its
    own throughput log over the last window of steps.

The ratio (b)/(a) says how much the input pipeline costs (goal: >= 0.9):

    python bench/train_throughput.py --preset base --image_size 256 --train_batch_size 64 --mixed_precision bf16
    python bench/train_throughput.py --preset small --image_size 128 --train_batch_size 16 --num_steps 5   # CPU

Without --dataset_path it first makes a procedural demo dataset with prepare_dataset.py.
"""

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from train import (  # noqa: E402
    build_config,
    build_networks,
    build_optimizers,
    load_dataset_dict,
    load_or_train_tokenizer,
    training_step,
)
from train import parse_args as parse_train_args  # noqa: E402


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
        help="Untimed steps first (compilation, allocator, cuDNN autotuning); rounded up to a multiple of --num_steps.",
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
        "--compute_only", action="store_true", help="Measure (a) only, e.g. to compare model variants."
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


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_only_images_per_second(train_args, warmup_steps, num_steps):
    """(a): train.py's networks, optimizers and `training_step` on one fixed random batch already on the device."""
    accelerator = Accelerator(mixed_precision=train_args.mixed_precision)
    dataset = load_dataset_dict(train_args.dataset_path)
    captions = dataset["train"]["caption"]
    tokenizer = load_or_train_tokenizer(train_args, captions)
    config = build_config(train_args, tokenizer, captions)
    torch.manual_seed(0)
    networks = build_networks(config, tokenizer, train_args.ema_decay, accelerator.device)
    optimizers = accelerator.prepare(*build_optimizers(train_args, networks[0], networks[1], accelerator.device))
    networks[0].train()
    batch, device = train_args.train_batch_size, accelerator.device
    pixel_values = torch.rand(batch, 3, config.image_size, config.image_size, device=device) * 2 - 1
    if device.type == "cuda":
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    input_ids = torch.randint(4, config.vocab_size, (batch, config.max_caption_length), device=device)
    attention_mask = torch.ones_like(input_ids)

    def step():
        training_step(
            accelerator, networks, optimizers, pixel_values, input_ids, attention_mask, train_args.max_grad_norm
        )

    for index in range(warmup_steps + num_steps):
        if index == warmup_steps:
            synchronize(device)
            start = time.perf_counter()
        step()
    synchronize(device)
    images_per_second = num_steps * batch / (time.perf_counter() - start)
    # The matrix and convolution FLOPs of one step (all three players, forward and backward), to set the throughput
    # against the chip's rate.
    with FlopCounterMode(display=False) as counter:
        step()
    return images_per_second, str(device), counter.get_total_flops() / batch


def real_loop_images_per_second(flags, output_dir):
    """(b): runs train.py and reads the throughput it logged for its last window of steps."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *flags], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"train.py failed:\n{result.stderr[-3000:]}")
    log = (output_dir / "train" / "training.log").read_text()
    return float(re.findall(r"images_per_second (\S+)", log)[-1])


def main():
    args = parse_args()
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="train_throughput_"))
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset_path = args.dataset_path or make_demo_dataset(args, output_dir)
    warmup_steps = math.ceil(args.warmup_steps / args.num_steps) * args.num_steps
    flags = train_flags(args, dataset_path, output_dir, warmup_steps + args.num_steps)

    compute_only, device, flops_per_image = compute_only_images_per_second(
        parse_train_args(flags), warmup_steps, args.num_steps
    )
    real_loop = None if args.compute_only else real_loop_images_per_second(flags, output_dir)
    results = {
        "preset": args.preset,
        "image_size": args.image_size,
        "train_batch_size": args.train_batch_size,
        "mixed_precision": args.mixed_precision,
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads",
        "timed_steps": args.num_steps,
        "config_overrides": args.config_overrides,
        "training_gflop_per_image": round(flops_per_image / 1e9, 2),
        "compute_only_images_per_second": round(compute_only, 2),
        "compute_only_tflop_per_second": round(flops_per_image * compute_only / 1e12, 2),
        "train_loop_images_per_second": None if real_loop is None else round(real_loop, 2),
        "ratio": None if real_loop is None else round(real_loop / compute_only, 3),
    }
    print(json.dumps(results, indent=2))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
