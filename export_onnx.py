"""
Exports a trained Engraving model to ONNX, for runtimes without PyTorch (onnxruntime on a server, in a browser):

- `image_decoder.onnx`: latents `(batch, latent_size)` -> pixels `(batch, 3, image_size, image_size)` in about [-1, 1]:
  the (EMA) generator, as `decode_latents` draws them. A seed's latent is its N(0, I) draw (`torch.randn(latent_size,
  generator=torch.Generator().manual_seed(seed))`), which a runtime without PyTorch can ship as a table or redraw.
- `image_encoder.onnx`: pixels -> latents, as `encode_images`: a seed's caption is written from the encoder's latent of
  its drawn image, and an uploaded picture's from its own.
- `caption_decoder_step.onnx`: latents and the caption so far, `(batch, length)` token ids starting with `<bos>`,
  -> logits `(batch, vocab_size)` of the next token. A runtime calls it once per token (greedy or top-p), until
  `<eos>`; there is no KV cache, so each step reads the whole caption so far. Where `config.caption_words` is set,
  the pipeline masks each step's logits to the tokens that keep the caption to those words (`CaptionWordConstraint`
  in pipeline_engraving.py, plain Python over the tokenizer); a runtime that wants the same captions does the same.

The tokenizer and config are saved beside them, so the folder holds everything a runtime needs. A model trained with
caption drawing (the `demo` preset) samples a seed's caption first and draws from the text encoder's posterior, which
is not exported: its seeds need the pipeline.

    python export_onnx.py --model outputs/demo/model --output_dir outputs/demo/onnx
"""

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline_engraving import EngravingPipeline


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Export an Engraving model's image decoder, image encoder and caption step."
    )
    parser.add_argument("--model", required=True, help="A folder written by train.py, or a Hub model id.")
    parser.add_argument("--output_dir", default="onnx", help="Where to write the .onnx files, tokenizer and config.")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version.")
    return parser.parse_args(argv)


class ModelMethod(nn.Module):
    """
    One of the model's tensor-to-tensor methods as a module, for the exporter to trace: `decode_latents` (latents ->
    pixels) or `encode_images` (pixels -> latents).
    """

    def __init__(self, model, method_name):
        super().__init__()
        self.model = model
        self.method_name = method_name

    def forward(self, inputs):
        return getattr(self.model, self.method_name)(inputs)


class CaptionDecoderStep(nn.Module):
    """Latents `(batch, latent_size)` and token ids `(batch, length)` -> next-token logits `(batch, vocab_size)`."""

    def __init__(self, model):
        super().__init__()
        self.token_embedding = model.token_embedding
        self.caption_decoder = model.caption_decoder

    def forward(self, latents, input_ids):
        return self.caption_decoder(latents, self.token_embedding(input_ids))[:, -1]


def onnx_graphs(model):
    """Each graph's file name, module, example inputs and dynamic axes, from a loaded model."""
    config = model.config
    latents = torch.randn(2, config.latent_size, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[config.bos_token_id, 5, 6], [config.bos_token_id, 7, 8]])
    pixel_values = torch.rand(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    batch = {0: "batch"}
    return {
        "image_encoder.onnx": (
            ModelMethod(model, "encode_images"),
            {"pixel_values": pixel_values * 2 - 1},
            {"pixel_values": batch, "latents": batch},
            ["latents"],
        ),
        "image_decoder.onnx": (
            ModelMethod(model, "decode_latents"),
            {"latents": latents},
            {"latents": batch, "pixel_values": batch},
            ["pixel_values"],
        ),
        "caption_decoder_step.onnx": (
            CaptionDecoderStep(model),
            {"latents": latents, "input_ids": input_ids},
            {"latents": batch, "input_ids": {0: "batch", 1: "length"}, "logits": batch},
            ["logits"],
        ),
    }


def onnx_difference(path, module, inputs):
    """Largest absolute difference between onnxruntime's output for `inputs` and the PyTorch module's."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_output,) = session.run(None, {name: value.numpy() for name, value in inputs.items()})
    with torch.inference_mode():
        torch_output = module(*inputs.values()).numpy()
    return float(np.abs(onnx_output - torch_output).max())


def main(argv=None):
    args = parse_args(argv)
    try:
        pipeline = EngravingPipeline.from_pretrained(args.model)
        model = pipeline.model
    except ValueError as error:
        sys.exit(f"error: {error}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, (module, inputs, dynamic_axes, output_names) in onnx_graphs(model).items():
        # The TorchScript exporter: the dynamo one needs onnxscript, which this project does not install. Its
        # tracer warns about shape-dependent Python code (the attention's q/k/v unpacking, over a fixed 3): the
        # comparison with PyTorch below, and the tests at other batch sizes and lengths, check the traces instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module.eval(),
                tuple(inputs.values()),
                str(output_dir / name),
                input_names=list(inputs),
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=args.opset,
                dynamo=False,
            )
        print(f"{name}: largest difference from PyTorch {onnx_difference(output_dir / name, module, inputs):.2e}")
    pipeline.tokenizer.save_pretrained(output_dir)
    model.config.save_pretrained(output_dir)
    print(f"Exported to {output_dir}.")
    if model.config.draws_from_captions:
        print(
            "This model draws seeds from captions (caption drawing): the pipeline samples a seed's caption first and "
            "draws from the text encoder's posterior, which is not exported. These graphs caption pictures and draw "
            "latents; they do not draw seeds as the pipeline does."
        )


if __name__ == "__main__":
    main()
