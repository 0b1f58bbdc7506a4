"""
Evaluates a trained Engraving model on a held-out split and writes `report.json` and `report.md`:

- sample quality: FID and KID of seed samples against the real split's images in frozen ImageNet features, and the
  high-frequency energy of the samples relative to the real images (1 = as much fine line work);
- reconstruction: PSNR and SSIM of the generator's drawing of each real image's encoded latent, and the FID, KID and
  high-frequency energy of those drawings;
- captions: well-formed share, distinct-1/2 and verbatim copies of the training captions, BLEU-4 of `caption(image)`;
- image-caption correspondence: retrieval R@1/R@5 with the model's own alignment embeddings, and, for generated pairs,
  a model-free agreement: MiniLM similarity of each caption to the captions of its image's nearest training images;
- memorisation: each sample's distance to its nearest training image, and the share of near-copies;

each for the seed samples (seeds `--seed` onwards: the generator's images and the captions written for them).

    python evaluate_model.py --model ./engraving-small --dataset_path ./prepared/dataset --num_samples 200 \
        --output_dir ./eval

The model's part and the scoring can run on different machines: `--save_model_outputs FILE --no_scoring` needs only
torch and the model (e.g. on a bare GPU image), and `--model_outputs FILE` later scores that file where the metric
libraries and feature weights are installed.
"""

import argparse
import io
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from engraving_data import DatasetNotFoundError, load_splits
from engraving_features import ImageFeatureExtractor, SentenceEmbedder, cosine_nearest_neighbours
from pipeline_engraving import (
    CAPTION_TEMPERATURE,
    CAPTION_TOP_P,
    EngravingPipeline,
    caption_words,
    images_to_pixel_values,
    pixel_values_to_images,
    resize_and_pad,
)


logger = logging.getLogger(__name__)
METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate an Engraving model: sample quality, captions, alignment, memorisation."
    )

    group = parser.add_argument_group("model and data")
    group.add_argument(
        "--model", default=None, help="Folder of a model saved with `save_pretrained` (with its tokenizer)."
    )
    group.add_argument(
        "--model_outputs", default=None, help="Score this file of --save_model_outputs instead of running a model."
    )
    group.add_argument(
        "--dataset_path",
        required=True,
        help="A DatasetDict saved with `save_to_disk` (columns `image`, `caption`), or the folder holding it as "
        "`dataset/`, or prepare_dataset.py's ImageFolder splits.",
    )
    group.add_argument("--split", default="validation", help="Held-out split of real engravings to compare against.")
    group.add_argument("--train_split", default="train", help="Training split, for memorisation and copied captions.")
    group.add_argument(
        "--max_eval_images", type=int, default=None, help="Use at most this many images of `--split` (default: all)."
    )
    group.add_argument(
        "--max_train_images",
        type=int,
        default=500,
        help="Training images featurised for nearest neighbours and memorisation (0: all; all captions are used).",
    )

    group = parser.add_argument_group("sampling")
    group.add_argument("--num_samples", type=int, default=200, help="Engravings drawn from seeds.")
    group.add_argument(
        "--seed", type=int, default=0, help="Samples use seeds seed, seed + 1, ...; also seeds subsets."
    )
    group.add_argument(
        "--temperature", type=float, default=CAPTION_TEMPERATURE, help="Caption sampling temperature of `generate`."
    )
    group.add_argument("--top_p", type=float, default=CAPTION_TOP_P, help="Caption nucleus of `generate`.")
    group.add_argument(
        "--caption_words",
        choices=["model", "train", "none"],
        default="model",
        help="Words decoded captions keep to: the model's `config.caption_words` as saved; the training split's words "
        "(for a model saved without them); or `none`, decoding free over the BPE vocabulary, to compare.",
    )
    group.add_argument(
        "--batch_size", type=int, default=32, help="Batch size of the model and of the feature extractor."
    )

    group = parser.add_argument_group("metrics")
    group.add_argument(
        "--kid_subset_size", type=int, default=100, help="Rows per KID subset (fewer if fewer samples)."
    )
    group.add_argument("--kid_num_subsets", type=int, default=100, help="KID subsets averaged.")
    group.add_argument(
        "--num_neighbours",
        type=int,
        default=5,
        help="Nearest training images whose captions judge a sample's caption.",
    )
    group.add_argument(
        "--near_copy_quantile",
        type=float,
        default=0.01,
        help="A sample is a near-copy if its distance to the nearest training image is at most this quantile of the "
        "training images' distances to their nearest other training image.",
    )
    group.add_argument(
        "--feature_extractor",
        choices=["auto", "efficientnet-lite0"],
        default="auto",
        help="`auto`: torchmetrics' Inception if it and its weights are installed, else EfficientNet-Lite0.",
    )

    group.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="Compare at this size: real images are fitted to it and the model's images resized to it (default: the "
        "model's).",
    )

    group = parser.add_argument_group("output")
    group.add_argument(
        "--save_model_outputs", default=None, help="Also write the model's images, captions and latents to this .npz."
    )
    group.add_argument(
        "--no_scoring", action="store_true", help="Stop after --save_model_outputs: no metric libraries are needed."
    )
    group.add_argument(
        "--jpeg_quality", type=int, default=95, help="JPEG quality of the images in --save_model_outputs."
    )
    group.add_argument("--output_dir", default="evaluation", help="Where report.json and report.md are written.")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")

    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num_samples must be at least 2: FID and KID compare sets.")
    if (args.model is None) == (args.model_outputs is None):
        parser.error("Pass exactly one of --model and --model_outputs.")
    if args.no_scoring and not args.save_model_outputs:
        parser.error("--no_scoring needs --save_model_outputs: otherwise nothing would be written.")
    return args


def load_pipeline(path, device):
    """The model and its tokenizer from a `save_pretrained` folder, in eval mode, as an [`EngravingPipeline`]."""
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"--model {path} is not a folder saved with `save_pretrained` (no config.json there).")
    try:
        return EngravingPipeline.from_pretrained(path, device=device)
    except ValueError as error:
        raise SystemExit(f"--model {path}: {error}") from None


def load_eval_splits(path, split, train_split):
    """The held-out and training splits at `path` (`engraving_data.load_splits`), or one sentence on what is amiss."""
    try:
        return load_splits(path, (split, train_split))
    except DatasetNotFoundError as error:
        raise SystemExit(f"--dataset_path: {error}") from None


def take(dataset, limit, seed):
    """A seeded random subset of at most `limit` rows (all rows for `None` or 0)."""
    if not limit or limit >= len(dataset):
        return dataset
    # The rows `Dataset.shuffle(seed=seed)` would put first: it permutes with this generator.
    return dataset.select(np.random.default_rng(seed).permutation(len(dataset))[:limit])


def model_view(dataset, image_size):
    """The split's images as the model sees them (fitted into `image_size` squares) and their captions."""
    images = [
        resize_and_pad(image, image_size)[0] for image in tqdm(dataset["image"], desc="loading images", leave=False)
    ]
    return images, list(dataset["caption"])


@torch.no_grad()
def encode_real_split(pipeline, images, captions, batch_size):
    """Reconstructions (PIL), greedy captions, image latents and text latents of real pairs."""
    model = pipeline.model
    reconstructions, predicted_captions, image_latents, text_latents = [], [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc="reconstructing and captioning", leave=False):
        chunk_images, chunk_captions = images[start : start + batch_size], captions[start : start + batch_size]
        pixel_values = images_to_pixel_values(chunk_images, model.config.image_size).to(model.device)
        latents = model.encode_images(pixel_values)
        reconstructions += pixel_values_to_images(model.decode_latents(latents))
        predicted_captions += pipeline.caption_latents(latents)
        image_latents.append(latents.float().cpu())
        text_latents.append(pipeline.embed_captions(chunk_captions).float().cpu())
    return {
        "reconstructions": reconstructions,
        "predicted_captions": predicted_captions,
        "image_latents": torch.cat(image_latents),
        "text_latents": torch.cat(text_latents),
    }


def model_outputs(pipeline, real_images, real_captions, args):
    """
    All that evaluation asks of the model: reconstructions, greedy captions and alignment latents of the real images,
    and the seed samples with their captions.
    """
    outputs = encode_real_split(pipeline, real_images, real_captions, args.batch_size)
    logger.info(f"Sampling {args.num_samples} engravings.")
    samples = pipeline(
        seeds=range(args.seed, args.seed + args.num_samples),
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
    )
    outputs["samples_images"], outputs["samples_captions"] = samples.images, samples.captions
    return outputs


IMAGE_OUTPUTS = ("reconstructions", "samples_images")


def save_model_outputs(outputs, path, image_size, jpeg_quality):
    """
    Writes `model_outputs` to one .npz without pickles: images as JPEG bytes at `image_size` (small enough to carry
    back from a GPU machine), captions as strings, latents as float32.
    """
    arrays = {"image_size": np.array(image_size)}
    for key, value in outputs.items():
        if key in IMAGE_OUTPUTS:
            encoded = []
            for image in value:
                buffer = io.BytesIO()
                resized([image], image_size)[0].save(buffer, "JPEG", quality=jpeg_quality, subsampling=0)
                encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
            arrays[f"{key}_offsets"] = np.cumsum([0] + [len(item) for item in encoded])
            arrays[key] = np.concatenate(encoded)
        elif isinstance(value, torch.Tensor):
            arrays[key] = value.float().numpy()
        else:
            arrays[key] = np.array(value, dtype=str)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def load_model_outputs(path):
    """The `model_outputs` dictionary written by `save_model_outputs`, and the size its images were saved at."""
    with np.load(path, allow_pickle=False) as arrays:
        outputs = {}
        for key in arrays.files:
            if key in IMAGE_OUTPUTS:
                data, offsets = arrays[key], arrays[f"{key}_offsets"]
                outputs[key] = [
                    Image.open(io.BytesIO(data[start:stop].tobytes())).convert("RGB")
                    for start, stop in zip(offsets[:-1], offsets[1:])
                ]
            elif arrays[key].dtype.kind == "U":
                outputs[key] = arrays[key].tolist()
            elif key.endswith("_latents"):
                outputs[key] = torch.from_numpy(arrays[key])
        return outputs, int(arrays["image_size"])


def resized(images, image_size):
    """The images as `image_size` squares (the model's are square already)."""
    size = (image_size, image_size)
    return [image if image.size == size else image.resize(size, Image.Resampling.LANCZOS) for image in images]


def nearest_distances(features, bank_features):
    """Cosine distance of each row of `features` to its nearest row of `bank_features`, `(N,)`."""
    return cosine_nearest_neighbours(features, bank_features, k=1)[0][:, 0]


def near_copy_threshold(train_features, quantile):
    """The `quantile` of training images' distances to their nearest other training image: closer than real pairs."""
    distances = cosine_nearest_neighbours(train_features, train_features, k=1, exclude_self=True)[0][:, 0]
    return torch.quantile(distances, quantile).item()


def memorisation(features, train_features, threshold):
    distances = nearest_distances(features, train_features)
    return {
        "nearest_train_distance_mean": distances.mean().item(),
        "nearest_train_distance_median": distances.median().item(),
        "near_copy_share": (distances <= threshold).float().mean().item(),
    }


def caption_neighbour_agreement(caption_embeddings, features, train_features, train_caption_embeddings, k, seed):
    """
    MiniLM cosine similarity of each caption to the captions of its image's `k` nearest training images, averaged;
    the same with each caption paired with another sample's image (a derangement); and their difference.
    """
    neighbours = cosine_nearest_neighbours(features, train_features, k=k)[1]
    neighbour_embeddings = train_caption_embeddings[neighbours]
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    partner = torch.empty_like(order)
    partner[order] = order.roll(1)
    matched = torch.einsum("nd,nkd->nk", caption_embeddings, neighbour_embeddings).mean().item()
    shuffled = torch.einsum("nd,nkd->nk", caption_embeddings[partner], neighbour_embeddings).mean().item()
    return {
        "caption_agreement": matched,
        "caption_agreement_shuffled": shuffled,
        "caption_agreement_gain": matched - shuffled,
    }


def image_distribution_scores(features, images, context, metrics, args):
    """FID, KID and the high-frequency share (also as a ratio to the real images') of a set of images."""
    kid = metrics["kid"].compute(
        predictions=features.numpy(),
        real_features=context["real_features"].numpy(),
        subset_size=args.kid_subset_size,
        num_subsets=args.kid_num_subsets,
        seed=args.seed,
    )
    high_frequency = metrics["high_frequency_energy"].compute(predictions=images)["high_frequency_share"]
    return {
        "fid": metrics["fid"].compute(predictions=features.numpy(), real_features=context["real_features"].numpy())[
            "fid"
        ],
        "kid": kid["kid"],
        "kid_std": kid["kid_std"],
        "kid_x1000": kid["kid_x1000"],
        "high_frequency_share": high_frequency,
        "high_frequency_ratio": high_frequency / max(context["real_high_frequency_share"], 1e-12),
    }


def evaluate_samples(images, captions, context, metrics, args):
    """Every sample metric of one sampling row: distribution distances, detail, captions, agreement, memorisation."""
    features = context["extractor"](images, description="sample features")
    caption_quality = metrics["caption_quality"].compute(
        predictions=captions, training_captions=context["train_captions"]
    )
    agreement = caption_neighbour_agreement(
        context["embedder"](captions),
        features,
        context["train_features"],
        context["train_caption_embeddings"],
        args.num_neighbours,
        args.seed,
    )
    return {
        **image_distribution_scores(features, images, context, metrics, args),
        **{f"caption_{key}": value for key, value in caption_quality.items()},
        **agreement,
        **memorisation(features, context["train_features"], context["near_copy_threshold"]),
        "example_captions": captions[:5],
    }


def format_value(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(report):
    """A human-readable report: setup, one table per section, and the sampling rows side by side."""
    lines = [f"# Evaluation of `{report['model']}`", ""]
    setup = ("dataset", "split", "image_size", "num_eval_images", "num_train_images_featurised", "num_samples")
    setup += ("caption_words",)
    setup += ("feature_extractor", "feature_backend", "device", "elapsed_seconds")
    lines += [f"- **{key}**: {format_value(report[key])}" for key in setup]
    sections = ("real_reference", "reconstruction", "validation_captions", "retrieval")
    for section in (name for name in sections if name in report):
        lines += ["", f"## {section.replace('_', ' ').capitalize()}", "", "| metric | value |", "| --- | --- |"]
        lines += [
            f"| {key} | {format_value(value)} |" for key, value in report[section].items() if key != "example_captions"
        ]
    rows = report["sampling"]
    names = list(rows)
    lines += ["", "## Sampling", "", "| metric | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key in rows[names[0]]:
        if key != "example_captions":
            lines.append(f"| {key} | " + " | ".join(format_value(rows[name][key]) for name in names) + " |")
    for name in names:
        lines += ["", f"Example captions ({name}):", ""] + [
            f"- {caption}" for caption in rows[name]["example_captions"]
        ]
    return "\n".join(lines) + "\n"


def assert_finite(report):
    """Fails loudly if a metric came out NaN or infinite, rather than writing a report that hides it."""

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Metric {prefix} is {value}.")

    walk("", report)


def scoring_context(args, metrics, real_images, train_split, image_size):
    """
    What every row's scores compare against: the feature extractor and sentence embedder, the real images' and a
    training subset's features, the training captions and their embeddings, the real high-frequency share and the
    near-copy threshold.
    """
    train_captions = list(train_split["caption"])
    train_bank = take(train_split, args.max_train_images, args.seed)
    train_bank_images, train_bank_captions = model_view(train_bank, image_size)
    logger.info(
        f"{len(real_images)} `{args.split}` images; {len(train_bank_images)} of {len(train_captions)} training images "
        "featurised."
    )
    extractor = ImageFeatureExtractor(args.device, args.batch_size, prefer_inception=args.feature_extractor == "auto")
    embedder = SentenceEmbedder(args.device)
    logger.info(f"Image features: {extractor.name}, run with {extractor.backend}.")
    real_high_frequency = metrics["high_frequency_energy"].compute(predictions=real_images)["high_frequency_share"]
    context = {
        "extractor": extractor,
        "embedder": embedder,
        "real_features": extractor(real_images, description="real features"),
        "train_features": extractor(train_bank_images, description="training features"),
        "train_captions": train_captions,
        "train_caption_embeddings": embedder(train_bank_captions),
        "real_high_frequency_share": real_high_frequency,
    }
    context["near_copy_threshold"] = near_copy_threshold(context["train_features"], args.near_copy_quantile)
    return context


def main(args):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)

    # The model's part: run the model, or read what an earlier run of it saved.
    if args.model_outputs:
        outputs, saved_size = load_model_outputs(args.model_outputs)
        image_size = args.image_size or saved_size
    else:
        pipeline = load_pipeline(args.model, args.device)
        image_size = args.image_size or pipeline.model.config.image_size
    eval_split, train_split = load_eval_splits(args.dataset_path, args.split, args.train_split)
    eval_split = take(eval_split, args.max_eval_images, args.seed)
    real_images, real_captions = model_view(eval_split, image_size)
    if args.model_outputs:
        if len(outputs["reconstructions"]) != len(real_images):
            raise SystemExit(
                f"{args.model_outputs} holds {len(outputs['reconstructions'])} reconstructions but the `{args.split}` "
                f"split has {len(real_images)} images: pass the dataset and --max_eval_images of the saving run."
            )
    else:
        # The model sees the split fitted to its own size: decode it again only when the comparison size differs.
        model_images = real_images
        if image_size != pipeline.model.config.image_size:
            model_images = model_view(eval_split, pipeline.model.config.image_size)[0]
        if args.caption_words != "model":
            words = caption_words(train_split["caption"]) if args.caption_words == "train" else None
            pipeline.model.config.caption_words = words
            pipeline = EngravingPipeline(pipeline.model, pipeline.tokenizer)
        outputs = model_outputs(pipeline, model_images, real_captions, args)
    if args.save_model_outputs:
        save_model_outputs(outputs, args.save_model_outputs, image_size, args.jpeg_quality)
        logger.info(f"Wrote the model's outputs to {args.save_model_outputs}.")
        if args.no_scoring:
            return None
    for key in IMAGE_OUTPUTS:
        if key in outputs:
            outputs[key] = resized(outputs[key], image_size)

    # Scoring: the metric libraries and the feature extractors are needed from here on.
    import evaluate

    output_dir.mkdir(parents=True, exist_ok=True)
    metric_names = ("kid", "fid", "bleu", "caption_quality", "retrieval", "reconstruction", "high_frequency_energy")
    metrics = {name: evaluate.load(str(METRICS_DIR / name)) for name in metric_names}
    context = scoring_context(args, metrics, real_images, train_split, image_size)
    extractor, train_captions = context["extractor"], context["train_captions"]
    real_reference = {
        "high_frequency_share": context["real_high_frequency_share"],
        "near_copy_threshold": context["near_copy_threshold"],
        **memorisation(context["real_features"], context["train_features"], context["near_copy_threshold"]),
    }

    predicted_captions = outputs["predicted_captions"]
    validation_captions = {
        "bleu": metrics["bleu"].compute(
            predictions=predicted_captions, references=[[caption] for caption in real_captions]
        )["bleu"],
        **metrics["caption_quality"].compute(predictions=predicted_captions, training_captions=train_captions),
        "example_captions": predicted_captions[:5],
    }
    sampling = {
        "samples": evaluate_samples(outputs["samples_images"], outputs["samples_captions"], context, metrics, args)
    }
    reconstruction_features = context["extractor"](outputs["reconstructions"], description="reconstruction features")
    reconstruction = {
        **metrics["reconstruction"].compute(predictions=outputs["reconstructions"], references=real_images),
        **image_distribution_scores(reconstruction_features, outputs["reconstructions"], context, metrics, args),
    }
    report = {
        "model": str(args.model or args.model_outputs),
        "dataset": str(args.dataset_path),
        "split": args.split,
        "image_size": image_size,
        "num_eval_images": len(real_images),
        "num_train_images_featurised": len(context["train_features"]),
        "num_samples": len(outputs["samples_images"]),
        "caption_words": args.caption_words,
        "feature_extractor": extractor.name,
        "feature_backend": extractor.backend,
        "device": args.device,
        "real_reference": real_reference,
        "reconstruction": reconstruction,
        "validation_captions": validation_captions,
        "retrieval": metrics["retrieval"].compute(
            predictions=outputs["image_latents"].numpy(), references=outputs["text_latents"].numpy()
        ),
        "sampling": sampling,
        "elapsed_seconds": round(time.perf_counter() - started, 1),
    }
    assert_finite(report)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "report.md").write_text(render_markdown(report))
    logger.info(
        f"Wrote {output_dir / 'report.json'} in {report['elapsed_seconds']} s: seed samples' KID x1000 "
        f"{sampling['samples']['kid_x1000']:.1f}, high-frequency ratio "
        f"{sampling['samples']['high_frequency_ratio']:.2f}."
    )
    return report


if __name__ == "__main__":
    main(parse_args())
