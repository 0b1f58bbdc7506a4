"""
Times the demo's one-seed request, `pipeline(seeds=[seed])`, on a randomly initialised model, and each of its
parts: the generator (with the PIL conversion), the image encoder that reads the drawing back, and the caption
decoding.

A random model rarely writes `<eos>`, so its captions run to `max_caption_length`: the caption time is a worst case,
and the per-token time shows what a trained model's shorter captions cost.

    python bench/app_latency.py --preset base --runs 7
    python bench/app_latency.py --preset base --threads 2 --autocast_bfloat16
"""

import argparse
import contextlib
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configuration_engraving import EngravingConfig  # noqa: E402
from modeling_engraving import EngravingModel  # noqa: E402
from pipeline_engraving import (  # noqa: E402
    CAPTION_TEMPERATURE,
    CAPTION_TOP_P,
    EngravingPipeline,
    pixel_values_to_images,
    seeded_generators,
)
from tokenization_engraving import train_tokenizer  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description="Time one engraving and its caption, part by part.")
    parser.add_argument("--preset", default="base", help="Model preset: base (512 px), small or tiny.")
    parser.add_argument(
        "--vocab_size", type=int, default=8000, help="Tokenizer size; the caption head scales with it."
    )
    parser.add_argument("--runs", type=int, default=7, help="Timed runs after one warm-up; the median is reported.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads.")
    parser.add_argument(
        "--autocast_bfloat16", action="store_true", help="Run under CPU autocast to bfloat16 (uses AMX where present)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights and of the first timed engraving.")
    parser.add_argument(
        "--unconstrained_captions", action="store_true", help="Decode captions free, without the training-word masks."
    )
    return parser.parse_args()


def random_word_tokenizer(vocab_size, seed):
    """
    A byte-level BPE of about `vocab_size` tokens, trained on random words, so the caption head has its real size; and
    those 3,000 words, which captions keep to as a trained model's keep to its training captions' words.
    """
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(3000)]
    tokenizer = train_tokenizer((" ".join(rng.choices(words, k=12)) for _ in range(5000)), vocab_size=vocab_size)
    return tokenizer, sorted(set(words))


def median_seconds(function, runs):
    """Median wall time of `function()` over `runs` calls after one warm-up, and its last result."""
    result = function()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer, words = random_word_tokenizer(args.vocab_size, args.seed)
    caption_words = None if args.unconstrained_captions else words
    config = EngravingConfig.from_preset(args.preset, vocab_size=len(tokenizer), caption_words=caption_words)
    model = EngravingModel(config).eval()
    pipeline = EngravingPipeline(model, tokenizer)
    seeds = iter(range(args.seed, args.seed + 4 * (args.runs + 1)))
    latents = pipeline.seed_latents([args.seed])
    drawing = model.decode_latents(latents)

    def caption():
        ids = pipeline.generate_caption_ids(
            latents, CAPTION_TEMPERATURE, CAPTION_TOP_P, seeded_generators([args.seed])
        )
        return ids.shape[1] - 1, tokenizer.batch_decode(ids, skip_special_tokens=True)

    parts = {
        "pipeline(seeds=[s]) total": lambda: pipeline(seeds=[next(seeds)]),
        "generator + PIL": lambda: pixel_values_to_images(model.decode_latents(latents)),
        "image encoder": lambda: model.encode_images(drawing),
        "caption decoding": caption,
    }
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast_bfloat16 else contextlib.nullcontext()
    print(
        f"preset={args.preset} image_size={config.image_size} params={model.num_parameters() / 1e6:.1f}M "
        f"threads={args.threads} bfloat16={args.autocast_bfloat16} cpu_count={os.cpu_count()} "
        f"load_average={os.getloadavg()[0]:.1f} torch={torch.__version__}"
    )
    with torch.inference_mode(), autocast:
        for name, function in parts.items():
            seconds, result = median_seconds(function, args.runs)
            detail = (
                f"  ({result[0]} tokens, {1000 * seconds / result[0]:.1f} ms/token)"
                if name == "caption decoding"
                else ""
            )
            print(f"{name:>32}: {1000 * seconds:8.1f} ms median of {args.runs}{detail}")


if __name__ == "__main__":
    main()
