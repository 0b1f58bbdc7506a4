"""
Trains an Engraving model on a captioned image dataset, with Accelerate.

    accelerate launch train.py --dataset_path data/engravings --preset base --output_dir runs/base
    python train.py --dataset_path outputs/demo_data --preset small --image_size 64 --output_dir outputs/demo

The dataset is a `DatasetDict` saved with `save_to_disk` (at `--dataset_path` or `--dataset_path/dataset`) with
`train` and `validation` splits and `image` and `caption` columns, or prepare_dataset.py's ImageFolder splits
`train/` and `validation/` (read without the `datasets` library, e.g. on a bare GPU image). Its images are decoded once into a uint8 cache on
disk, memory-mapped, kept on the GPU when they fit, and augmented there. Every evaluation writes validation losses,
a captioned sample grid and reconstructions to `--output_dir`, appends to `metrics.json` and, when the validation
loss improves, saves `best_model/` (weights, tokenizer, a fitted latent prior and a model card). Checkpoints hold
everything needed for an exact resume and are written atomically.
"""

import argparse
import contextlib
import copy
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler

from configuration_engraving import EngravingConfig, ENGRAVING_PRESETS
from generate import captioned_grid
from modeling_engraving import (
    EngravingDiscriminator,
    EngravingModel,
    caption_words,
    pixel_values_to_images,
    resize_and_pad,
)
from tokenization_engraving import train_tokenizer


logger = get_logger(__name__, log_level="INFO")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_NAME = "training_state.json"
LOSS_NAMES = ["loss", "loss_reconstruction", "loss_kl", "loss_caption", "loss_contrastive", "loss_prior"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train an Engraving model (images + captions) with Accelerate.")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_path", required=True, help="A DatasetDict saved with save_to_disk (or a folder holding it as `dataset/`) with `train` and `validation` splits of `image` and `caption`; or a folder of ImageFolder splits `train/` and `validation/` with metadata.jsonl.")
    data.add_argument("--cache_dir", default=os.path.join("~", ".cache", "engraving"), help="Where the decoded uint8 image cache is kept, keyed by dataset fingerprint and image size.")
    data.add_argument("--image_size", type=int, default=None, help="Train at this image size instead of the preset's.")
    data.add_argument("--random_flip", action="store_true", help="Flip training images horizontally at random (off by default: captions may say left or right).")
    data.add_argument("--random_crop_scale", type=float, default=0.9, help="Smallest side of the random crop, as a share of the image, resized back to full size; 1 turns cropping off.")

    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="base", choices=sorted(ENGRAVING_PRESETS), help="Model size preset of EngravingConfig.")
    model.add_argument("--tokenizer_path", default=None, help="A saved tokenizer to use; when absent, a BPE is trained on the training captions.")
    model.add_argument("--vocab_size", type=int, default=8000, help="Largest vocabulary of the tokenizer trained when --tokenizer_path is absent.")
    model.add_argument("--unconstrained_captions", action="store_true", help="Let decoded captions spell any token sequence; by default they keep to the whole words of the training captions (config.caption_words).")
    model.add_argument("--adversarial_start_step", type=int, default=None, help="Optimizer step at which the adversarial loss starts (default: the preset's).")
    model.add_argument("--adversarial_loss_weight", type=float, default=None, help="Weight of the adversarial loss; 0 turns the discriminator off (default: the preset's).")
    model.add_argument("--config_overrides", nargs="*", default=[], metavar="KEY=VALUE", help="Further EngravingConfig fields, e.g. kl_loss_weight=1e-4 latent_size=512 (values are JSON).")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--num_epochs", type=int, default=50, help="Passes over the training set.")
    optimisation.add_argument("--max_train_steps", type=int, default=None, help="Stop after this many optimizer steps; overrides --num_epochs.")
    optimisation.add_argument(
        "--max_train_minutes", type=float, default=None,
        help="Also stop once training has run this many minutes (a fixed time budget, e.g. for CPU recipes).",
    )
    optimisation.add_argument("--train_batch_size", type=int, default=32, help="Images per process per step.")
    optimisation.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches whose gradients are summed before each optimizer step.")
    optimisation.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate of AdamW.")
    optimisation.add_argument("--lr_scheduler", default="cosine", choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"], help="Learning-rate schedule, after --lr_warmup_steps of linear warmup.")
    optimisation.add_argument("--lr_warmup_steps", type=int, default=500, help="Linear warmup steps of the schedule.")
    optimisation.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    optimisation.add_argument("--adam_beta2", type=float, default=0.99, help="AdamW beta2.")
    optimisation.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    optimisation.add_argument("--discriminator_learning_rate", type=float, default=None, help="Learning rate of the discriminator (default: --learning_rate).")
    optimisation.add_argument("--max_grad_norm", type=float, default=1.0, help="Clip the gradient norm to this value.")
    optimisation.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights; evaluate and save it.")
    optimisation.add_argument("--ema_decay", type=float, default=0.999, help="Decay of the EMA.")
    optimisation.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="Autocast precision (default: accelerate config's, else no).")
    optimisation.add_argument("--torch_compile", action="store_true", help="Compile the model with torch.compile (inductor).")
    optimisation.add_argument("--max_consecutive_nonfinite_steps", type=int, default=20, help="Stop training after this many consecutive steps with a NaN or infinite loss (each is skipped).")
    optimisation.add_argument("--seed", type=int, default=0, help="Seed of the model initialisation, data order and augmentation.")

    evaluation = parser.add_argument_group("evaluation and logging")
    evaluation.add_argument("--validation_epochs", type=int, default=1, help="Evaluate every this many epochs (and at the end).")
    evaluation.add_argument("--eval_batch_size", type=int, default=64, help="Batch size of evaluation and of encoding the training set for the prior.")
    evaluation.add_argument("--num_validation_samples", type=int, default=16, help="Seeds 0..N-1 of the sample grid, and validation images reconstructed.")
    evaluation.add_argument("--prior_fit_steps", type=int, default=1000, help="Steps of fit_prior on the training latents at each best-model save and at the end.")
    evaluation.add_argument("--prior_fit_batch_size", type=int, default=256, help="Latents per fit_prior step (drawn with replacement).")
    evaluation.add_argument("--prior_fit_learning_rate", type=float, default=1e-3, help="Peak learning rate of fit_prior (cosine to 0).")
    evaluation.add_argument("--early_stopping_patience", type=int, default=None, help="Stop after this many evaluations without a better validation loss.")
    evaluation.add_argument("--logging_steps", type=int, default=50, help="Log training losses and throughput every this many steps.")
    evaluation.add_argument("--report_to", default="tensorboard", help="Tracker for accelerate: tensorboard, wandb, all or none.")
    evaluation.add_argument("--samples_path", default=None, help="Also copy the final captioned sample grid here (e.g. outputs/demo/samples.png).")

    checkpointing = parser.add_argument_group("checkpointing")
    checkpointing.add_argument("--output_dir", required=True, help="Where checkpoints, logs, samples and the models go.")
    checkpointing.add_argument("--checkpointing_epochs", type=int, default=5, help="Save a resumable checkpoint every this many epochs.")
    checkpointing.add_argument("--checkpointing_steps", type=int, default=None, help="Save a checkpoint every this many steps instead of every --checkpointing_epochs.")
    checkpointing.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints, deleting the oldest.")
    checkpointing.add_argument("--resume_from_checkpoint", default=None, help='"latest" (the newest complete checkpoint in --output_dir, if any) or a checkpoint folder.')

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Push best_model/ to the Hub at the end.")
    hub.add_argument("--hub_model_id", default=None, help="Repository id on the Hub (default: the output folder's name).")
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository private.")

    args = parser.parse_args(argv)
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        parser.error("--train_batch_size and --gradient_accumulation_steps must be at least 1.")
    if not 0 < args.random_crop_scale <= 1:
        parser.error("--random_crop_scale must be in (0, 1].")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data: a decoded uint8 cache, batched by seeded permutation and augmented on the device.


class ImageFolderSplit:
    """
    One split of prepare_dataset.py's ImageFolder output (`metadata.jsonl` with `file_name` and `caption`, beside the
    image files), read without the `datasets` library: the GPU images this trains on may not have it. It offers the
    few `datasets.Dataset` members this script and evaluate_model.py use.
    """

    column_names = ["image", "caption"]

    def __init__(self, folder):
        self.folder = Path(folder)
        metadata = (self.folder / "metadata.jsonl").read_bytes()
        rows = [json.loads(line) for line in metadata.decode("utf-8").splitlines() if line.strip()]
        self.file_names = [row["file_name"] for row in rows]
        self.captions = [row["caption"] for row in rows]
        # The pixel cache is keyed by this, as by a Dataset's own fingerprint.
        self._fingerprint = hashlib.sha256(metadata).hexdigest()[:16]

    def __len__(self):
        return len(self.file_names)

    def __getitem__(self, column):
        if column == "caption":
            return list(self.captions)
        if column == "image":
            return [self.image(index) for index in range(len(self))]
        raise KeyError(f"{self.folder} has the columns {self.column_names}, not {column!r}.")

    def image(self, index):
        with Image.open(self.folder / self.file_names[index]) as image:
            image.load()
            return image

    def select(self, indices):
        """The rows at `indices`, in that order."""
        subset = copy.copy(self)
        subset.file_names = [self.file_names[index] for index in indices]
        subset.captions = [self.captions[index] for index in indices]
        subset._fingerprint = hashlib.sha256(f"{self._fingerprint}{list(indices)}".encode()).hexdigest()[:16]
        return subset


def saved_dataset_dict_folder(path, splits):
    """
    `path` or `path/dataset` if a DatasetDict was saved there with `save_to_disk`, else None. Also None where the
    `datasets` library is missing and `path` holds the ImageFolder `splits` that prepare_dataset.py writes beside it.
    """
    path = Path(path)
    saved = next((folder for folder in (path, path / "dataset") if (folder / "dataset_dict.json").is_file()), None)
    if saved is not None and has_image_folder_splits(path, splits):
        try:
            import datasets  # noqa: F401
        except ImportError:
            return None
    return saved


def has_image_folder_splits(path, splits):
    return all((Path(path) / split / "metadata.jsonl").is_file() for split in splits)


def load_dataset_dict(path):
    """
    The `train` and `validation` splits at `path`: its `dataset/` DatasetDict (or `path` itself) saved with
    `save_to_disk`, else its ImageFolder folders `train/` and `validation/` with their `metadata.jsonl`.
    """
    path, splits = Path(path), ("train", "validation")
    saved = saved_dataset_dict_folder(path, splits)
    if saved is None and has_image_folder_splits(path, splits):
        return {split: ImageFolderSplit(path / split) for split in splits}
    if saved is None:
        sys.exit(
            f"No dataset at {path}: pass --dataset_path a folder written by prepare_dataset.py (a `dataset/` saved "
            "with save_to_disk, or `train/` and `validation/` ImageFolder splits with metadata.jsonl)."
        )
    from datasets import load_from_disk

    dataset = load_from_disk(str(saved))
    for split in ("train", "validation"):
        if split not in dataset or not {"image", "caption"} <= set(dataset[split].column_names):
            sys.exit(f"The dataset at {saved} needs a `{split}` split with `image` and `caption` columns.")
    return dataset


def split_images(split, chunk_size=256):
    """The split's PIL images in order, decoded `chunk_size` at a time."""
    if isinstance(split, ImageFolderSplit):
        yield from (split.image(index) for index in range(len(split)))
        return
    images = split.select_columns(["image"])
    for start in range(0, len(split), chunk_size):
        yield from images[start : start + chunk_size]["image"]


def decode_to_cache(split, image_size, cache_dir):
    """
    Decodes a split's images once, fitted to `image_size` squares, into a uint8 `(N, 3, S, S)` .npy file keyed by the
    split's fingerprint, and returns it memory-mapped. The file is written under a temporary name, then renamed.
    """
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / f"{split._fingerprint}-{len(split)}-{image_size}px.npy"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
        pixels = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(split), 3, image_size, image_size))
        images = tqdm(split_images(split), total=len(split), desc=f"Decoding {len(split)} images", unit="image")
        for index, image in enumerate(images):
            pixels[index] = np.asarray(resize_and_pad(image, image_size)[0]).transpose(2, 0, 1)
        pixels.flush()
        del pixels
        os.replace(partial, path)
    return np.load(path, mmap_mode="r")


class PixelCache:
    """uint8 images `(N, 3, S, S)`: on the GPU when they fit in a third of its free memory, else memory-mapped on disk."""

    def __init__(self, pixels, device):
        self.device = device
        self.pixels = pixels
        if device.type == "cuda" and pixels.nbytes < torch.cuda.mem_get_info(device)[0] / 3:
            self.pixels = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)

    def __len__(self):
        return len(self.pixels)

    def batch(self, indices):
        """Float pixel values in [-1, 1] on the device for a 1-d tensor of indices."""
        if isinstance(self.pixels, torch.Tensor):
            pixels = self.pixels[indices.to(self.device)]
        else:
            pixels = torch.from_numpy(self.pixels[indices.numpy()]).to(self.device, non_blocking=True)
        return pixels.float() / 127.5 - 1.0


def parse_config_overrides(items):
    """
    `--config_overrides` `KEY=VALUE` items -> a dict of EngravingConfig fields. Values are JSON where they parse
    (numbers, lists, booleans), else the string itself; a key that is not a field exits with a message.
    """
    fields = inspect.signature(EngravingConfig.__init__).parameters
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            sys.exit(f"--config_overrides: {key!r} is not an EngravingConfig field; see configuration_engraving.py.")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def tokenize_captions(tokenizer, captions, max_length):
    """All captions padded to `max_length`: `(N, max_length)` input ids and attention mask."""
    batch = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def epoch_batches(num_images, epoch, seed, batches_per_epoch, batch_size, num_processes, process_index):
    """
    This process's `(batches_per_epoch, batch_size)` image indices for `epoch`: a permutation seeded by
    `(seed, epoch)`, cut into global batches whose consecutive slices go to each process.
    """
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(num_images, generator=generator)[: batches_per_epoch * batch_size * num_processes]
    return order.view(batches_per_epoch, num_processes, batch_size)[:, process_index]


def augment(pixel_values, crop_scale, random_flip):
    """
    Random resized crop (side between `crop_scale` and 1 of the image, anywhere inside it) and an optional horizontal
    flip, batched on the device with the global RNG, so a resume that restores the RNG replays them exactly.
    """
    if crop_scale >= 1 and not random_flip:
        return pixel_values
    batch, device = pixel_values.shape[0], pixel_values.device
    scale = torch.empty(batch, device=device).uniform_(crop_scale, 1.0)
    shift_x, shift_y = ((torch.rand(2, batch, device=device) * 2 - 1) * (1 - scale)).unbind(0)
    flip = torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0) if random_flip else torch.ones_like(scale)
    zeros = torch.zeros_like(scale)
    theta = torch.stack([torch.stack([scale * flip, zeros, shift_x], 1), torch.stack([zeros, scale, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)
    return F.grid_sample(pixel_values, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------
# Model, tokenizer and optimisation.


def load_or_train_tokenizer(args, captions):
    """--tokenizer_path, else the tokenizer this run saved before (on resume), else a BPE trained on the captions."""
    saved = Path(args.output_dir) / "tokenizer"
    path = args.tokenizer_path or (saved if saved.is_dir() else None)
    if path is not None:
        return AutoTokenizer.from_pretrained(path)
    tokenizer = train_tokenizer(captions, vocab_size=args.vocab_size)
    tokenizer.save_pretrained(saved)
    logger.info(f"Trained a {len(tokenizer)}-token BPE on {len(captions)} training captions; saved to {saved}.")
    return tokenizer


def build_config(args, tokenizer, captions):
    """The preset's EngravingConfig with the image size, vocabulary, caption words and flag overrides of this run."""
    overrides = parse_config_overrides(args.config_overrides)
    flags = {
        "image_size": args.image_size,
        "adversarial_start_step": args.adversarial_start_step,
        "adversarial_loss_weight": args.adversarial_loss_weight,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    overrides["vocab_size"] = len(tokenizer)
    overrides["caption_words"] = None if args.unconstrained_captions else caption_words(captions)
    try:
        return EngravingConfig.from_preset(args.preset, **overrides)
    except (TypeError, ValueError) as error:
        sys.exit(f"Invalid model configuration: {error}")


def build_model_and_optimizers(args, config, tokenizer, device):
    """
    A freshly initialised model (channels_last on CUDA) with its tokenizer, the discriminator on `device`, and their
    AdamW optimizers (fused on CUDA).
    """
    model = EngravingModel(config).to(device)
    model.tokenizer = tokenizer
    discriminator = EngravingDiscriminator(config).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        discriminator.to(memory_format=torch.channels_last)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        fused=fused,
    )
    discriminator_optimizer = torch.optim.AdamW(
        discriminator.parameters(), lr=args.discriminator_learning_rate or args.learning_rate, betas=(0.5, 0.9), fused=fused
    )
    return model, discriminator, optimizer, discriminator_optimizer


def all_processes_finite(accelerator, loss):
    """True when the loss is finite on every process, so all of them skip a bad step together."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.gather(finite).min() > 0)


def average_gradients(accelerator, module):
    """All-reduces the gradients of a module that is not wrapped for data parallelism (mean over processes)."""
    if accelerator.num_processes == 1:
        return
    gradients = [parameter.grad for parameter in module.parameters() if parameter.grad is not None]
    for gradient, averaged in zip(gradients, accelerator.reduce(gradients, reduction="mean")):
        gradient.copy_(averaged)


def balanced_adversarial_gradient(loss_reconstruction, loss_adversarial, generated, output_layer, loss_scale=1.0):
    """
    The adversarial loss's gradient at the `generated` images, scaled so that at the decoder's output layer it has the
    norm of the reconstruction loss's gradient (as in VQGAN): `adversarial_loss_weight` is then a share of the
    reconstruction signal. A fixed weight let the discriminator's unbounded hinge term take over: samples collapsed to
    one checkerboard artefact.

    The discriminator runs backward once, to the images: the balance reads that gradient at the output layer, and the
    decoder's update backpropagates it from the images on (`surrogate_adversarial_loss`), with no second pass through
    the discriminator and no gradients for its weights, which its own step would discard. `loss_scale` is fp16's
    gradient scale: the discriminator's fp16 backward runs on the scaled loss, as the step's own backward does, so
    small gradients do not underflow. The discriminator's part of the graph is freed here, before the step's backward
    needs the memory; the decoder's is kept for it.
    """
    scaled_gradient = torch.autograd.grad(loss_adversarial * loss_scale, generated)[0]
    image_gradient = scaled_gradient.float() / loss_scale
    gradient_adversarial = torch.autograd.grad(generated, output_layer, grad_outputs=image_gradient, retain_graph=True)[0]
    gradient_reconstruction = torch.autograd.grad(loss_reconstruction, output_layer, retain_graph=True)[0]
    balance = (gradient_reconstruction.norm() / (gradient_adversarial.norm() + 1e-4)).clamp(max=1e4)
    return (balance * image_gradient).detach()


def surrogate_adversarial_loss(generated, image_gradient):
    """A term whose gradient with respect to `generated` is `image_gradient`: the adversarial loss's, once computed."""
    return (generated.float() * image_gradient.float()).sum()


def forward_backward(
    accelerator, model, discriminator, discriminator_optimizer, pixel_values, input_ids, attention_mask,
    adversarial_weight, gradient_accumulation_steps, sync_gradients,
):
    """
    One batch of training: the model's losses (plus the weighted adversarial loss on the reconstructions and on images
    decoded from sampled latents) and their backward pass, then, when the adversarial loss is on, one discriminator
    step. Gradients are all-reduced only when `sync_gradients`.
    Returns the losses as floats, or None (nothing done) when the loss is not finite on some process.
    """
    unwrapped = accelerator.unwrap_model(model)
    num_sampled_images = round(unwrapped.config.adversarial_sample_fraction * len(pixel_values)) if adversarial_weight > 0 else 0
    with contextlib.nullcontext() if sync_gradients else accelerator.no_sync(model):
        with accelerator.autocast():
            outputs = model(pixel_values, input_ids, attention_mask, num_sampled_images=num_sampled_images)
            loss = outputs.loss
            if adversarial_weight > 0:
                generated = outputs.reconstructions
                if num_sampled_images:
                    generated = torch.cat([generated, outputs.sampled_images])
                loss_adversarial = discriminator.generator_loss(generated)
        if not all_processes_finite(accelerator, loss + loss_adversarial if adversarial_weight > 0 else loss):
            return None
        if adversarial_weight > 0:
            image_gradient = balanced_adversarial_gradient(
                unwrapped.config.reconstruction_loss_weight * outputs.loss_reconstruction,
                loss_adversarial,
                generated,
                unwrapped.image_decoder.conv_out.weight,
                loss_scale=accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0,
            )
            # Under fp16, an overflow in the discriminator's scaled backward is the GradScaler's to handle: its
            # gradients come out non-finite, so the scaler skips the step and lowers the scale. Without a scaler,
            # nothing would: skip the step here.
            if accelerator.scaler is None and not all_processes_finite(accelerator, image_gradient.sum()):
                return None
            loss = loss + adversarial_weight * surrogate_adversarial_loss(generated, image_gradient)
        accelerator.backward(loss / gradient_accumulation_steps)
    losses = {name: outputs[name].detach().float() for name in LOSS_NAMES}
    if adversarial_weight > 0:
        with accelerator.autocast():
            loss_discriminator = discriminator.discriminator_loss(pixel_values, generated.detach())
        accelerator.backward(loss_discriminator)
        average_gradients(accelerator, discriminator)
        discriminator_optimizer.step()
        discriminator_optimizer.zero_grad(set_to_none=True)
        losses["loss_adversarial"] = loss_adversarial.detach().float()
        losses["loss_discriminator"] = loss_discriminator.detach().float()
    return dict(zip(losses, torch.stack(list(losses.values())).tolist()))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written under a temporary name and renamed, so `latest` only ever sees complete ones.


def complete_checkpoints(output_dir):
    """`(step, path)` of the complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    found = []
    for path in output_dir.iterdir() if output_dir.is_dir() else []:
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / TRAINING_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(accelerator, args, training_state):
    """Saves the full training state as `checkpoint-<step>`, atomically, and prunes to --checkpoints_total_limit."""
    final = Path(args.output_dir) / f"checkpoint-{training_state['global_step']}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / TRAINING_STATE_NAME).write_text(json.dumps(training_state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        checkpoints = complete_checkpoints(args.output_dir)
        if args.checkpoints_total_limit is not None:
            for _, old in checkpoints[: max(0, len(checkpoints) - args.checkpoints_total_limit)]:
                shutil.rmtree(old)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()


def resolve_resume_path(args):
    """The checkpoint folder --resume_from_checkpoint names, or None to start fresh."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(args.output_dir)
        if not checkpoints:
            logger.info(f"No complete checkpoint in {args.output_dir}: starting a new run.")
            return None
        return checkpoints[-1][1]
    path = Path(args.resume_from_checkpoint)
    if not (path / TRAINING_STATE_NAME).is_file():
        sys.exit(f"{path} is not a complete checkpoint folder: pass one written by train.py, or `latest`.")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: losses, a captioned sample grid, reconstructions, the fitted prior and the best model.


@torch.no_grad()
def validation_losses(model, cache, input_ids, attention_mask, batch_size):
    """Each loss component averaged over the validation split, in eval mode."""
    totals = dict.fromkeys(LOSS_NAMES, 0.0)
    for indices in torch.arange(len(cache)).split(batch_size):
        outputs = model(
            cache.batch(indices).to(model.dtype),
            input_ids[indices].to(model.device),
            attention_mask[indices].to(model.device),
        )
        for name in LOSS_NAMES:
            totals[name] += outputs[name].item() * len(indices)
    return {f"val_{name}": total / len(cache) for name, total in totals.items()}


@torch.no_grad()
def fit_latent_prior(model, cache, input_ids, attention_mask, args):
    """Encodes the training images (posterior means) and captions in eval mode, then fits a fresh prior to them."""
    latents, text_latents = [], []
    for indices in torch.arange(len(cache)).split(args.eval_batch_size):
        latents.append(model.encode_images(cache.batch(indices).to(model.dtype)).float())
        text_latents.append(
            model.encode_text(input_ids[indices].to(model.device), attention_mask[indices].to(model.device)).float()
        )
    with torch.enable_grad():
        return model.fit_prior(
            torch.cat(latents),
            torch.cat(text_latents),
            num_steps=args.prior_fit_steps,
            batch_size=args.prior_fit_batch_size,
            learning_rate=args.prior_fit_learning_rate,
            seed=args.seed,
        )


def fit_detail_bank(model, cache, batch_size, seed):
    """Fills the model's detail bank with patches of the training images as cached (not augmented)."""
    batches = (cache.batch(indices) for indices in torch.arange(len(cache)).split(batch_size))
    return model.fit_detail_bank(batches, seed=seed)


def write_model_card(directory, args, config, record, num_train_images):
    """README.md with YAML metadata, the sample grid and the validation metrics of a saved model."""
    metrics = "\n".join(f"| {name} | {value:.4f} |" for name, value in record.items() if name.startswith("val_"))
    detail_bank_line = (
        f"Its detail bank holds {config.detail_bank_size} patches of {config.detail_patch_size} px drawn from the "
        f"{record['detail_bank_patches_seen']} patches of the training images; decoded images get their line work from it."
        if "detail_bank_patches_seen" in record
        else "It has no detail bank: images are the decoder's own."
    )
    card = f"""---
library_name: transformers
pipeline_tag: unconditional-image-generation
tags:
- engraving
- image-captioning
- text-to-image
- generated-by-train.py
---

# Engraving model ({args.preset} preset, {config.image_size} px)

A generative model of 19th-century engravings and their captions: from a seed it draws an engraving and writes its
caption; it also captions images and draws images for captions.

```python
from transformers import AutoModel

model = AutoModel.from_pretrained("{args.hub_model_id or 'PATH_TO_THIS_FOLDER'}", trust_remote_code=True)
output = model.generate(seeds=[0, 1, 2, 3])
output.images[0].save("engraving.png"); print(output.captions)
```

![Samples from seeds 0-{args.num_validation_samples - 1}](samples.png)

## Training

Trained with `train.py` on {num_train_images} images for {record['step']} steps ({record['epoch']} epochs), batch
{args.train_batch_size} per process, learning rate {args.learning_rate}, seed {args.seed}, EMA: {args.use_ema}.
A freshly initialised latent prior was fitted to the training latents for {args.prior_fit_steps} steps of {args.prior_fit_batch_size} at learning rate {args.prior_fit_learning_rate}.
{detail_bank_line}

## Validation metrics (step {record['step']})

| metric | value |
|---|---|
{metrics}
"""
    (Path(directory) / "README.md").write_text(card)


def save_model_atomically(model, directory, samples, args, record, num_train_images):
    """`save_pretrained` (with the tokenizer), the sample grid and the model card into `directory`, via a rename."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    samples.save(partial / "samples.png")
    (partial / "metrics.json").write_text(json.dumps(record, indent=2))
    write_model_card(partial, args, model.config, record, num_train_images)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)


def log_images(accelerator, images, step):
    """Logs PIL images to TensorBoard, when it is a tracker of this run."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for name, image in images.items():
                tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")


def mean_or_nan(values):
    return float(np.mean(values)) if values else math.nan


def write_json_atomically(path, data):
    partial = Path(f"{path}.tmp")
    partial.write_text(json.dumps(data, indent=2))
    os.replace(partial, path)


def configure_log_file(accelerator, output_dir):
    """Copies the main process's log records into `output_dir/training.log`."""
    if accelerator.is_main_process:
        handler = logging.FileHandler(Path(output_dir) / "training.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.logger.addHandler(handler)


def push_best_model_to_hub(args, output_dir):
    """Uploads best_model/ (weights, code, tokenizer and card) to a Hub model repo, after everything local is written."""
    from huggingface_hub import create_repo, upload_folder

    repo_name = args.hub_model_id or output_dir.name
    try:
        repo_id = create_repo(repo_name, exist_ok=True, private=args.hub_private_repo).repo_id
        upload_folder(repo_id=repo_id, folder_path=output_dir / "best_model", commit_message="Best model of train.py")
    except Exception as error:
        sys.exit(
            f"Could not push to the Hub model repo {repo_name} ({error.__class__.__name__}); the trained model in "
            f"{output_dir / 'best_model'} is complete, so log in (`hf auth login`) and upload it with "
            f"`hf upload {repo_name} {output_dir / 'best_model'}`."
        )
    logger.info(f"Pushed best_model/ to https://huggingface.co/{repo_id}")


def main(args):
    # Accelerator, seed and logs.
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dynamo_backend="inductor" if args.torch_compile else None,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    configure_log_file(accelerator, output_dir)
    set_seed(args.seed)

    # Data: decoded once into a uint8 cache (the main process writes it), captions tokenized once.
    dataset = load_dataset_dict(args.dataset_path)
    train_captions = list(dataset["train"]["caption"])
    with accelerator.main_process_first():
        tokenizer = load_or_train_tokenizer(args, train_captions)
    config = build_config(args, tokenizer, train_captions)
    with accelerator.main_process_first():
        train_pixels = decode_to_cache(dataset["train"], config.image_size, args.cache_dir)
        validation_pixels = decode_to_cache(dataset["validation"], config.image_size, args.cache_dir)
    train_cache = PixelCache(train_pixels, accelerator.device)
    validation_cache = PixelCache(validation_pixels, accelerator.device)
    train_ids, train_mask = tokenize_captions(tokenizer, train_captions, config.max_caption_length)
    validation_ids, validation_mask = tokenize_captions(
        tokenizer, dataset["validation"]["caption"], config.max_caption_length
    )
    train_ids, train_mask = train_ids.to(accelerator.device), train_mask.to(accelerator.device)

    global_batch_size = args.train_batch_size * accelerator.num_processes
    batches_per_epoch = len(train_cache) // global_batch_size // args.gradient_accumulation_steps
    batches_per_epoch *= args.gradient_accumulation_steps
    if batches_per_epoch == 0:
        sys.exit(
            f"The training split has {len(train_cache)} images, fewer than one step of {global_batch_size} x "
            f"{args.gradient_accumulation_steps}: lower --train_batch_size or --gradient_accumulation_steps."
        )
    steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    # Model, discriminator, EMA, optimizers and schedule.
    model, discriminator, optimizer, discriminator_optimizer = build_model_and_optimizers(
        args, config, tokenizer, accelerator.device
    )
    use_adversarial = config.adversarial_loss_weight > 0
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, discriminator_optimizer, lr_scheduler = accelerator.prepare(
        model, optimizer, discriminator_optimizer, lr_scheduler
    )
    unwrapped = accelerator.unwrap_model(model)
    # The discriminator is not wrapped for data parallelism (its losses are methods, not forward); its gradients
    # are averaged by hand. It and the EMA are saved in every checkpoint.
    accelerator.register_for_checkpointing(discriminator)
    ema = None
    if args.use_ema:
        ema = AveragedModel(unwrapped, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)
        accelerator.register_for_checkpointing(ema)

    # Resume: weights, optimizers, schedule, EMA, RNG states, then the step and the position in the data order.
    global_step = first_epoch = batches_done = 0
    best_val_loss, evaluations_without_improvement, nonfinite_steps = math.inf, 0, 0
    metrics = []
    resume_path = resolve_resume_path(args)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        state = json.loads((resume_path / TRAINING_STATE_NAME).read_text())
        global_step, first_epoch, batches_done = state["global_step"], state["epoch"], state["batches_done_in_epoch"]
        best_val_loss = state["best_val_loss"]
        evaluations_without_improvement = state["evaluations_without_improvement"]
        nonfinite_steps = state["nonfinite_steps"]
        metrics = state["metrics"]
        logger.info(f"Resumed from {resume_path} at step {global_step} (epoch {first_epoch}, batch {batches_done}).")

    if accelerator.is_main_process:
        hyperparameters = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("engraving", config=hyperparameters)
    logger.info(
        f"Training {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.1f}M parameters ({args.preset} preset, "
        f"{config.image_size} px) on {len(train_cache)} images, {accelerator.num_processes} process(es) x batch "
        f"{args.train_batch_size} x {args.gradient_accumulation_steps} accumulation, {max_train_steps} steps "
        f"({steps_per_epoch} per epoch), images {'on the device' if isinstance(train_cache.pixels, torch.Tensor) else 'memory-mapped'}."
    )

    def evaluate(train_loss, final):
        """One evaluation on the main process, on a copy of the (EMA) weights, without touching the training RNG."""
        nonlocal best_val_loss, evaluations_without_improvement
        eval_model = copy.deepcopy(ema.module if ema is not None else unwrapped).eval()
        eval_model.tokenizer = tokenizer
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            torch.manual_seed(args.seed)
            with accelerator.autocast():
                record = {"step": global_step, "epoch": round(global_step / steps_per_epoch, 3), "train_loss": train_loss}
                record.update(validation_losses(eval_model, validation_cache, validation_ids, validation_mask, args.eval_batch_size))
            improved = record["val_loss"] < best_val_loss
            if improved or final:
                record["prior_fit_loss"] = fit_latent_prior(eval_model, train_cache, train_ids, train_mask, args)
                if eval_model.detail_bank is not None:
                    record["detail_bank_patches_seen"] = fit_detail_bank(
                        eval_model, train_cache, args.eval_batch_size, args.seed
                    )
            seeds = list(range(args.num_validation_samples))
            generated = eval_model.generate(seeds=seeds, batch_size=args.eval_batch_size)
            samples = captioned_grid(generated.images, generated.captions, columns=min(8, len(seeds)))
            originals = validation_cache.batch(torch.arange(min(args.num_validation_samples, len(validation_cache))))
            with accelerator.autocast():
                reconstructed = eval_model(originals.to(eval_model.dtype)).reconstructions
            pictures = pixel_values_to_images(originals) + pixel_values_to_images(reconstructed)
            reconstructions = captioned_grid(pictures, [""] * len(pictures), columns=len(originals))
        record["nonfinite_steps"] = nonfinite_steps
        record["best"] = improved
        samples.save(output_dir / f"samples-{global_step:07d}.png")
        reconstructions.save(output_dir / f"reconstructions-{global_step:07d}.png")
        samples.save(output_dir / "samples.png")
        metrics.append(record)
        write_json_atomically(output_dir / "metrics.json", metrics)
        accelerator.log({name: value for name, value in record.items() if isinstance(value, float)}, step=global_step)
        log_images(accelerator, {"samples": samples, "reconstructions": reconstructions}, global_step)
        logger.info(
            "Evaluation at step %d: %s. Samples: %s",
            global_step,
            ", ".join(f"{name} {record[name]:.4f}" for name in record if name.startswith("val_")),
            " | ".join(generated.captions[:3]),
        )
        if improved:
            best_val_loss = record["val_loss"]
            evaluations_without_improvement = 0
            save_model_atomically(eval_model, output_dir / "best_model", samples, args, record, len(train_cache))
            logger.info(f"Validation loss improved to {best_val_loss:.4f}: saved {output_dir / 'best_model'}")
        else:
            evaluations_without_improvement += 1
        if final:
            save_model_atomically(eval_model, output_dir / "model", samples, args, record, len(train_cache))
            if args.samples_path:
                Path(args.samples_path).parent.mkdir(parents=True, exist_ok=True)
                samples.save(args.samples_path)

    def training_state(epoch, batches_done_in_epoch):
        return {
            "global_step": global_step,
            "epoch": epoch,
            "batches_done_in_epoch": batches_done_in_epoch,
            "best_val_loss": best_val_loss,
            "evaluations_without_improvement": evaluations_without_improvement,
            "nonfinite_steps": nonfinite_steps,
            "metrics": metrics,
        }

    def synchronised_flag(value):
        """The main process's decision, shared with every process."""
        flag = torch.tensor([float(value)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    # Training loop.
    progress = tqdm(
        total=max_train_steps, initial=global_step, desc="Training", disable=not accelerator.is_local_main_process
    )
    consecutive_nonfinite = 0
    window = {name: 0.0 for name in LOSS_NAMES + ["loss_adversarial", "loss_discriminator"]}
    window_steps, window_start, epoch_losses = 0, time.perf_counter(), []
    training_start = time.perf_counter()
    diverged = early_stopped = finished = False
    model.train()
    for epoch in range(first_epoch, num_epochs):
        batches = epoch_batches(
            len(train_cache), epoch, args.seed, batches_per_epoch, args.train_batch_size,
            accelerator.num_processes, accelerator.process_index,
        )
        for batch_index in range(batches_done if epoch == first_epoch else 0, batches_per_epoch):
            indices = batches[batch_index]
            pixel_values = augment(train_cache.batch(indices), args.random_crop_scale, args.random_flip)
            if accelerator.device.type == "cuda":
                pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            device_indices = indices.to(accelerator.device)
            sync_step = (batch_index + 1) % args.gradient_accumulation_steps == 0
            adversarial = use_adversarial and global_step >= config.adversarial_start_step

            values = forward_backward(
                accelerator, model, discriminator, discriminator_optimizer, pixel_values,
                train_ids[device_indices], train_mask[device_indices],
                config.adversarial_loss_weight if adversarial else 0.0, args.gradient_accumulation_steps, sync_step,
            )
            finite = values is not None
            if finite:
                consecutive_nonfinite = 0
                for name, value in values.items():
                    window[name] += value
                epoch_losses.append(values["loss"])
                window_steps += 1
            else:
                nonfinite_steps += 1
                consecutive_nonfinite += 1
                logger.warning(f"Skipped a batch with a non-finite loss at step {global_step} ({consecutive_nonfinite} in a row).")
            if not sync_step:
                continue

            if finite:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(unwrapped)
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            global_step += 1
            progress.update(1)

            if consecutive_nonfinite >= args.max_consecutive_nonfinite_steps:
                diverged = True
                break
            if global_step % args.logging_steps == 0 and window_steps:
                elapsed = time.perf_counter() - window_start
                logs = {f"train_{name}": value / window_steps for name, value in window.items()}
                logs["lr"] = lr_scheduler.get_last_lr()[0]
                logs["images_per_second"] = window_steps * global_batch_size / elapsed
                accelerator.log(logs, step=global_step)
                logger.info(
                    f"step {global_step}/{max_train_steps} epoch {epoch} "
                    + " ".join(f"{name} {value:.6f}" for name, value in logs.items())
                    + f" nonfinite_steps {nonfinite_steps}"
                )
                progress.set_postfix(loss=f"{logs['train_loss']:.4f}", img_s=f"{logs['images_per_second']:.0f}")
                window = dict.fromkeys(window, 0.0)
                window_steps, window_start = 0, time.perf_counter()

            end_of_epoch = batch_index + 1 == batches_per_epoch
            finished = global_step >= max_train_steps
            if args.max_train_minutes is not None and global_step % args.logging_steps == 0:
                out_of_time = time.perf_counter() - training_start > 60 * args.max_train_minutes
                finished = finished or synchronised_flag(out_of_time)
            if end_of_epoch and (epoch + 1) % args.validation_epochs == 0 and not finished:
                if accelerator.is_main_process:
                    evaluate(mean_or_nan(epoch_losses), final=False)
                epoch_losses = []
                patience_spent = (
                    args.early_stopping_patience is not None
                    and evaluations_without_improvement >= args.early_stopping_patience
                )
                early_stopped = synchronised_flag(patience_spent)
            checkpoint_due = (
                global_step % args.checkpointing_steps == 0
                if args.checkpointing_steps
                else end_of_epoch and (epoch + 1) % args.checkpointing_epochs == 0
            )
            if checkpoint_due or finished or early_stopped:
                position = (epoch + 1, 0) if end_of_epoch else (epoch, batch_index + 1)
                save_checkpoint(accelerator, args, training_state(*position))
            if finished or early_stopped:
                break
        if finished or diverged or early_stopped:
            break
    progress.close()

    if diverged:
        message = (
            f"Stopped at step {global_step}: the loss was NaN or infinite for {consecutive_nonfinite} consecutive "
            f"steps ({nonfinite_steps} skipped in all). Lower --learning_rate, keep --max_grad_norm on, or use "
            "--mixed_precision bf16 rather than fp16."
        )
        logger.error(message)
        accelerator.end_training()
        sys.exit(message)
    if early_stopped:
        logger.info(f"Early stopping at step {global_step}: no better validation loss in {args.early_stopping_patience} evaluations.")

    # Final evaluation, with the prior fitted: writes model/, best_model/ (if improved) and the sample grid.
    if accelerator.is_main_process:
        evaluate(mean_or_nan(epoch_losses), final=True)
        logger.info(
            f"Saved the final model to {output_dir / 'model'} and the best one to {output_dir / 'best_model'}; "
            f"samples in {output_dir / 'samples.png'}. Try it: `MODEL_ID={output_dir / 'model'} python app.py`, "
            f"or `python generate.py --model {output_dir / 'model'} --seeds 0-15 --grid --output_dir samples`."
        )
        if args.push_to_hub:
            push_best_model_to_hub(args, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
