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
from tqdm.auto import tqdm

from pipeline_engraving import (
    CAPTION_TEMPERATURE,
    CAPTION_TOP_P,
    IMAGINE_VARIATION,
    MAX_SEED,
    EngravingPipeline,
    captioned_grid,
    open_image,
)


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
def engrave_seeds(pipeline, args):
    """Yields `(seed, image, caption)` per seed of --seeds, in batches: new engravings, or drawings of --caption."""
    # `imagine` numbers its images seed, seed + 1, ...: a caption's batches must be runs of consecutive seeds.
    batches = seed_batches(args.seeds, args.batch_size, consecutive=args.caption is not None)
    with tqdm(total=len(args.seeds), desc="Engraving", unit="image") as progress:
        for batch in batches:
            if args.caption is None:
                output = pipeline(
                    seeds=batch,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    batch_size=len(batch),
                )
            else:
                output = pipeline.imagine([args.caption] * len(batch), seed=batch[0], variation=args.variation)
            yield from zip(batch, output.images, output.captions)
            progress.update(len(batch))


def draw_seeds(pipeline, args, output_dir):
    """Writes one PNG per seed (and grid.png with --grid); returns the caption records."""
    records, images = [], []
    for seed, image, caption in engrave_seeds(pipeline, args):
        file = f"seed_{seed}.png"
        records.append({"seed": seed, "caption": caption, "file": file})
        image.save(output_dir / file)
        if args.grid:
            images.append(image)
    if args.grid:
        columns = math.ceil(math.sqrt(len(images)))
        captioned_grid(images, [record["caption"] for record in records], columns).save(output_dir / "grid.png")
    return records


def draw_interpolation(pipeline, args, output_dir):
    """Writes each step of the walk from one seed to the other, and interpolation.png, the captioned strip."""
    seed_a, seed_b = args.interpolate
    with torch.inference_mode():
        output = pipeline.interpolate(seed_a, seed_b, steps=args.steps)
    records = []
    for step, (image, caption) in enumerate(zip(output.images, output.captions)):
        file = f"step_{step:02d}.png"
        records.append({"step": step, "seed_a": seed_a, "seed_b": seed_b, "caption": caption, "file": file})
        image.save(output_dir / file)
    captioned_grid(output.images, output.captions, columns=len(output.images)).save(output_dir / "interpolation.png")
    return records


def draw_pictures(pipeline, args, pictures, output_dir):
    """Captions each --image and writes its engraved reconstruction; returns the caption records."""
    records = []
    with tqdm(total=len(pictures), desc="Captioning", unit="image") as progress:
        for start in range(0, len(pictures), args.batch_size):
            paths = args.image[start : start + args.batch_size]
            output = pipeline.engrave(pictures[start : start + args.batch_size])
            for index, (path, caption, engraving) in enumerate(
                zip(paths, output.captions, output.images), start=start
            ):
                file = f"engraved_{index:04d}_{Path(path).stem}.png"
                records.append({"source": str(path), "caption": caption, "file": file})
                engraving.save(output_dir / file)
            progress.update(len(paths))
    return records


def main(argv=None):
    args = parse_args(argv)
    try:
        pipeline = EngravingPipeline.from_pretrained(args.model, device=args.device)
        pictures = [open_image(path) for path in args.image or []]
    except ValueError as error:
        sys.exit(f"error: {error}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.interpolate:
        records = draw_interpolation(pipeline, args, output_dir)
    elif pictures:
        records = draw_pictures(pipeline, args, pictures, output_dir)
    else:
        records = draw_seeds(pipeline, args, output_dir)
    with open(output_dir / "captions.jsonl", "w") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    print(f"Wrote {len(records)} images and captions.jsonl to {output_dir}.")


if __name__ == "__main__":
    main()
