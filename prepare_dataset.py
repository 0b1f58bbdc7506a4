"""
Turns a folder of engravings (or the built-in procedural demo set) into a clean, captioned Hugging Face dataset.

    python prepare_dataset.py --source ../shared/data/engravings --metadata ../shared/data/engravings/metadata.csv \
        --captioner metadata --output_dir engravings_512 --image_size 512 --num_proc 2

Every candidate image file is either kept or skipped with a reason in `report.json`. The output directory holds:

    train/*.jpg|png, train/metadata.jsonl         ImageFolder layout: load_dataset("imagefolder", data_dir=output_dir)
    validation/*.jpg|png, validation/metadata.jsonl
    dataset/                                      DatasetDict.save_to_disk: load_from_disk(output_dir + "/dataset")
    captions/engraving_train.jsonl, captions/engraving_val.jsonl
    metadata/engraving_metadata.json              per image: original size, source path, sha256, padding box
    stats.json, report.json, README.md            statistics, the account of every file, the dataset card
"""

import argparse
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import socket
import sys
import tempfile
from collections import Counter
from pathlib import Path

import kagglehub
import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset
from datasets import Image as ImageFeature
from kagglehub.cache import Cache
from kagglehub.handle import parse_dataset_handle
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from demo_scenes import SUBJECTS, render_scene, scene_subject
from pipeline_engraving import resize_and_pad


IMAGE_EXTENSIONS = {ext for ext, name in Image.registered_extensions().items() if name in Image.OPEN}
BOOK_NAMES = {
    "balzac_comedie_humaine": "La Comédie humaine",
    "cincy_steel_engravings": "Picturesque America",
    "dickens_copperfield": "David Copperfield",
    "dore_bible": "the Doré Bible",
    "dore_dante": "the Divine Comedy",
    "dore_quixote": "Don Quixote",
    "hugo_les_miserables": "Les Misérables",
    "twain_connecticut_yankee": "A Connecticut Yankee in King Arthur's Court",
    "twain_huck_finn": "Adventures of Huckleberry Finn",
    "twain_innocents_abroad": "The Innocents Abroad",
    "twain_roughing_it": "Roughing It",
    "twain_tom_sawyer": "The Adventures of Tom Sawyer",
    "twain_tramp_abroad": "A Tramp Abroad",
}
UNTITLED_CAPTION = "An engraving depicting an untitled scene"
BLIP2_PROMPT = "An engraving depicting"
MAX_SHARD_BYTES = 500 * 2**20
INK_LUMINANCE = 128
PNG_COMPRESSION = 1
JPEG_QUALITY = 95
ORIENTATION_TAG = 0x0112
DCT_MATRIX = np.cos(np.pi * (2 * np.arange(32)[None, :] + 1) * np.arange(32)[:, None] / 64)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    source = parser.add_argument_group("source")
    source.add_argument(
        "--source",
        required=True,
        help="A folder (walked recursively), 'demo', 'kaggle:OWNER/DATASET[/versions/N]' or 'hf:REPO_ID'.",
    )
    source.add_argument(
        "--include_class",
        action="append",
        default=[],
        help="Keep only files under a folder of this name (case-insensitive); repeatable.",
    )
    source.add_argument(
        "--metadata",
        default=None,
        help="CSV, JSON or JSONL with a file_name column and optional title/description/source/caption.",
    )
    source.add_argument("--num_images", type=int, default=1000, help="How many procedural images --source demo makes.")
    source.add_argument("--seed", type=int, default=0, help="First seed of the demo scenes.")
    source.add_argument(
        "--only_subject",
        choices=SUBJECTS,
        default=None,
        help="--source demo: keep only scenes of this main subject (the next seeds fill --num_images).",
    )
    source.add_argument(
        "--exclude_subject",
        action="append",
        choices=SUBJECTS,
        default=[],
        help="--source demo: leave out scenes of this main subject (the next seeds fill --num_images); repeatable.",
    )

    cleaning = parser.add_argument_group("cleaning")
    cleaning.add_argument("--min_size", type=int, default=64, help="Skip images whose shorter side is below this.")
    cleaning.add_argument(
        "--max_pixels",
        type=int,
        default=Image.MAX_IMAGE_PIXELS,
        help="Skip images with more pixels than this as decompression bombs.",
    )
    cleaning.add_argument(
        "--near_duplicate_threshold",
        type=int,
        default=16,
        help="Hamming distance of the 256-bit pHash at or below which images are near duplicates; "
        "-1 turns near-duplicate removal off.",
    )

    processing = parser.add_argument_group("processing")
    processing.add_argument("--image_size", type=int, default=512, help="Side of the square output images.")
    processing.add_argument(
        "--jpeg_quality",
        type=int,
        default=JPEG_QUALITY,
        help="Quality of the JPEG files written for JPEG sources (lower it for a compact copy to carry).",
    )
    processing.add_argument("--num_proc", type=int, default=1, help="Worker processes for reading and resizing.")
    processing.add_argument(
        "--val_fraction", type=float, default=0.1, help="Fraction of images in the validation split."
    )

    captions = parser.add_argument_group("captions")
    captions.add_argument(
        "--captioner",
        choices=("metadata", "blip2", "none"),
        default="metadata",
        help="Where captions come from: the metadata (title), a BLIP-2 model, or nowhere.",
    )
    captions.add_argument(
        "--captioner_model", default="Salesforce/blip2-opt-2.7b", help="BLIP-2 checkpoint or folder."
    )
    captions.add_argument("--caption_batch_size", type=int, default=16, help="Images per BLIP-2 batch.")
    captions.add_argument("--max_caption_tokens", type=int, default=30, help="New tokens BLIP-2 may write.")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", required=True, help="Where the dataset and its reports are written.")
    output.add_argument("--pretty_name", default="Engravings", help="Name shown on the dataset card.")
    output.add_argument(
        "--license",
        default=None,
        help="Hub licence id for the card (default: cc0-1.0 for the demo source, unknown otherwise).",
    )

    hub = parser.add_argument_group("hub")
    hub.add_argument(
        "--push_to_hub", metavar="REPO_ID", default=None, help="Push the dataset and its card to this repo."
    )
    hub.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    hub.add_argument("--dry_run", action="store_true", help="List what --push_to_hub would upload, upload nothing.")

    args = parser.parse_args(argv)
    if args.dry_run and not args.push_to_hub:
        parser.error("--dry_run lists what --push_to_hub would upload, so pass --push_to_hub REPO_ID too.")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error("--val_fraction must be at least 0 and below 1.")
    if args.metadata and not os.path.isfile(args.metadata):
        parser.error(f"--metadata {args.metadata} is not a file; pass a CSV, JSON or JSONL file.")
    return args


class UserError(Exception):
    """A problem with the user's input or environment, reported as one sentence without a traceback."""


def offline_reason(host):
    """Why `host` cannot be reached right now (None if it can), found out within a few seconds."""
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as error:
        return f"{host} is unreachable ({error.__class__.__name__})"
    return None


def download_kaggle(handle):
    """Downloads a Kaggle dataset with kagglehub (credentials from the environment) and returns its folder."""
    parsed = parse_dataset_handle(handle)
    if parsed.is_versioned() and Cache().load_from_cache(parsed):
        return kagglehub.dataset_download(handle)
    reason = offline_reason("www.kaggle.com")
    if reason:
        raise UserError(
            f"Cannot download kaggle:{handle} because {reason}; connect to the internet or pass the "
            "downloaded folder as --source."
        )
    try:
        return kagglehub.dataset_download(handle)
    except Exception as error:
        raise UserError(
            f"Cannot download kaggle:{handle} ({error.__class__.__name__}); check the handle and your "
            "Kaggle credentials (KAGGLE_USERNAME and KAGGLE_KEY)."
        )


def download_hub_dataset(repo_id, folder):
    """Writes the images of a Hub image dataset to `folder` with a metadata.jsonl of its text columns; returns it."""
    try:
        dataset = load_dataset(repo_id)
    except Exception as error:
        raise UserError(
            f"Cannot load hf:{repo_id} ({error.__class__.__name__}); connect to the internet, check the "
            "repo id, or pass a local folder as --source."
        )
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as rows:
        for split, part in dataset.items():
            image_column = next((name for name, f in part.features.items() if isinstance(f, ImageFeature)), None)
            if image_column is None:
                raise UserError(f"hf:{repo_id} has no Image column; pass an image dataset.")
            part = part.cast_column(image_column, ImageFeature(decode=False))
            text_columns = [name for name, f in part.features.items() if getattr(f, "dtype", None) == "string"]
            os.makedirs(os.path.join(folder, split), exist_ok=True)
            for index, example in enumerate(tqdm(part, desc=f"Writing hf:{repo_id} {split}")):
                image = example[image_column]
                file_name = f"{split}/{index:06d}{Path(image['path'] or '.png').suffix}"
                Path(folder, file_name).write_bytes(image["bytes"] or Path(image["path"]).read_bytes())
                rows.write(json.dumps({"file_name": file_name, **{c: example[c] for c in text_columns}}) + "\n")
    return folder


def list_source_files(root, include_classes):
    """Relative paths of the image-extension files under `root` (sorted) and of the other files, which are ignored."""
    wanted = {name.lower() for name in include_classes}
    images, others = [], []
    for directory, _, names in os.walk(root):
        relative_dir = os.path.relpath(directory, root)
        parts = {part.lower() for part in Path(relative_dir).parts}
        if wanted and not wanted & parts:
            continue
        for name in names:
            relative = os.path.normpath(os.path.join(relative_dir, name))
            is_image = Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")
            (images if is_image else others).append(relative)
    return sorted(images), sorted(others)


def load_metadata(path):
    """Rows of a CSV, JSON or JSONL metadata file, keyed by relative path and, where unambiguous, by file name."""
    suffix = Path(path).suffix.lower()
    with open(path, newline="", encoding="utf-8") as handle:
        if suffix == ".csv":
            rows = list(csv.DictReader(handle))
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in handle if line.strip()]
        elif suffix == ".json":
            rows = json.load(handle)
        else:
            raise UserError(f"--metadata {path} must be a .csv, .json or .jsonl file.")
    key = next((k for k in ("file_name", "path", "file", "image") if rows and k in rows[0]), None)
    if key is None:
        raise UserError(f"--metadata {path} needs a file_name column naming each image relative to --source.")
    table, name_counts = {}, {}
    for row in rows:
        relative = os.path.normpath(row[key])
        table[relative] = row
        name_counts[os.path.basename(relative)] = name_counts.get(os.path.basename(relative), 0) + 1
    for relative, row in list(table.items()):
        if name_counts[os.path.basename(relative)] == 1:
            table.setdefault(os.path.basename(relative), row)
    return table


def metadata_row(table, relative):
    """The metadata row of a file, matched by its path relative to --source, else by its file name."""
    return table.get(relative) or table.get(os.path.basename(relative), {})


def clean_text(text):
    """
    Collapses whitespace, drops double quotes (titles quote dialogue, often unbalanced), strips single quotes and a
    full stop at the ends, and undoes title-casing after apostrophes ("Wasn’T" becomes "Wasn’t").
    """
    text = re.sub(r"[\"“”«»]", "", str(text or ""))
    text = re.sub(r"\s+", " ", text).strip(" '‘’").rstrip(".").strip()
    return re.sub(r"(?<=\w[’'])([A-Z])\b", lambda m: m.group(1).lower(), text)


def lowercase_article(text):
    return re.sub(r"^(The|A|An) ", lambda m: m.group(1).lower() + " ", text)


def metadata_caption(row):
    """A caption from a metadata row: its caption, else its title, else its book (source), else its description."""
    if clean_text(row.get("caption")):
        return clean_text(row["caption"])
    title = clean_text(row.get("title"))
    if title:
        return f"An engraving depicting {lowercase_article(title)}"
    source = clean_text(row.get("source"))
    if source:
        return f"An engraving from {BOOK_NAMES.get(source, source.replace('_', ' ').title())}"
    description = clean_text(row.get("description"))
    if description:
        return f"An engraving depicting {description[0].lower()}{description[1:]}"
    return UNTITLED_CAPTION


def normalise_mode(image):
    """EXIF rotation applied; palette, alpha, CMYK and 16-bit images turned into 8-bit RGB (alpha over white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        scale = 255.0 / 65535.0 if pixels.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def perceptual_hash(image):
    """
    256-bit pHash as four uint64 words: which of the 16x16 lowest frequencies of the 32x32 greyscale image's DCT are
    above their median. Lanczos (not box) downsampling keeps regular hatching from aliasing into moiré, so resized or
    recompressed copies stay within a few bits while distinct engravings differ by 30 bits or more.
    """
    thumbnail = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=3.0)
    cells = np.asarray(thumbnail, dtype=np.float64)
    frequencies = (DCT_MATRIX @ cells @ DCT_MATRIX.T)[:16, :16].flatten()
    return np.packbits(frequencies > np.median(frequencies)).view(">u8").astype(np.uint64).tolist()


def channel_moments(image):
    """Per-channel sum and sum of squares of an RGB image's pixel values, from exact 256-bin histograms."""
    histogram = np.asarray(image.histogram(), dtype=np.float64).reshape(3, 256)
    levels = np.arange(256, dtype=np.float64)
    return (histogram @ levels).tolist(), (histogram @ levels**2).tolist()


# One sentence per reason a file is skipped, for the printed summary; report.json lists every file with its reason.
SKIP_REASONS = {
    "unreadable": "the file could not be read or decoded (a broken link, no permission, or a damaged image)",
    "empty file": "the file has no bytes",
    "not an image": "the file's contents are not an image Pillow can read, whatever its extension",
    "decompression bomb": "the image declares more pixels than --max_pixels, so it was not decoded",
    "animated": "the image has several frames (an animation); engravings are still images",
    "too small": "the image's shorter side is below --min_size",
    "truncated": "the image file ends early (an interrupted download or copy)",
    "exact duplicate": "the file has the same bytes as a kept one",
    "near duplicate": "the image looks the same as a kept one (perceptual hash within --near_duplicate_threshold)",
}


def skip_summary(reasons):
    """`{reason: count}` -> one line per reason: its count and the sentence that says what it means."""
    return [f"{count} skipped, {reason}: {SKIP_REASONS.get(reason, reason)}." for reason, count in reasons.items()]


def open_checked(path, settings):
    """
    Opens and decodes an image file. Returns `(image, sha256, original_size, None)`, or `(None, sha256, None, reason)`
    when it must be skipped; `original_size` is `[width, height]` after EXIF rotation.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return None, None, None, f"unreadable: {error.strerror or error}"
    if not data:
        return None, None, None, "empty file"
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return None, sha256, None, "not an image"
    except Image.DecompressionBombError as error:
        return None, sha256, None, f"decompression bomb: {error}"
    except Exception as error:
        return None, sha256, None, f"unreadable: {error}"
    if image.width * image.height > settings["max_pixels"]:
        return None, sha256, None, f"decompression bomb: {image.width}x{image.height} is over --max_pixels"
    if getattr(image, "n_frames", 1) > 1:
        return None, sha256, None, f"animated: {image.n_frames} frames"
    rotated = image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
    original_size = list(image.size[::-1] if rotated else image.size)
    if min(image.size) < settings["min_size"]:
        return (
            None,
            sha256,
            None,
            f"too small: {image.width}x{image.height} is below --min_size {settings['min_size']}",
        )
    try:
        image.draft(image.mode, (settings["image_size"], settings["image_size"]))
        image.load()
    except Exception as error:
        kind = "truncated" if re.search(r"truncat|broken data stream|EOF", str(error), re.I) else "unreadable"
        return None, sha256, None, f"{kind}: {error}"
    return image, sha256, original_size, None


def process_item(item):
    """
    Reads, checks and normalises one source item (a file or a demo seed), resizes and pads it, and writes it: as JPEG
    (quality 95) when the source is a JPEG, since its lossy damage is already done, and as PNG otherwise.

    Returns a record with the path and either a skip `reason` or the image's hash, sizes, padding box and pixel sums.
    """
    relative, path, seed = item
    settings = WORKER_SETTINGS
    if seed is None:
        image, sha256, original_size, reason = open_checked(path, settings)
        if reason:
            return {"path": relative, "reason": reason}
    else:
        image, caption = render_scene(seed, settings["image_size"])
        sha256 = hashlib.sha256(image.tobytes()).hexdigest()
        original_size = list(image.size)
    lossy = image.format == "JPEG"
    try:
        image = normalise_mode(image)
        square, box = resize_and_pad(image, settings["image_size"])
    except Exception as error:
        return {"path": relative, "reason": f"unreadable: {error}"}
    file_name = f"{sha256[:16]}.{'jpg' if lossy else 'png'}"
    temporary = os.path.join(settings["staging_dir"], f".{file_name}.{os.getpid()}")
    if lossy:
        square.save(temporary, format="JPEG", quality=settings["jpeg_quality"], subsampling=0)
    else:
        square.save(temporary, format="PNG", compress_level=PNG_COMPRESSION)
    os.replace(temporary, os.path.join(settings["staging_dir"], file_name))
    picture = square.crop(box)
    channel_sum, channel_sum_sq = channel_moments(square)
    luminance = np.asarray(picture.convert("L").histogram())
    record = {
        "path": relative,
        "sha256": sha256,
        "file_name": file_name,
        "original_size": original_size,
        "padding_box": list(box),
        "phash": perceptual_hash(image),
        "channel_sum": channel_sum,
        "channel_sum_sq": channel_sum_sq,
        "ink_coverage": float(luminance[:INK_LUMINANCE].sum() / luminance.sum()),
    }
    if seed is not None:
        record["caption"] = caption
    return record


WORKER_SETTINGS = {}


def init_worker(settings):
    WORKER_SETTINGS.update(settings)
    Image.MAX_IMAGE_PIXELS = settings["max_pixels"]


def process_all(items, settings, num_proc):
    """Runs `process_item` over all items, in order, with a progress bar and `num_proc` processes."""
    progress = dict(total=len(items), desc="Reading and resizing", unit="img")
    if num_proc <= 1:
        init_worker(settings)
        return [process_item(item) for item in tqdm(items, **progress)]
    with multiprocessing.get_context("fork").Pool(num_proc, initializer=init_worker, initargs=(settings,)) as pool:
        return list(tqdm(pool.imap(process_item, items, chunksize=8), **progress))


def remove_duplicates(records, threshold):
    """
    Splits records into kept ones and duplicates, in order: a record is an exact duplicate of an earlier one with the
    same sha256, and a near duplicate of the closest earlier kept one whose 256-bit pHash is within `threshold` bits.
    """
    kept, duplicates, first_by_sha = [], [], {}
    hashes = np.zeros((len(records), 4), dtype=np.uint64)
    for record in records:
        if record["sha256"] in first_by_sha:
            duplicates.append(
                {
                    "path": record["path"],
                    "reason": "exact duplicate",
                    "duplicate_of": first_by_sha[record["sha256"]]["path"],
                }
            )
            continue
        phash = np.asarray(record["phash"], dtype=np.uint64)
        distances = np.bitwise_count(hashes[: len(kept)] ^ phash).sum(axis=1)
        if threshold >= 0 and len(kept) and distances.min() <= threshold:
            closest = int(distances.argmin())
            duplicates.append(
                {
                    "path": record["path"],
                    "reason": f"near duplicate: pHash distance {distances[closest]}",
                    "duplicate_of": kept[closest]["path"],
                    "file_name": record["file_name"],
                }
            )
            continue
        first_by_sha[record["sha256"]] = record
        hashes[len(kept)] = phash
        kept.append(record)
    return kept, duplicates


def split_by_hash(records, val_fraction):
    """
    The `round(val_fraction * n)` records with the smallest content hashes go to validation (at least one when
    `val_fraction > 0` and there are two records or more, as an empty split cannot be saved), the rest to train.
    """
    by_hash = sorted(records, key=lambda record: record["sha256"])
    num_val = max(round(val_fraction * len(records)), 1 if val_fraction > 0 and len(records) > 1 else 0)
    validation = {record["sha256"] for record in by_hash[:num_val]}
    return [r for r in records if r["sha256"] not in validation], [r for r in records if r["sha256"] in validation]


def collapse_repeats(words):
    """Drops immediate repeats of any phrase of up to six words: "a ship a ship at sea" becomes "a ship at sea"."""
    for size in range(6, 0, -1):
        index = 0
        while index + 2 * size <= len(words):
            if words[index : index + size] == words[index + size : index + 2 * size]:
                del words[index + size : index + 2 * size]
            else:
                index += 1
    return words


def normalise_caption(text):
    """'An engraving depicting …' in sentence case, with repeated phrases collapsed."""
    text = clean_text(text).lower()
    if text.startswith(BLIP2_PROMPT.lower()):
        text = text[len(BLIP2_PROMPT) :]
    words = collapse_repeats(text.split())
    return f"{BLIP2_PROMPT} {' '.join(words)}" if words else UNTITLED_CAPTION


def caption_with_blip2(records, image_dir, args):
    """
    Captions each record's image with BLIP-2, prompted with "An engraving depicting", in batches.

    Every caption is appended to `captions/blip2_cache.jsonl` as soon as it is made, keyed by sha256, so an
    interrupted run resumes where it stopped.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    cache_path = os.path.join(args.output_dir, "captions", "blip2_cache.jsonl")
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path) as handle:
            cache = {row["sha256"]: row["caption"] for row in map(json.loads, filter(str.strip, handle))}
    todo = [record for record in records if record["sha256"] not in cache]
    if todo:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32
        if device == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        try:
            processor = Blip2Processor.from_pretrained(args.captioner_model)
            model = Blip2ForConditionalGeneration.from_pretrained(args.captioner_model, dtype=dtype).to(device).eval()
        except OSError as error:
            raise UserError(
                f"Cannot load the BLIP-2 captioner {args.captioner_model} ({error.__class__.__name__}); "
                "download it first or pass a local folder as --captioner_model."
            )
        with open(cache_path, "a") as handle:
            batches = range(0, len(todo), args.caption_batch_size)
            for start in tqdm(batches, desc="Captioning with BLIP-2", unit="batch"):
                batch = todo[start : start + args.caption_batch_size]
                images = [Image.open(os.path.join(image_dir, record["file_name"])) for record in batch]
                inputs = processor(images=images, text=[BLIP2_PROMPT] * len(batch), return_tensors="pt").to(device)
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
                with torch.no_grad():
                    generated = model.generate(**inputs, max_new_tokens=args.max_caption_tokens)
                for record, text in zip(batch, processor.batch_decode(generated, skip_special_tokens=True)):
                    cache[record["sha256"]] = normalise_caption(text)
                    handle.write(json.dumps({"sha256": record["sha256"], "caption": cache[record["sha256"]]}) + "\n")
                    handle.flush()
    return {record["sha256"]: cache[record["sha256"]] for record in records}


def size_category(count):
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if count < limit:
            return label
    return "n>1M"


def compute_stats(records, image_size):
    """Count, original size distribution, per-channel mean and std (0-255) of the output images, and ink coverage."""
    pixels = len(records) * image_size * image_size
    total = np.sum([r["channel_sum"] for r in records], axis=0)
    total_sq = np.sum([r["channel_sum_sq"] for r in records], axis=0)
    mean = total / pixels
    widths = np.array([r["original_size"][0] for r in records])
    heights = np.array([r["original_size"][1] for r in records])
    coverage = np.array([r["ink_coverage"] for r in records])

    def distribution(values):
        return {
            "min": float(values.min()),
            "median": float(np.median(values)),
            "mean": float(values.mean()),
            "max": float(values.max()),
            "p05": float(np.percentile(values, 5)),
            "p95": float(np.percentile(values, 95)),
        }

    return {
        "count": len(records),
        "image_size": image_size,
        "original_width": distribution(widths),
        "original_height": distribution(heights),
        "aspect_ratio": distribution(widths / heights),
        "channel_mean": [round(v, 3) for v in mean.tolist()],
        "channel_std": [round(v, 3) for v in np.sqrt(total_sq / pixels - mean**2).tolist()],
        "ink_coverage": {
            **distribution(coverage),
            "definition": f"fraction of picture pixels with luminance < {INK_LUMINANCE}",
        },
    }


def build_rows(records, captions, metadata, source_label):
    """The dataset rows, in the column order of the DatasetDict and ImageFolder metadata."""
    rows = []
    for record in records:
        row = metadata_row(metadata, record["path"])
        rows.append(
            {
                "file_name": record["file_name"],
                "caption": captions[record["sha256"]],
                "title": clean_text(row.get("title")),
                "source": clean_text(row.get("source")) or source_label or record["path"],
                "original_size": record["original_size"],
                "sha256": record["sha256"],
            }
        )
    return rows


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_annotations(output_dir, splits, records):
    """The ImageFolder metadata.jsonl of each split, the caption JSONL files and the per-image provenance JSON."""
    per_image = {}
    for split, rows in splits.items():
        write_jsonl(os.path.join(output_dir, split, "metadata.jsonl"), rows)
        short = "train" if split == "train" else "val"
        write_jsonl(
            os.path.join(output_dir, "captions", f"engraving_{short}.jsonl"),
            [{**row, "file_name": f"{split}/{row['file_name']}"} for row in rows],
        )
        for row, record in zip(rows, records[split]):
            per_image[f"{split}/{row['file_name']}"] = {
                "source_path": record["path"],
                "sha256": record["sha256"],
                "original_size": record["original_size"],
                "padding_box": record["padding_box"],
            }
    Path(output_dir, "metadata", "engraving_metadata.json").write_text(json.dumps(per_image, indent=1))


def build_dataset_dict(output_dir, splits):
    """A DatasetDict whose images are embedded PNG bytes, so it does not depend on the image files."""
    features = Features(
        {
            "image": ImageFeature(),
            "caption": Value("string"),
            "title": Value("string"),
            "source": Value("string"),
            "original_size": List(Value("int64")),
            "sha256": Value("string"),
        }
    )
    parts = {}
    for split, rows in splits.items():
        columns = {name: [row[name] for row in rows] for name in features if name != "image"}
        columns["image"] = [
            {"bytes": Path(output_dir, split, row["file_name"]).read_bytes(), "path": row["file_name"]} for row in rows
        ]
        parts[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(parts)


def write_dataset_card(path, args, stats, report, splits, captioner_note):
    license_id = args.license or ("cc0-1.0" if args.source == "demo" else "unknown")
    reasons = report["skipped_by_reason"].items()
    skipped = "\n".join(f"| {reason} | {count} |" for reason, count in reasons) or "| none | 0 |"
    width, height = stats["original_width"], stats["original_height"]
    card = f"""---
license: {license_id}
task_categories:
- text-to-image
- image-to-text
size_categories:
- {size_category(stats["count"])}
pretty_name: {args.pretty_name}
tags:
- engraving
- art
---

# {args.pretty_name}

{stats["count"]} engravings at {args.image_size}x{args.image_size} px with one caption each:
{len(splits["train"])} in `train` and {len(splits["validation"])} in `validation`.

## Columns
| column | meaning |
|---|---|
| image | the engraving, resized to fit {args.image_size} px and padded to a square with its own paper tone |
| caption | {captioner_note} |
| title | the title from the source metadata, empty when there is none |
| source | the collection from the metadata, else where the file came from |
| original_size | width and height of the source image, in pixels, after EXIF rotation |
| sha256 | SHA-256 of the source file (of the rendered pixels for the demo source) |

## Statistics
- Original width: median {width["median"]:.0f} px (range {width["min"]:.0f}-{width["max"]:.0f});
  height: median {height["median"]:.0f} px (range {height["min"]:.0f}-{height["max"]:.0f}).
- Per-channel mean (RGB, 0-255): {stats["channel_mean"]}; std: {stats["channel_std"]}.
- Ink coverage (share of picture pixels with luminance below {INK_LUMINANCE}):
  median {stats["ink_coverage"]["median"]:.3f}.

## How it was made
Made with `prepare_dataset.py --source {args.source} --captioner {args.captioner} --image_size {args.image_size}`.
Of {report["total_files"]} candidate files, {report["kept"]} were kept. Images were converted to RGB (palette, alpha,
CMYK and 16-bit modes normalised, EXIF rotation applied), resized keeping their aspect ratio and padded to a square
with the paper tone estimated from their border. Exact duplicates (same SHA-256) and near duplicates (256-bit pHash
within {args.near_duplicate_threshold} bits) were removed. The validation split holds the {args.val_fraction:.0%} of
images with the smallest SHA-256, so it is deterministic.

| skipped because | files |
|---|---|
{skipped}
"""
    Path(path).write_text(card, encoding="utf-8")


def hub_upload_plan(dataset_dict):
    """The files a push uploads, `{path in the repo: (split, shard index, shard count) or None for the card}`."""
    plan = {"README.md": None}
    for split, part in dataset_dict.items():
        num_shards = max(1, math.ceil(part.data.nbytes / MAX_SHARD_BYTES))
        for index in range(num_shards):
            plan[f"data/{split}-{index:05d}-of-{num_shards:05d}.parquet"] = (split, index, num_shards)
    return plan


def push_to_hub(dataset_dict, args):
    """Uploads the dataset card and Parquet shards of each split to the Hub dataset repo `args.push_to_hub`."""
    from huggingface_hub import HfApi

    plan = hub_upload_plan(dataset_dict)
    if args.dry_run:
        print(f"Dry run: would upload {len(plan)} files to the dataset repo {args.push_to_hub}:")
        for path in plan:
            print(f"  {path}")
        return
    try:
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy(os.path.join(args.output_dir, "README.md"), os.path.join(folder, "README.md"))
            for path, shard in plan.items():
                if shard:
                    split, index, num_shards = shard
                    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
                    dataset_dict[split].shard(num_shards, index, contiguous=True).to_parquet(
                        os.path.join(folder, path)
                    )
            api = HfApi()
            api.create_repo(args.push_to_hub, repo_type="dataset", private=args.private, exist_ok=True)
            api.upload_folder(
                repo_id=args.push_to_hub,
                repo_type="dataset",
                folder_path=folder,
                commit_message="Upload dataset made with prepare_dataset.py",
            )
    except Exception as error:
        raise UserError(
            f"Could not push to the Hub dataset repo {args.push_to_hub} ({error.__class__.__name__}); the "
            f"local dataset in {args.output_dir} is complete, so log in and rerun with network access."
        )
    print(f"Pushed {len(plan)} files to https://huggingface.co/datasets/{args.push_to_hub}")


def demo_seeds(args):
    """The first --num_images seeds from --seed whose scene passes --only_subject and --exclude_subject."""
    if args.only_subject in args.exclude_subject:
        raise UserError(f"--only_subject {args.only_subject} is also excluded; drop one of the two options.")
    seeds, seed = [], args.seed
    while len(seeds) < args.num_images:
        subject = scene_subject(seed)
        if subject not in args.exclude_subject and args.only_subject in (None, subject):
            seeds.append(seed)
        seed += 1
    return seeds


def resolve_source(args):
    """The items to process, `(relative path, absolute path or None, demo seed or None)`, and the ignored files."""
    if args.source == "demo":
        return [(f"demo/{seed:06d}.png", None, seed) for seed in demo_seeds(args)], []
    if args.only_subject or args.exclude_subject:
        raise UserError("--only_subject and --exclude_subject filter the demo scenes; use them with --source demo.")
    if args.source.startswith("kaggle:"):
        root = download_kaggle(args.source[len("kaggle:") :])
    elif args.source.startswith("hf:"):
        root = download_hub_dataset(args.source[len("hf:") :], os.path.join(args.output_dir, "source"))
        args.metadata = args.metadata or os.path.join(root, "metadata.jsonl")
    else:
        root = args.source
    if not os.path.isdir(root):
        raise UserError(f"--source {args.source} is not a folder; pass a folder of images, demo, kaggle:… or hf:….")
    images, others = list_source_files(root, args.include_class)
    return [(relative, os.path.join(root, relative), None) for relative in images], others


def prepare_output_dir(output_dir):
    """Creates the output folders, removing the ones this script writes so stale files from older runs cannot leak."""
    for name in ("train", "validation", "dataset"):
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    for name in ("train", "validation", "captions", "metadata"):
        os.makedirs(os.path.join(output_dir, name), exist_ok=True)


def main(args):
    prepare_output_dir(args.output_dir)
    items, ignored = resolve_source(args)
    metadata = load_metadata(args.metadata) if args.metadata else {}

    settings = {
        "image_size": args.image_size,
        "min_size": args.min_size,
        "max_pixels": args.max_pixels,
        "jpeg_quality": args.jpeg_quality,
        "staging_dir": os.path.join(args.output_dir, "train"),
    }
    records = process_all(items, settings, args.num_proc)
    skipped = [{"path": r["path"], "reason": r["reason"]} for r in records if "reason" in r]
    kept, duplicates = remove_duplicates([r for r in records if "reason" not in r], args.near_duplicate_threshold)
    for duplicate in duplicates:
        if "file_name" in duplicate:
            os.remove(os.path.join(args.output_dir, "train", duplicate.pop("file_name")))
    skipped += duplicates
    if not kept:
        raise UserError(f"No usable images were found in --source {args.source}; see {args.output_dir}/report.json.")

    if args.captioner == "blip2":
        captions = caption_with_blip2(kept, os.path.join(args.output_dir, "train"), args)
        captioner_note = f"written by BLIP-2 ({args.captioner_model}) prompted with '{BLIP2_PROMPT}'"
    elif args.captioner == "metadata":
        captions = {r["sha256"]: r.get("caption") or metadata_caption(metadata_row(metadata, r["path"])) for r in kept}
        captioner_note = (
            "'An engraving depicting <title>' from the metadata, else built from the source or description"
        )
    else:
        captions = {r["sha256"]: "" for r in kept}
        captioner_note = "empty: this is an image-only dataset"

    train, validation = split_by_hash(kept, args.val_fraction)
    for record in validation:
        os.replace(
            os.path.join(args.output_dir, "train", record["file_name"]),
            os.path.join(args.output_dir, "validation", record["file_name"]),
        )
    source_label = "demo" if args.source == "demo" else None
    splits = {
        "train": build_rows(train, captions, metadata, source_label),
        "validation": build_rows(validation, captions, metadata, source_label),
    }
    write_annotations(args.output_dir, splits, {"train": train, "validation": validation})

    stats = compute_stats(kept, args.image_size)
    Path(args.output_dir, "stats.json").write_text(json.dumps(stats, indent=2))
    reasons = dict(Counter(entry["reason"].split(":")[0] for entry in skipped))
    report = {
        "total_files": len(items),
        "kept": len(kept),
        "skipped_by_reason": reasons,
        "skipped": skipped,
        "ignored_non_image_files": ignored,
    }
    Path(args.output_dir, "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    write_dataset_card(os.path.join(args.output_dir, "README.md"), args, stats, report, splits, captioner_note)

    dataset_dict = build_dataset_dict(args.output_dir, splits)
    dataset_dict.save_to_disk(os.path.join(args.output_dir, "dataset"))
    print(
        f"{report['total_files']} files: kept {report['kept']} (train {len(train)}, validation {len(validation)}), "
        f"skipped {len(skipped)}" + "".join(f"\n  {line}" for line in skip_summary(reasons))
    )
    if ignored:
        print(f"Ignored {len(ignored)} files without an image extension (listed in report.json).")
    print(f"Wrote {args.output_dir}")

    if args.push_to_hub:
        push_to_hub(dataset_dict, args)


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as error:
        sys.exit(f"Error: {error}")
