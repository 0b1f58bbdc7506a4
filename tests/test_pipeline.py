"""EngravingPipeline: seeds, captions and pictures in, engravings and captions out; and the Hub round trip."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_training_captions
from transformers import LogitsProcessor, LogitsProcessorList

from configuration_engraving import EngravingConfig
from modeling_engraving import EngravingModel
from pipeline_engraving import (
    WORD_PATTERN,
    CaptionWordConstraint,
    EngravingPipeline,
    caption_words,
    pixel_values_to_images,
)


def image_digests(images):
    return [hashlib.sha256(image.tobytes()).hexdigest() for image in images]


def test_same_seed_gives_same_engraving_and_caption(seed_pipeline):
    first = seed_pipeline(seeds=[7, 3])
    second = seed_pipeline(seeds=[7, 3])
    assert image_digests(first.images) == image_digests(second.images)
    assert first.captions == second.captions
    assert torch.equal(first.latents, second.latents)


def test_different_seeds_give_different_engravings(seed_pipeline):
    outputs = seed_pipeline(seeds=[0, 1, 2, 3])
    assert len(set(image_digests(outputs.images))) == 4


def test_a_batch_of_seeds_equals_the_same_seeds_one_by_one(seed_pipeline):
    seeds = [3, 11, 42, 1000]
    batched = seed_pipeline(seeds=seeds, temperature=1.0)
    single = [seed_pipeline(seeds=[seed], temperature=1.0) for seed in seeds]
    assert batched.captions == [output.captions[0] for output in single]
    # A caption's posterior comes from the text encoder on a padded batch, which may round the last bit.
    assert torch.allclose(batched.latents, torch.cat([output.latents for output in single]), atol=1e-6)
    for image, output in zip(batched.images, single):
        difference = (
            torch.tensor(np.asarray(image), dtype=torch.int16) - torch.tensor(np.asarray(output.images[0]))
        ).abs()
        # Batched convolutions may round a few pixels to the neighbouring grey level.
        assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01


def test_a_seeds_latent_is_its_normal_draw_and_its_caption_is_that_of_its_drawing(tiny_pipeline):
    output = tiny_pipeline(seeds=[5], temperature=0.0)
    assert torch.equal(
        output.latents[0],
        torch.randn(tiny_pipeline.model.config.latent_size, generator=torch.Generator().manual_seed(5)),
    )
    with torch.no_grad():
        drawing = tiny_pipeline.model.decode_latents(output.latents)
    assert output.captions == tiny_pipeline.caption_latents(tiny_pipeline.model.encode_images(drawing))


def test_a_caption_drawing_model_samples_a_seeds_caption_first_and_draws_from_its_posterior(
    tiny_drawing_pipeline,
):
    pipeline, model = tiny_drawing_pipeline, tiny_drawing_pipeline.model
    output = pipeline(seeds=[5, 6], temperature=1.0)
    generators = [torch.Generator().manual_seed(seed) for seed in (5, 6)]
    noise = torch.stack([torch.randn(model.config.latent_size, generator=g) for g in generators])
    # The caption continues each seed's generator after its noise, from the captions' prior: the zero latent.
    caption_ids = pipeline.generate_caption_ids(torch.zeros_like(noise), 1.0, 0.95, generators)
    assert output.captions == pipeline.decode_caption_ids(caption_ids)
    with torch.no_grad():
        expected, _ = model.sample_caption_latents(
            caption_ids, (caption_ids != model.config.pad_token_id).long(), noise
        )
        drawing = model.decode_latents(expected)
    assert torch.allclose(output.latents, expected, atol=1e-6)
    assert image_digests(output.images) == image_digests(pixel_values_to_images(drawing))
    # `imagine` draws within the caption's posterior too: its mean, moved by the seed's noise times its spread.
    caption = "An engraving depicting a circle on the left"
    batch = pipeline.tokenize([caption])
    with torch.no_grad():
        mean, log_variance = model.text_encoder(
            model.token_embedding(batch["input_ids"]), batch["attention_mask"], return_log_variance=True
        )
    imagined = pipeline.imagine(caption, seed=0, variation=0.5)
    spread = 0.5 * pipeline.seed_latents([0]) * (0.5 * log_variance).exp()
    assert torch.allclose(imagined.latents, mean + spread, atol=1e-5)


def test_public_methods_speak_in_images_and_strings(seed_pipeline):
    tiny_pipeline = seed_pipeline
    generated = tiny_pipeline(num_samples=2)
    assert len(generated.images) == len(generated.captions) == len(generated.seeds) == 2
    assert all(isinstance(caption, str) for caption in generated.captions)
    assert len(tiny_pipeline.caption(generated.images[0])) == 1
    imagined = tiny_pipeline.imagine(["An engraving depicting a circle on the left", "a ship"])
    assert [image.size for image in imagined.images] == [(32, 32)] * 2
    walk = tiny_pipeline.interpolate(0, 1, steps=5)
    assert len(walk.images) == len(walk.captions) == 5
    endpoints = tiny_pipeline(seeds=[0, 1]).latents
    assert torch.allclose(walk.latents[[0, -1]], endpoints, atol=1e-4)
    engraved = tiny_pipeline.engrave(imagined.images)
    assert len(engraved.images) == len(engraved.captions) == 2 and engraved.images[0].size == (32, 32)


def test_imagine_varies_with_the_seed_only_as_far_as_asked(tiny_pipeline):
    caption = "An engraving depicting a circle on the left"
    fixed = [tiny_pipeline.imagine(caption, seed=seed, variation=0.0) for seed in (0, 1)]
    assert torch.equal(fixed[0].latents, fixed[1].latents)
    varied = [tiny_pipeline.imagine(caption, seed=seed, variation=0.5) for seed in (0, 1)]
    assert not torch.equal(varied[0].latents, varied[1].latents)
    assert torch.allclose(varied[0].latents - fixed[0].latents, 0.5 * tiny_pipeline.seed_latents([0]), atol=1e-5)


def test_word_constraint_follows_words_across_token_boundaries(tiny_tokenizer):
    words = caption_words(["An engraving depicting a ship beneath the moon"])
    constraint = CaptionWordConstraint(words, tiny_tokenizer, len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    for caption in ["An engraving depicting a ship beneath the moon", "An engraving depicting the ship"]:
        open_word = ""
        for token_id in tiny_tokenizer(caption, add_special_tokens=False)["input_ids"]:
            assert constraint.allowed_tokens(open_word)[token_id]
            open_word = constraint.next_open_word(open_word, token_id)
        assert constraint.allowed_tokens(open_word)[tiny_tokenizer.eos_token_id]
    half_spelt = tiny_tokenizer(" shi", add_special_tokens=False)["input_ids"]
    open_word = constraint.next_open_word("", half_spelt[0])
    for token_id in half_spelt[1:]:
        open_word = constraint.next_open_word(open_word, token_id)
    assert open_word == "shi" and not constraint.allowed_tokens(open_word)[tiny_tokenizer.eos_token_id]
    circle, open_word = tiny_tokenizer(" circle", add_special_tokens=False)["input_ids"], ""
    for token_id in circle[:-1]:
        open_word = constraint.next_open_word(open_word, token_id) or ""
    assert not constraint.allowed_tokens(open_word)[circle[-1]], "'circle' is not a word of that vocabulary"
    assert constraint.drop_half_spelt_word("An engraving depicting a shi") == "An engraving depicting a"
    # The masks, built from the words, allow exactly the tokens that next_open_word lets through.
    for open_word in sorted(constraint.prefixes) + ["x", "shipx"]:
        reference = [
            constraint.next_open_word(open_word, token_id) is not None for token_id in range(len(tiny_tokenizer))
        ]
        mask = constraint.allowed_tokens(open_word).tolist()
        assert mask[: tiny_tokenizer.eos_token_id] + mask[tiny_tokenizer.eos_token_id + 1 :] == (
            reference[: tiny_tokenizer.eos_token_id] + reference[tiny_tokenizer.eos_token_id + 1 :]
        ), open_word
    bounded = CaptionWordConstraint(
        words, tiny_tokenizer, len(tiny_tokenizer), tiny_tokenizer.eos_token_id, max_cached_masks=2
    )
    for open_word in ["", "s", "sh", "ship"]:
        assert torch.equal(bounded.allowed_tokens(open_word), constraint.allowed_tokens(open_word))
    assert list(bounded.masks) == ["sh", "ship"]
    assert constraint.drop_half_spelt_word("An engraving depicting a ship") == "An engraving depicting a ship"


def test_word_constraint_is_a_logits_processor_that_reads_each_rows_open_word_from_its_ids(tiny_tokenizer):
    words = caption_words(["An engraving depicting a ship beneath the moon"])
    constraint = CaptionWordConstraint(words, tiny_tokenizer, len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    assert isinstance(constraint, LogitsProcessor)
    half_spelt = tiny_tokenizer("An engraving depicting a shi", add_special_tokens=False)["input_ids"]
    whole = tiny_tokenizer("An engraving depicting a ship", add_special_tokens=False)["input_ids"]
    for ids, open_word in ((half_spelt, "shi"), (whole, "ship")):
        input_ids = torch.tensor([[tiny_tokenizer.bos_token_id, *ids]])
        scores = LogitsProcessorList([constraint])(input_ids, torch.zeros(1, len(tiny_tokenizer)))
        assert torch.equal(scores[0].isfinite(), constraint.allowed_tokens(open_word)), open_word


def test_sampled_captions_use_only_the_configured_words(tiny_config, tiny_tokenizer):
    """Untrained, the decoder samples token soup: free, it spells unknown words; constrained, it cannot."""
    torch.manual_seed(0)
    model = EngravingModel(EngravingConfig.from_dict({**tiny_config.to_dict(), "caption_words": None})).eval()
    known = set(caption_words(tiny_training_captions()))
    free = EngravingPipeline(model, tiny_tokenizer)(seeds=range(8), temperature=1.0, top_p=1.0).captions
    assert any(set(WORD_PATTERN.findall(caption)) - known for caption in free)
    model.config.caption_words = sorted(known)
    constrained = EngravingPipeline(model, tiny_tokenizer)(seeds=range(8), temperature=1.0, top_p=1.0).captions
    assert all(set(WORD_PATTERN.findall(caption)) <= known for caption in constrained)
    assert len(set(constrained)) > 1


def load_in_a_fresh_process(model_dir, tmp_path):
    """
    What a user gets in a new interpreter from the folder as from a Hub repo: `AutoModel` with `trust_remote_code`,
    and the pipeline class from the folder's own pipeline_engraving.py.
    """
    script = textwrap.dedent(
        f"""
        import hashlib, json
        from transformers import AutoModel
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        model = AutoModel.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        pipeline_class = get_class_from_dynamic_module("pipeline_engraving.EngravingPipeline", {str(model_dir)!r})
        pipe = pipeline_class.from_pretrained({str(model_dir)!r})
        outputs = pipe(seeds=[0, 1])
        print(json.dumps({{
            "class": type(model).__name__,
            "digests": [hashlib.sha256(image.tobytes()).hexdigest() for image in outputs.images],
            "captions": outputs.captions,
            "ids": pipe.tokenizer("An engraving depicting a circle on the left")["input_ids"],
        }}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_save_and_load_in_a_fresh_process_gives_identical_outputs(seed_pipeline, tmp_path):
    tiny_pipeline, tiny_model_dir = seed_pipeline, tmp_path / "model"
    tiny_pipeline.save_pretrained(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_engraving.EngravingModel"
    assert (tiny_model_dir / "model.safetensors").exists()
    for code in ("modeling_engraving.py", "configuration_engraving.py", "pipeline_engraving.py"):
        assert (tiny_model_dir / code).exists(), code

    expected = tiny_pipeline(seeds=[0, 1])
    loaded = load_in_a_fresh_process(tiny_model_dir, tmp_path)
    assert loaded["class"] == "EngravingModel"
    assert loaded["digests"] == image_digests(expected.images)
    assert loaded["captions"] == expected.captions
    assert loaded["ids"] == tiny_pipeline.tokenizer("An engraving depicting a circle on the left")["input_ids"]


def test_a_folder_without_a_tokenizer_is_reported_in_one_sentence(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "weights_only")
    with pytest.raises(ValueError, match="has no tokenizer"):
        EngravingPipeline.from_pretrained(tmp_path / "weights_only")
    with pytest.raises(ValueError, match="Could not load an Engraving model"):
        EngravingPipeline.from_pretrained(tmp_path / "missing")


def test_a_bfloat16_generator_draws_the_same_seed_the_same_way_close_to_float32(tiny_pipeline):
    fast = EngravingPipeline(tiny_pipeline.model, tiny_pipeline.tokenizer, generator_dtype=torch.bfloat16)
    first, second = fast(seeds=[4, 9]), fast(seeds=[4, 9])
    assert image_digests(first.images) == image_digests(second.images) and first.captions == second.captions
    exact = tiny_pipeline(seeds=[4, 9])
    for rounded, image in zip(first.images, exact.images):
        difference = np.abs(np.asarray(rounded, dtype=np.int16) - np.asarray(image, dtype=np.int16))
        assert difference.mean() < 3, "bfloat16 rounds the drawing, it does not change it"
