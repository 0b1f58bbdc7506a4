"""
Refits the latent prior (or, with `--part detail_bank`, the detail bank) of a trained model on its training split, with
the same settings or others, and saves the model: one autoencoder, several priors or banks, each then scored by
evaluate_model.py. Everything else is copied unchanged; only the part is built afresh from the config (with
`--config_overrides`) and fitted. A model saved before the detail bank existed gets one this way.

    python bench/refit_prior.py --model runs/real128/model --dataset_path data/engravings_128 \
        --output_dir runs/real128_conv_prior --config_overrides prior_architecture=conv prior_conv_channels=128
    python evaluate_model.py --model runs/real128_conv_prior --dataset_path data/engravings_128 --split validation \
        --num_samples 200 --output_dir runs/real128_conv_prior/eval
    python bench/refit_prior.py --part detail_bank --model runs/real128/model --dataset_path data/engravings_128 \
        --output_dir runs/real128_bank16k --config_overrides detail_bank_size=16384 detail_patch_size=8
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configuration_engraving import EngravingConfig
from modeling_engraving import EngravingModel
from train import (
    PixelCache,
    decode_to_cache,
    fit_detail_bank,
    fit_latent_prior,
    load_dataset_dict,
    parse_config_overrides,
    tokenize_captions,
)


logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", required=True, help="A saved EngravingModel folder.")
    parser.add_argument("--dataset_path", required=True, help="Its prepared dataset: the prior is fitted to the train split.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--part", choices=["prior", "detail_bank"], default="prior", help="What to build afresh and fit.")
    parser.add_argument("--config_overrides", nargs="*", default=[], metavar="KEY=VALUE", help="Fields of the part in EngravingConfig (values are JSON, or else strings), e.g. prior_architecture=conv.")
    # The names and defaults of train.py's flags, which fit_latent_prior reads.
    parser.add_argument("--prior_fit_steps", type=int, default=1000)
    parser.add_argument("--prior_fit_batch_size", type=int, default=256)
    parser.add_argument("--prior_fit_learning_rate", type=float, default=1e-3)
    parser.add_argument("--eval_batch_size", type=int, default=64, help="Batch size of encoding the training set.")
    parser.add_argument("--cache_dir", default=os.path.join("~", ".cache", "engraving"), help="train.py's decoded image cache.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(args):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    trained = EngravingModel.from_pretrained(args.model).eval()
    fields = {**trained.config.to_dict(), **parse_config_overrides(args.config_overrides)}
    torch.manual_seed(args.seed)
    model = EngravingModel(EngravingConfig.from_dict(fields)).eval()
    prefix = f"{args.part}."
    kept = {name: tensor for name, tensor in trained.state_dict().items() if not name.startswith(prefix)}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert all(name.startswith(prefix) for name in missing) and not unexpected, (missing, unexpected)
    model.tokenizer = trained.tokenizer

    # The training split as train.py sees it: the same pixel cache and caption tokens, and the same fit.
    train_split = load_dataset_dict(args.dataset_path)["train"]
    cache = PixelCache(decode_to_cache(train_split, model.config.image_size, args.cache_dir), model.device)
    started = time.perf_counter()
    if args.part == "detail_bank":
        seen = fit_detail_bank(model, cache, args.eval_batch_size, args.seed)
        logger.info(
            f"Filled a detail bank of {model.config.detail_bank_size} patches of {model.config.detail_patch_size} px "
            f"from {seen} patches of {len(cache)} training images in {time.perf_counter() - started:.0f} s."
        )
    else:
        input_ids, attention_mask = tokenize_captions(
            model.tokenizer, train_split["caption"], model.config.max_caption_length
        )
        loss = fit_latent_prior(model, cache, input_ids, attention_mask, args)
        logger.info(
            f"Fitted a {model.config.prior_architecture} prior ({sum(p.numel() for p in model.prior.parameters()) / 1e6:.2f}M "
            f"parameters) to {len(cache)} training latents in {time.perf_counter() - started:.0f} s: final loss {loss:.4f}."
        )
    model.eval()
    model.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main(parse_args())
