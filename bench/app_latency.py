"""
Latency of one seed, as the app serves it: the engraving and its caption, on a randomly initialised model of a preset,
with the split between the image (the generator), the caption (the image encoder and the caption decoding) and the
post-processing (tensor to PIL). Median and p95 over `--seeds` seeds after two warm-up seeds, for each thread count,
in PyTorch (float32, and bfloat16 for the generator) and in onnxruntime on export_onnx.py's graphs.

A random model rarely writes `<eos>`, so its captions run to `max_caption_length`: the caption time is a worst case,
and the per-token time shows what a trained model's shorter captions cost. The ONNX caption step has no key/value
cache, so it reads the whole caption so far at every token.

    python bench/app_latency.py --preset base --seeds 20 --threads 1 2
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from configuration_engraving import EngravingConfig  # noqa: E402
from modeling_engraving import EngravingModel  # noqa: E402
from pipeline_engraving import EngravingPipeline, pixel_values_to_images, seed_latents  # noqa: E402
from tokenization_engraving import train_tokenizer  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description="Latency of one engraving and its caption, part by part.")
    parser.add_argument("--preset", default="base", help="Model preset: base (512 px), small, demo or tiny.")
    parser.add_argument(
        "--vocab_size", type=int, default=8000, help="Tokenizer size; the caption head scales with it."
    )
    parser.add_argument("--seeds", type=int, default=20, help="Timed seeds (after two warm-up seeds).")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="Thread counts to measure.")
    parser.add_argument("--no_onnx", action="store_true", help="Skip the onnxruntime rows.")
    return parser.parse_args()


def random_word_tokenizer(vocab_size, seed=0):
    """
    A byte-level BPE of about `vocab_size` tokens, trained on random words, so the caption head has its real size; and
    those 3,000 words, which captions keep to as a trained model's keep to its training captions' words.
    """
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(3000)]
    tokenizer = train_tokenizer((" ".join(rng.choices(words, k=12)) for _ in range(5000)), vocab_size=vocab_size)
    return tokenizer, sorted(set(words))


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def pytorch_seed(pipeline, seed):
    """One seed through the pipeline's own steps: `(image, caption, caption, post-processing)` seconds."""
    latents = pipeline.seed_latents([seed])
    pixel_values, image_seconds = timed(lambda: pipeline.draw(latents))
    _, caption_seconds = timed(lambda: pipeline.caption_pixel_values(pixel_values))
    _, post_seconds = timed(lambda: pixel_values_to_images(pixel_values))
    return image_seconds, caption_seconds, post_seconds


def onnx_seed(sessions, pipeline, seed):
    """One seed through the exported graphs, greedy captions kept to the same words: the same three parts."""
    config = pipeline.model.config
    latents = seed_latents([seed], config.latent_size).numpy()
    (pixel_values,), image_seconds = timed(lambda: sessions["image_decoder"].run(None, {"latents": latents}))

    def caption():
        (image_latents,) = sessions["image_encoder"].run(None, {"pixel_values": pixel_values})
        input_ids = torch.tensor([[config.bos_token_id]])
        while input_ids.shape[1] < config.max_caption_length and input_ids[0, -1] != config.eos_token_id:
            inputs = {"latents": image_latents, "input_ids": input_ids.numpy()}
            (logits,) = sessions["caption_decoder_step"].run(None, inputs)
            logits = pipeline.word_constraint(input_ids, torch.from_numpy(logits))
            input_ids = torch.cat([input_ids, logits.argmax(-1, keepdim=True)], dim=1)
        return pipeline.tokenizer.decode(input_ids[0], skip_special_tokens=True)

    _, caption_seconds = timed(caption)
    _, post_seconds = timed(lambda: pixel_values_to_images(torch.from_numpy(pixel_values)))
    return image_seconds, caption_seconds, post_seconds


def summary(name, threads, parts):
    """One table row: median and p95 of the whole, and the median of each part, in ms."""
    totals = sorted(sum(part) for part in parts)
    medians = [1000 * statistics.median(part[index] for part in parts) for index in range(3)]
    p95 = 1000 * totals[min(len(totals) - 1, round(0.95 * (len(totals) - 1)))]
    return (
        f"| {name} | {threads} | {1000 * statistics.median(totals):.0f} | {p95:.0f} | "
        + " | ".join(f"{value:.0f}" for value in medians)
        + " |"
    )


def onnx_sessions(pipeline, threads, folder):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    names = ("image_decoder", "image_encoder", "caption_decoder_step")
    return {
        name: onnxruntime.InferenceSession(str(folder / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
        for name in names
    }


def main():
    args = parse_args()
    torch.manual_seed(0)
    tokenizer, words = random_word_tokenizer(args.vocab_size)
    config = EngravingConfig.from_preset(args.preset, vocab_size=len(tokenizer), caption_words=words)
    model = EngravingModel(config).eval()
    pipelines = {
        "PyTorch, float32": EngravingPipeline(model, tokenizer),
        "PyTorch, bfloat16 generator": EngravingPipeline(model, tokenizer, generator_dtype=torch.bfloat16),
    }
    scratch = Path(tempfile.mkdtemp(prefix="app_latency_"))
    if not args.no_onnx:
        pipelines["PyTorch, float32"].save_pretrained(scratch / "model")
        export = [sys.executable, str(REPO_ROOT / "export_onnx.py"), "--model", str(scratch / "model")]
        subprocess.run([*export, "--output_dir", str(scratch / "onnx")], check=True, capture_output=True)

    print(
        f"preset={args.preset} image_size={config.image_size} params={model.num_parameters() / 1e6:.1f}M "
        f"cpu_count={os.cpu_count()} load_average={os.getloadavg()[0]:.1f} torch={torch.__version__}, "
        f"{args.seeds} seeds"
    )
    print("| runtime | threads | median ms | p95 ms | image ms | caption ms | post-processing ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    seeds = range(args.seeds + 2)
    for threads in args.threads:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for name, pipeline in pipelines.items():
                parts = [pytorch_seed(pipeline, seed) for seed in seeds][2:]
                print(summary(name, threads, parts), flush=True)
        if not args.no_onnx:
            sessions = onnx_sessions(pipelines["PyTorch, float32"], threads, scratch / "onnx")
            parts = [onnx_seed(sessions, pipelines["PyTorch, float32"], seed) for seed in seeds][2:]
            print(summary("onnxruntime, float32", threads, parts), flush=True)


if __name__ == "__main__":
    main()
