"""
Refits the latent prior of a trained model on its training split, with the same prior or another one, and saves the
model: one autoencoder, several priors, each then scored by evaluate_model.py. The autoencoder, caption decoder and
text encoder are copied unchanged; only the prior is built afresh from the config (with `--config_overrides`) and fitted.

    python bench/refit_prior.py --model runs/real128/model --dataset_path data/engravings_128 \
        --output_dir runs/real128_conv_prior --config_overrides prior_architecture=conv prior_conv_channels=128
    python evaluate_model.py --model runs/real128_conv_prior --dataset_path data/engravings_128 --split validation \
        --num_samples 200 --output_dir runs/real128_conv_prior/eval
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configuration_engraving import EngravingConfig
from evaluate_model import load_splits, model_view
from modeling_engraving import EngravingModel, images_to_pixel_values
from train import config_override_value, tokenize_captions


logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", required=True, help="A saved EngravingModel folder.")
    parser.add_argument("--dataset_path", required=True, help="Its prepared dataset: the prior is fitted to the train split.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--config_overrides", nargs="*", default=[], metavar="KEY=VALUE", help="Prior fields of EngravingConfig (values are JSON, or else strings), e.g. prior_architecture=conv.")
    parser.add_argument("--num_steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--encode_batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


@torch.no_grad()
def training_latents(model, dataset_path, batch_size):
    """Posterior means of the training images and text latents of their captions, in eval mode."""
    _, train_split = load_splits(dataset_path, "validation", "train")
    images, captions = model_view(train_split, model.config.image_size)
    input_ids, attention_mask = tokenize_captions(model.tokenizer, captions, model.config.max_caption_length)
    latents, text_latents = [], []
    for start in range(0, len(images), batch_size):
        end = start + batch_size
        latents.append(model.encode_images(images_to_pixel_values(images[start:end], model.config.image_size)))
        text_latents.append(model.encode_text(input_ids[start:end], attention_mask[start:end]))
    return torch.cat(latents), torch.cat(text_latents)


def main(args):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    trained = EngravingModel.from_pretrained(args.model).eval()
    overrides = dict(item.split("=", 1) for item in args.config_overrides)
    fields = {**trained.config.to_dict(), **{key: config_override_value(value) for key, value in overrides.items()}}
    torch.manual_seed(args.seed)
    model = EngravingModel(EngravingConfig.from_dict(fields)).eval()
    kept = {name: tensor for name, tensor in trained.state_dict().items() if not name.startswith("prior.")}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert all(name.startswith("prior.") for name in missing) and not unexpected, (missing, unexpected)
    model.tokenizer = trained.tokenizer

    latents, text_latents = training_latents(model, args.dataset_path, args.encode_batch_size)
    started = time.perf_counter()
    loss = model.fit_prior(latents, text_latents, args.num_steps, args.batch_size, args.learning_rate, args.seed)
    model.eval()
    logger.info(
        f"Fitted a {model.config.prior_architecture} prior ({sum(p.numel() for p in model.prior.parameters()) / 1e6:.2f}M "
        f"parameters) to {len(latents)} training latents in {time.perf_counter() - started:.0f} s: final loss {loss:.4f}."
    )
    model.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main(parse_args())
