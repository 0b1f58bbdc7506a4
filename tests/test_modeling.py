"""The Hugging Face contract and the generative behaviour of EngravingModel."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shape_pairs, tiny_training_captions

from configuration_engraving import EngravingConfig
from modeling_engraving import (
    WORD_PATTERN,
    CaptionWordConstraint,
    EngravingDiscriminator,
    EngravingModel,
    caption_words,
    diff_augment,
    images_to_pixel_values,
)


def image_digests(images):
    return [hashlib.sha256(image.tobytes()).hexdigest() for image in images]


def with_fields(config, **fields):
    """A copy of `config` with `fields` changed."""
    return EngravingConfig.from_dict({**config.to_dict(), **fields})


def test_presets_have_the_documented_sizes():
    base = EngravingModel(EngravingConfig.from_preset("base"))
    assert 40e6 <= base.num_parameters() <= 60e6
    assert base.config.image_size == 512 and base.config.latent_size == 1024
    assert (base.config.text_num_layers, base.config.text_num_heads, base.config.text_hidden_size) == (3, 8, 512)
    assert (base.config.caption_loss_weight, base.config.contrastive_loss_weight) == (2.0, 0.5)
    assert EngravingConfig.from_preset("small").image_size == 128
    assert EngravingConfig.from_preset("demo").image_size == 64
    assert EngravingConfig.from_preset("tiny").image_size == 32


def test_preset_fields_can_be_overridden_like_any_config():
    config = EngravingConfig.from_preset("small", image_size=64)
    assert config.image_size == 64 and config.latent_size == EngravingConfig.from_preset("small").latent_size
    model = EngravingModel(config).eval()
    assert model.decode_latents(torch.zeros(1, config.latent_size)).shape == (1, 3, 64, 64)
    assert model.encode_images(torch.zeros(1, 3, 64, 64)).shape == (1, config.latent_size)
    assert EngravingDiscriminator(config)(torch.zeros(2, 3, 64, 64))[0].shape == (2, 1, 5, 5)
    with pytest.raises(ValueError, match="Unknown preset"):
        EngravingConfig.from_preset("huge")


def test_image_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        EngravingConfig(image_size=96)


def test_drawings_are_grey_ink_on_paper_tinted_along_one_colour(tiny_config):
    model = EngravingModel(tiny_config).eval()
    latents = torch.randn(4, tiny_config.latent_size)
    with torch.no_grad():
        grey = model.decode_latents(latents)
        assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
        tint = torch.tensor([0.05, -0.05, -0.3])
        model.generator.paper_tint.copy_(tint)
        tinted = model.decode_latents(latents)
    # Every pixel's colour is its grey plus a non-negative share of the one tint: its chroma points along the tint's.
    chroma = (tinted - tinted.mean(dim=1, keepdim=True)).permute(0, 2, 3, 1).reshape(-1, 3)
    coloured = chroma.norm(dim=-1) > 1e-4
    assert coloured.float().mean() > 0.5
    direction = F.normalize(tint - tint.mean(), dim=0)
    assert (F.normalize(chroma[coloured], dim=-1) @ direction).min() > 0.999


def test_every_loss_is_finite_and_the_total_is_their_weighted_sum(tiny_model, tiny_tokenizer):
    images, captions = zip(*shape_pairs())
    batch = tiny_tokenizer(list(captions), padding=True, return_tensors="pt")
    latents = torch.randn(4, tiny_model.config.latent_size)
    with torch.no_grad():
        generated = tiny_model.decode_latents(latents)
        outputs = tiny_model(
            images_to_pixel_values(images, 32), batch["input_ids"], batch["attention_mask"], generated, latents
        )
    config = tiny_model.config
    components = {
        "loss_reconstruction": config.reconstruction_loss_weight,
        "loss_latent": config.latent_loss_weight,
        "loss_caption": config.caption_loss_weight,
        "loss_contrastive": config.contrastive_loss_weight,
        "loss_text_latent": config.text_latent_loss_weight,
    }
    for name in ["loss", *components]:
        assert torch.isfinite(outputs[name]), name
    assert torch.allclose(outputs.loss, sum(weight * outputs[name] for name, weight in components.items()))
    assert outputs.latents.shape == outputs.text_latents.shape == (8, config.latent_size)
    # A weight of 0 skips its loss, and the generator's pass it needs.
    unweighted = EngravingModel(with_fields(config, reconstruction_loss_weight=0.0)).eval()
    with torch.no_grad():
        outputs = unweighted(images_to_pixel_values(images, 32), batch["input_ids"], batch["attention_mask"])
    assert outputs.loss_reconstruction is None and torch.isfinite(outputs.loss)


def test_forward_gives_losses_only_when_asked_and_changes_nothing(tiny_model, tiny_tokenizer):
    images, captions = zip(*shape_pairs())
    batch = tiny_tokenizer(list(captions), padding=True, return_tensors="pt")
    before = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    with torch.no_grad():
        outputs = tiny_model(
            images_to_pixel_values(images, 32), batch["input_ids"], batch["attention_mask"], return_loss=False
        )
    assert outputs.loss is None and outputs.loss_caption is None
    assert outputs.caption_logits.shape[:2] == (8, batch["input_ids"].shape[1] - 1)
    assert all(torch.equal(tensor, before[name]) for name, tensor in tiny_model.state_dict().items())


def test_an_images_latent_does_not_depend_on_the_rest_of_its_batch(tiny_model):
    pixel_values = images_to_pixel_values([image for image, _ in shape_pairs()], 32)
    with torch.no_grad():
        batched = tiny_model.encode_images(pixel_values)
        alone = torch.cat([tiny_model.encode_images(image[None]) for image in pixel_values])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_diff_augment_moves_tones_translates_and_cuts_out_differentiably():
    torch.manual_seed(0)
    pixel_values = torch.full((64, 3, 32, 32), 0.8, requires_grad=True)
    augmented = diff_augment(pixel_values)
    assert augmented.shape == pixel_values.shape
    cut_out = (augmented == 0).flatten(1).float().mean(1)
    assert (cut_out > 0.1).float().mean() > 0.9  # a cutout of half the side removes about a quarter of each image
    assert augmented.flatten(1).std(1).gt(0).all() and augmented.mean(dim=(1, 2, 3)).std() > 0.1
    augmented.sum().backward()
    assert pixel_values.grad is not None and pixel_values.grad.abs().sum() > 0


def test_discriminator_losses_are_finite_and_reach_every_weight(tiny_config):
    torch.manual_seed(0)
    discriminator = EngravingDiscriminator(tiny_config)
    real = images_to_pixel_values([image for image, _ in shape_pairs()], 32)
    adversarial, reconstruction = discriminator.discriminator_loss(real, torch.rand_like(real) * 2 - 1)
    assert torch.isfinite(adversarial) and torch.isfinite(reconstruction) and reconstruction > 0
    (adversarial + reconstruction).backward()
    assert all(parameter.grad is not None for parameter in discriminator.parameters())
    assert torch.isfinite(discriminator.generator_loss(real))


def test_projected_discriminator_trains_its_heads_on_frozen_lite1_features(tiny_config):
    from modeling_engraving import EngravingProjectedDiscriminator

    torch.manual_seed(0)
    discriminator = EngravingProjectedDiscriminator(tiny_config).train()
    assert not discriminator.features.training  # frozen BatchNorm statistics
    real = images_to_pixel_values([image for image, _ in shape_pairs()], 32)
    fake = (torch.rand_like(real) * 2 - 1).requires_grad_()
    loss, reconstruction = discriminator.discriminator_loss(real, fake.detach())
    assert torch.isfinite(loss) and reconstruction == 0
    loss.backward()
    assert all(parameter.grad is None for parameter in discriminator.features.parameters())
    assert all(parameter.grad is not None for parameter in discriminator.heads.parameters())
    discriminator.generator_loss(fake).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_same_seed_gives_same_engraving_and_caption(tiny_model):
    first = tiny_model.generate(seeds=[7, 3])
    second = tiny_model.generate(seeds=[7, 3])
    assert image_digests(first.images) == image_digests(second.images)
    assert first.captions == second.captions
    assert torch.equal(first.latents, second.latents)


def test_different_seeds_give_different_engravings(tiny_model):
    outputs = tiny_model.generate(seeds=[0, 1, 2, 3])
    assert len(set(image_digests(outputs.images))) == 4


def test_a_batch_of_seeds_equals_the_same_seeds_one_by_one(tiny_model):
    seeds = [3, 11, 42, 1000]
    batched = tiny_model.generate(seeds=seeds, temperature=1.0)
    single = [tiny_model.generate(seeds=[seed], temperature=1.0) for seed in seeds]
    assert batched.captions == [output.captions[0] for output in single]
    assert torch.equal(batched.latents, torch.cat([output.latents for output in single]))
    for image, output in zip(batched.images, single):
        difference = (
            torch.tensor(np.asarray(image), dtype=torch.int16) - torch.tensor(np.asarray(output.images[0]))
        ).abs()
        # Batched convolutions may round a few pixels to the neighbouring grey level.
        assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01


def test_a_seeds_latent_is_its_normal_draw_and_its_caption_is_that_of_its_drawing(tiny_model):
    output = tiny_model.generate(seeds=[5], temperature=0.0)
    assert torch.equal(
        output.latents[0], torch.randn(tiny_model.config.latent_size, generator=torch.Generator().manual_seed(5))
    )
    with torch.no_grad():
        drawing = tiny_model.decode_latents(output.latents)
    assert output.captions == tiny_model.caption_latents(tiny_model.encode_images(drawing))


def test_public_methods_speak_in_images_and_strings(tiny_model):
    generated = tiny_model.generate(num_samples=2)
    assert len(generated.images) == len(generated.captions) == len(generated.seeds) == 2
    assert all(isinstance(caption, str) for caption in generated.captions)
    assert len(tiny_model.caption(generated.images[0])) == 1
    imagined = tiny_model.imagine(["An engraving depicting a circle on the left", "a ship"])
    assert [image.size for image in imagined.images] == [(32, 32)] * 2
    walk = tiny_model.interpolate(0, 1, steps=5)
    assert len(walk.images) == len(walk.captions) == 5
    endpoints = tiny_model.generate(seeds=[0, 1]).latents
    assert torch.allclose(walk.latents[[0, -1]], endpoints, atol=1e-4)
    with pytest.raises(ValueError, match="tokenizer"):
        EngravingModel(tiny_model.config).generate(seeds=[0])


def test_imagine_varies_with_the_seed_only_as_far_as_asked(tiny_model):
    caption = "An engraving depicting a circle on the left"
    fixed = [tiny_model.imagine(caption, seed=seed, variation=0.0) for seed in (0, 1)]
    assert torch.equal(fixed[0].latents, fixed[1].latents)
    varied = [tiny_model.imagine(caption, seed=seed, variation=0.5) for seed in (0, 1)]
    assert not torch.equal(varied[0].latents, varied[1].latents)
    assert torch.allclose(varied[0].latents - fixed[0].latents, 0.5 * tiny_model.seed_latents([0]), atol=1e-5)


def test_tiny_model_learns_to_caption_eight_pairs_and_to_invert_its_generator(tiny_config, tiny_tokenizer):
    torch.manual_seed(0)
    model = EngravingModel(tiny_config)
    model.tokenizer = tiny_tokenizer
    model.generator.requires_grad_(False)  # a fixed generator (BatchNorm on batch statistics): the encoder inverts it
    images, captions = zip(*shape_pairs())
    pixel_values = images_to_pixel_values(images, tiny_config.image_size)
    batch = tiny_tokenizer(list(captions), padding=True, return_tensors="pt")
    trained = [parameter for name, parameter in model.named_parameters() if not name.startswith("generator.")]
    optimizer = torch.optim.AdamW(trained, lr=3e-3)
    history = []
    for _ in range(200):
        latents = torch.randn(16, tiny_config.latent_size)
        with torch.no_grad():
            generated = model.decode_latents(latents)
        outputs = model(pixel_values, batch["input_ids"], batch["attention_mask"], generated, latents)
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
        history.append((outputs.loss_latent.item(), outputs.loss_caption.item()))
    model.eval()
    (first_latent, first_caption), (last_latent, last_caption) = history[0], history[-1]
    assert last_latent < 0.75 * first_latent
    assert last_caption < first_caption / 20
    assert model.caption(list(images)) == list(captions)


def test_cached_caption_decoding_matches_running_the_whole_caption(tiny_model):
    latents = tiny_model.seed_latents([0, 1, 2])
    ids = tiny_model.generate_caption_ids(latents, temperature=1.0, generators=[torch.Generator().manual_seed(0)] * 3)
    full = tiny_model.caption_decoder(latents, tiny_model.token_embedding(ids))
    cache = [{} for _ in tiny_model.caption_decoder.layers]
    steps = [tiny_model.caption_decoder(latents, tiny_model.token_embedding(ids[:, :1]), cache)]
    steps += [
        tiny_model.caption_decoder(latents, tiny_model.token_embedding(ids[:, i : i + 1]), cache)
        for i in range(1, ids.shape[1])
    ]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


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


def test_sampled_captions_use_only_the_configured_words(tiny_config, tiny_tokenizer):
    """Untrained, the decoder samples token soup: free, it spells unknown words; constrained, it cannot."""
    torch.manual_seed(0)
    model = EngravingModel(with_fields(tiny_config, caption_words=None)).eval()
    model.tokenizer = tiny_tokenizer
    known = set(caption_words(tiny_training_captions()))
    free = model.generate(seeds=range(8), temperature=1.0, top_p=1.0).captions
    assert any(set(WORD_PATTERN.findall(caption)) - known for caption in free)
    model.config.caption_words = sorted(known)
    constrained = model.generate(seeds=range(8), temperature=1.0, top_p=1.0).captions
    assert all(set(WORD_PATTERN.findall(caption)) <= known for caption in constrained)
    assert len(set(constrained)) > 1


def load_in_a_fresh_process(model_dir, tmp_path):
    """What a user gets from `AutoModel.from_pretrained(model_dir, trust_remote_code=True)` in a new interpreter."""
    script = textwrap.dedent(
        f"""
        import hashlib, json
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        outputs = model.generate(seeds=[0, 1], tokenizer=tokenizer)
        print(json.dumps({{
            "class": type(model).__name__,
            "digests": [hashlib.sha256(image.tobytes()).hexdigest() for image in outputs.images],
            "captions": outputs.captions,
            "ids": tokenizer("An engraving depicting a circle on the left")["input_ids"],
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


def test_save_and_load_in_a_fresh_process_gives_identical_outputs(tiny_model, tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_engraving.EngravingModel"
    assert (tiny_model_dir / "model.safetensors").exists()
    assert (tiny_model_dir / "modeling_engraving.py").exists() and (
        tiny_model_dir / "configuration_engraving.py"
    ).exists()

    expected = tiny_model.generate(seeds=[0, 1])
    loaded = load_in_a_fresh_process(tiny_model_dir, tmp_path)
    assert loaded["class"] == "EngravingModel"
    assert loaded["digests"] == image_digests(expected.images)
    assert loaded["captions"] == expected.captions
    assert loaded["ids"] == tiny_model.tokenizer("An engraving depicting a circle on the left")["input_ids"]


def test_loaded_model_carries_its_tokenizer(tiny_model_dir):
    model = EngravingModel.from_pretrained(tiny_model_dir)
    assert model.tokenizer is not None
    assert len(model.generate(seeds=[0]).captions) == 1
