"""
Draws engravings and their captions with a trained Engraving model, from a local folder or a Hub id.

    python generate.py --model outputs/demo/model --seeds 0-99 --output_dir samples --grid
    python generate.py --model outputs/demo/model --interpolate 3 17 --steps 8 --output_dir walk
    python generate.py --model outputs/demo/model --caption "An engraving depicting a lighthouse" --output_dir light
    python generate.py --model outputs/demo/model --image photo.jpg --output_dir engraved

Every mode writes its PNGs and a `captions.jsonl` (one `{"caption", "file", ...}` record per image) to --output_dir.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm
from transformers import AutoModel

from modeling_engraving import (
    CAPTION_TEMPERATURE,
    CAPTION_TOP_P,
    IMAGINE_VARIATION,
    images_to_pixel_values,
    pixel_values_to_images,
)


MAX_SEED = 2**32 - 1
GRID_MIN_CELL = 128


def parse_seeds(text):
    """Parses `0-99`, `7` or `1,5,10-12` into a list of seeds (argparse type)."""
    seeds = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            seeds += range(int(first), int(last or first) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed list: write e.g. 0-99, 7 or 1,5,10-12.") from None
    if not seeds or not all(0 <= seed <= MAX_SEED for seed in seeds):
        raise argparse.ArgumentTypeError(f"{text!r} must name seeds from 0 to {MAX_SEED}, lowest first in each range.")
    return seeds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Draw engravings and captions with a trained Engraving model.")

    model_group = parser.add_argument_group("Model")
    model_group.add_argument("--model", required=True, help="A folder written by train.py, or a Hub model id.")
    model_group.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="Where to run the model (default: cuda when available, else cpu).",
    )

    mode_group = parser.add_argument_group("What to draw (default: one engraving per seed of --seeds)")
    modes = mode_group.add_mutually_exclusive_group()
    modes.add_argument(
        "--interpolate",
        nargs=2,
        type=int,
        metavar=("SEED_A", "SEED_B"),
        help="Walk from one seed's engraving to another's.",
    )
    modes.add_argument("--caption", help="Draw an engraving of this caption for each seed of --seeds.")
    modes.add_argument(
        "--image", nargs="+", metavar="FILE", help="Caption these pictures and redraw them as engravings."
    )

    sampling_group = parser.add_argument_group("Sampling")
    sampling_group.add_argument(
        "--seeds", type=parse_seeds, default="0-7", help="Seeds to draw, e.g. 0-99, 7 or 1,5,10-12."
    )
    sampling_group.add_argument(
        "--temperature", type=float, default=CAPTION_TEMPERATURE, help="Caption sampling temperature; 0 is greedy."
    )
    sampling_group.add_argument(
        "--top_p", type=float, default=CAPTION_TOP_P, help="Nucleus of the caption sampling, in (0, 1]."
    )
    sampling_group.add_argument(
        "--variation",
        type=float,
        default=IMAGINE_VARIATION,
        help="How far each seed moves --caption's drawing from the caption's own latent (0: the same for every seed).",
    )
    sampling_group.add_argument("--steps", type=int, default=8, help="Images in an --interpolate strip (at least 2).")
    sampling_group.add_argument("--batch_size", type=int, default=16, help="Images drawn per forward pass.")

    output_group = parser.add_argument_group("Output")
    output_group.add_argument("--output_dir", default="generated", help="Where to write the PNGs and captions.jsonl.")
    output_group.add_argument(
        "--grid", action="store_true", help="Also write grid.png: the engravings with their captions."
    )

    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error(f"--temperature must be 0 or more, got {args.temperature}.")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p must be in (0, 1], got {args.top_p}.")
    if args.steps < 2:
        parser.error(f"--steps must be at least 2, got {args.steps}.")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}.")
    if args.interpolate and not all(0 <= seed <= MAX_SEED for seed in args.interpolate):
        parser.error(f"--interpolate seeds must be from 0 to {MAX_SEED}.")
    return args


def load_model(model_id, device="cpu"):
    """
    Loads a trained Engraving model and its tokenizer, in eval mode on `device`, from a local folder or a Hub id.
    It runs the modeling code saved with the model (`trust_remote_code`), as `AutoModel` does on the Hub.
    """
    try:
        model = AutoModel.from_pretrained(model_id, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load an Engraving model from {model_id!r} ({type(error).__name__}): "
            "give a folder written by train.py or a Hub model id."
        ) from error
    if model.tokenizer is None:
        raise ValueError(f"{model_id!r} has no tokenizer: save the model with its tokenizer to get captions.")
    return model.to(device).eval()


def open_image(path):
    """Opens an image file as RGB, or raises a ValueError that says the file is not a readable image."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"{Path(path).name} is not an image that can be read ({type(error).__name__}): "
            "use a PNG, JPEG, WebP or TIFF."
        ) from None


def seed_batches(seeds, batch_size, consecutive=False):
    """Splits seeds into batches of at most `batch_size`; with `consecutive`, each batch is a run n, n+1, n+2, ..."""
    batch = []
    for seed in seeds:
        if batch and (len(batch) == batch_size or (consecutive and seed != batch[-1] + 1)):
            yield batch
            batch = []
        batch.append(seed)
    if batch:
        yield batch


@torch.inference_mode()
def engrave_pictures(model, pictures):
    """Captions PIL pictures and redraws each through the model's latent: `(captions, engravings)`."""
    pixel_values = images_to_pixel_values(pictures, model.config.image_size).to(model.device, model.dtype)
    latents = model.encode_images(pixel_values)
    return model.caption_latents(latents), pixel_values_to_images(model.decode_latents(latents))


def caption_font(size):
    """A font of `size` pixels for grid captions: DejaVu Sans where the system has it, else Pillow's built-in one."""
    # Pillow's built-in font has no accented letters or dashes, which real titles have ("Abbé", "—"); DejaVu Sans has
    # them and is on most Linux systems (Debian's fonts-dejavu-core). Pillow finds it by file name in the system's fonts.
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def wrap_caption(caption, font, width):
    """`caption`'s words in lines no wider than `width` pixels in `font` (a word wider than that gets a line alone)."""
    lines = []
    for word in caption.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def captioned_grid(images, captions, columns):
    """Lays images out in rows of `columns` on white paper, each with its whole caption wrapped beneath it."""
    scale = max(1, math.ceil(GRID_MIN_CELL / images[0].width))
    width, height = images[0].width * scale, images[0].height * scale
    font = caption_font(max(10, width // 22))
    line_height = font.size + 4
    caption_lines = [wrap_caption(caption, font, width - 8) for caption in captions]  # a 4 px margin on each side
    cell_height = height + max(map(len, caption_lines), default=0) * line_height + 8
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, lines) in enumerate(zip(images, caption_lines)):
        left, top = (index % columns) * width, (index // columns) * cell_height
        grid.paste(image.resize((width, height), Image.Resampling.NEAREST), (left, top))
        for line_index, line in enumerate(lines):
            draw.text((left + 4, top + height + 4 + line_index * line_height), line, fill="black", font=font)
    return grid


@torch.inference_mode()
def engrave_seeds(model, args):
    """Yields `(seed, image, caption)` per seed of --seeds, batch by batch: new engravings, or drawings of --caption."""
    # `imagine` numbers its images seed, seed + 1, ...: a caption's batches must be runs of consecutive seeds.
    batches = seed_batches(args.seeds, args.batch_size, consecutive=args.caption is not None)
    with tqdm(total=len(args.seeds), desc="Engraving", unit="image") as progress:
        for batch in batches:
            if args.caption is None:
                output = model.generate(
                    seeds=batch,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    batch_size=len(batch),
                )
            else:
                output = model.imagine([args.caption] * len(batch), seed=batch[0], variation=args.variation)
            yield from zip(batch, output.images, output.captions)
            progress.update(len(batch))


def draw_seeds(model, args, output_dir):
    """Writes one PNG per seed (and grid.png with --grid); returns the caption records."""
    records, images = [], []
    for seed, image, caption in engrave_seeds(model, args):
        file = f"seed_{seed}.png"
        records.append({"seed": seed, "caption": caption, "file": file})
        image.save(output_dir / file)
        if args.grid:
            images.append(image)
    if args.grid:
        columns = math.ceil(math.sqrt(len(images)))
        captioned_grid(images, [record["caption"] for record in records], columns).save(output_dir / "grid.png")
    return records


def draw_interpolation(model, args, output_dir):
    """Writes each step of the walk from one seed to the other, and interpolation.png, the captioned strip."""
    seed_a, seed_b = args.interpolate
    with torch.inference_mode():
        output = model.interpolate(seed_a, seed_b, steps=args.steps)
    records = []
    for step, (image, caption) in enumerate(zip(output.images, output.captions)):
        file = f"step_{step:02d}.png"
        records.append({"step": step, "seed_a": seed_a, "seed_b": seed_b, "caption": caption, "file": file})
        image.save(output_dir / file)
    captioned_grid(output.images, output.captions, columns=len(output.images)).save(output_dir / "interpolation.png")
    return records


def draw_pictures(model, args, pictures, output_dir):
    """Captions each --image and writes its engraved reconstruction; returns the caption records."""
    records = []
    with tqdm(total=len(pictures), desc="Captioning", unit="image") as progress:
        for start in range(0, len(pictures), args.batch_size):
            paths = args.image[start : start + args.batch_size]
            captions, engravings = engrave_pictures(model, pictures[start : start + args.batch_size])
            for index, (path, caption, engraving) in enumerate(zip(paths, captions, engravings), start=start):
                file = f"engraved_{index:04d}_{Path(path).stem}.png"
                records.append({"source": str(path), "caption": caption, "file": file})
                engraving.save(output_dir / file)
            progress.update(len(paths))
    return records


def main(argv=None):
    args = parse_args(argv)
    try:
        model = load_model(args.model, args.device)
        pictures = [open_image(path) for path in args.image or []]
    except ValueError as error:
        sys.exit(f"error: {error}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.interpolate:
        records = draw_interpolation(model, args, output_dir)
    elif pictures:
        records = draw_pictures(model, args, pictures, output_dir)
    else:
        records = draw_seeds(model, args, output_dir)
    with open(output_dir / "captions.jsonl", "w") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    print(f"Wrote {len(records)} images and captions.jsonl to {output_dir}.")


if __name__ == "__main__":
    main()
