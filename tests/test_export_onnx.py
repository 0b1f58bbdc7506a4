"""export_onnx.py: onnxruntime runs the exported graphs as PyTorch runs the model, at any batch size and length."""

import numpy as np
import pytest
import torch

import export_onnx
from pipeline_engraving import EngravingPipeline, pixel_values_to_images


@pytest.fixture(scope="module")
def exported_pipeline(tiny_model_dir):
    return EngravingPipeline.from_pretrained(tiny_model_dir), tiny_model_dir


@pytest.fixture(scope="module")
def onnx_dir(exported_pipeline, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("onnx")
    export_onnx.main(["--model", str(exported_pipeline[1]), "--output_dir", str(output_dir)])
    return output_dir


def session(path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_each_graph_matches_pytorch_at_a_new_batch_size_and_length(onnx_dir, exported_pipeline):
    model = exported_pipeline[0].model
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(3, model.config.latent_size, generator=generator)
    pixel_values = torch.rand(3, 3, model.config.image_size, model.config.image_size, generator=generator) * 2 - 1
    input_ids = torch.randint(3, model.config.vocab_size, (3, 6), generator=generator)
    cases = {
        "image_encoder.onnx": {"pixel_values": pixel_values},
        "image_decoder.onnx": {"latents": noise},
        "caption_decoder_step.onnx": {"latents": noise, "input_ids": input_ids},
    }
    modules = {name: module for name, (module, *_rest) in export_onnx.onnx_graphs(model).items()}
    for name, inputs in cases.items():
        assert export_onnx.onnx_difference(onnx_dir / name, modules[name], inputs) < 1e-4, name


def test_onnx_graphs_reproduce_a_seeds_engraving_and_greedy_caption(onnx_dir, exported_pipeline):
    pipeline = exported_pipeline[0]
    config = pipeline.model.config
    seed_latents = torch.randn(config.latent_size, generator=torch.Generator().manual_seed(11))[None].numpy()
    (pixel_values,) = session(onnx_dir / "image_decoder.onnx").run(None, {"latents": seed_latents})
    (latents,) = session(onnx_dir / "image_encoder.onnx").run(None, {"pixel_values": pixel_values})
    caption_step = session(onnx_dir / "caption_decoder_step.onnx")
    # The runtime keeps to config.caption_words as the pipeline does, with the same CaptionWordConstraint.
    word_constraint = pipeline.word_constraint
    input_ids, open_word = np.array([[config.bos_token_id]]), ""
    while input_ids.shape[1] < config.max_caption_length and input_ids[0, -1] != config.eos_token_id:
        (logits,) = caption_step.run(None, {"latents": latents, "input_ids": input_ids})
        logits = np.where(word_constraint.allowed_tokens(open_word).numpy(), logits, -np.inf)
        input_ids = np.concatenate([input_ids, logits.argmax(-1)[:, None]], axis=1)
        open_word = word_constraint.next_open_word(open_word, int(input_ids[0, -1]))
    caption = word_constraint.drop_half_spelt_word(
        pipeline.tokenizer.decode(input_ids[0], skip_special_tokens=True).strip()
    )

    expected = pipeline(seeds=[11], temperature=0.0)
    image = pixel_values_to_images(torch.from_numpy(pixel_values))[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(expected.images[0], dtype=np.int16)).max() <= 1
    assert caption == expected.captions[0]


def test_the_tokenizer_and_config_are_saved_beside_the_graphs(onnx_dir):
    assert (onnx_dir / "tokenizer.json").exists() and (onnx_dir / "config.json").exists()
