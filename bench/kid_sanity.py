"""
Sanity check of the KID / FID implementation on real engravings: two random halves of a folder of real images should
score KID x1000 about 1 against each other, and deliberately broken versions of one half (greyscale and blurred,
uniform noise, flat grey) should score far higher. Reads the images, writes nothing but an optional JSON summary.

    python bench/kid_sanity.py --image_dir /work/shared/data/engravings/images --max_images 1000
"""

import argparse
import json
import sys
import time
from pathlib import Path

import evaluate
import numpy as np
from PIL import Image, ImageFilter
from tqdm.auto import tqdm


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engraving_features import ImageFeatureExtractor  # noqa: E402
from pipeline_engraving import resize_and_pad  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description="KID/FID of real-vs-real halves and of broken images vs real.")
    parser.add_argument(
        "--image_dir", default="/work/shared/data/engravings/images", help="Folder of real engravings."
    )
    parser.add_argument("--pattern", default="*.jpg", help="Glob of the image files inside --image_dir.")
    parser.add_argument(
        "--image_size", type=int, default=256, help="Images are fitted into squares of this side first."
    )
    parser.add_argument(
        "--max_images", type=int, default=1000, help="Use at most this many images (0: all), split in halves."
    )
    parser.add_argument(
        "--blur_radius", type=float, default=4.0, help="Gaussian blur radius (px) of the greyscale broken half."
    )
    parser.add_argument("--kid_subset_size", type=int, default=100, help="Rows per KID subset.")
    parser.add_argument("--kid_num_subsets", type=int, default=100, help="KID subsets averaged.")
    parser.add_argument("--batch_size", type=int, default=32, help="Feature extractor batch size.")
    parser.add_argument(
        "--seed", type=int, default=0, help="Seeds the split into halves, the noise and the KID subsets."
    )
    parser.add_argument("--output_json", default=None, help="Optional path for a JSON summary.")
    return parser.parse_args()


def broken_versions(images, blur_radius, rng):
    """Greyscale-and-blurred, uniform-noise and flat-grey counterparts of `images`."""
    size = images[0].size
    return {
        "grey_blurred": [
            image.convert("L").filter(ImageFilter.GaussianBlur(blur_radius)).convert("RGB") for image in images
        ],
        "uniform_noise": [
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in images
        ],
        "constant_grey": [Image.new("RGB", size, (128, 128, 128)) for _ in images],
    }


def main(args):
    started = time.perf_counter()
    files = sorted(Path(args.image_dir).glob(args.pattern))
    if len(files) < 4:
        raise SystemExit(
            f"Found {len(files)} images matching {args.pattern} in {args.image_dir}; at least 4 are needed."
        )
    rng = np.random.default_rng(args.seed)
    files = [files[i] for i in rng.permutation(len(files))[: args.max_images or None]]
    images = [resize_and_pad(Image.open(f), args.image_size)[0] for f in tqdm(files, desc="loading images")]
    half_a, half_b = images[: len(images) // 2], images[len(images) // 2 :]

    extractor = ImageFeatureExtractor(batch_size=args.batch_size)
    kid, fid = evaluate.load(str(REPO_ROOT / "metrics" / "kid")), evaluate.load(str(REPO_ROOT / "metrics" / "fid"))
    features_b = extractor(half_b, description="half B").numpy()
    candidates = {"real_half_a": half_a, **broken_versions(half_a, args.blur_radius, rng)}
    results = {}
    for name, candidate_images in candidates.items():
        features = extractor(candidate_images, description=name).numpy()
        kid_result = kid.compute(
            predictions=features,
            real_features=features_b,
            subset_size=args.kid_subset_size,
            num_subsets=args.kid_num_subsets,
            seed=args.seed,
        )
        results[name] = {
            "kid_x1000": kid_result["kid_x1000"],
            "kid_x1000_std": 1000.0 * kid_result["kid_std"],
            "fid": fid.compute(predictions=features, real_features=features_b)["fid"],
        }
        print(
            f"{name:>14} vs real half B: KID x1000 = {results[name]['kid_x1000']:8.2f} "
            f"(std {results[name]['kid_x1000_std']:.2f}), FID = {results[name]['fid']:.2f}"
        )
    summary = {
        "feature_extractor": extractor.name,
        "num_images_per_half": [len(half_a), len(half_b)],
        "image_size": args.image_size,
        "results": results,
        "elapsed_seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"{extractor.name}; halves of {len(half_a)} and {len(half_b)} images at {args.image_size} px; "
        f"{summary['elapsed_seconds']} s."
    )
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main(parse_args())
