"""The networks of EngravingModel: presets, losses, forward, the generator and the discriminators."""

import pytest
import torch
import torch.nn.functional as F
from conftest import shape_pairs

from configuration_engraving import EngravingConfig
from modeling_engraving import EngravingDiscriminator, EngravingModel, diff_augment
from pipeline_engraving import EngravingPipeline, images_to_pixel_values


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
    # Only the demo preset draws seeds from captions; the property follows the loss weight, and is not saved.
    assert [EngravingConfig.from_preset(name).draws_from_captions for name in ("base", "small", "demo")] == [
        False,
        False,
        True,
    ]
    assert "draws_from_captions" not in EngravingConfig.from_preset("demo").to_dict()


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
    trained_heads = [*discriminator.heads.parameters(), *discriminator.pixel_head.parameters()]
    assert all(parameter.grad is not None for parameter in trained_heads)
    discriminator.generator_loss(fake).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_projected_discriminator_weights_its_pixel_head_in_the_generator_loss(tiny_config):
    from modeling_engraving import EngravingProjectedDiscriminator

    torch.manual_seed(0)
    discriminator = EngravingProjectedDiscriminator(tiny_config).eval()
    fake = images_to_pixel_values([image for image, _ in shape_pairs()], 32)

    def generator_loss(pixel_head_weight):
        discriminator.pixel_head_weight = pixel_head_weight
        torch.manual_seed(1)  # the same DiffAugment draw for each weight
        return discriminator.generator_loss(fake)

    torch.manual_seed(1)
    pixel_logits, *feature_logits = discriminator(diff_augment(fake, tiny_config.diff_augment_policy))
    features_only = -sum(logits.mean() for logits in feature_logits)
    assert torch.allclose(generator_loss(0.0), features_only)
    assert torch.allclose(generator_loss(0.25), features_only - 0.25 * pixel_logits.mean())


def test_tiny_model_learns_to_caption_eight_pairs_and_to_invert_its_generator(tiny_config, tiny_tokenizer):
    torch.manual_seed(0)
    model = EngravingModel(tiny_config)
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
    assert EngravingPipeline(model, tiny_tokenizer).caption(list(images)) == list(captions)


def test_cached_caption_logits_match_running_the_whole_caption(tiny_model):
    latents = torch.randn(3, tiny_model.config.latent_size)
    ids = torch.randint(4, tiny_model.config.vocab_size, (3, 9))
    full = tiny_model.caption_logits(latents, ids)
    cache = tiny_model.new_caption_cache()
    steps = [tiny_model.caption_logits(latents, ids[:, :1], cache)]
    steps += [tiny_model.caption_logits(latents, ids[:, i : i + 1], cache) for i in range(1, ids.shape[1])]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_a_captions_posterior_is_mean_plus_spread_noise_and_its_kl_vanishes_only_at_the_seeds_prior(
    tiny_model, tiny_tokenizer
):
    batch = tiny_tokenizer([caption for _, caption in shape_pairs()], padding=True, return_tensors="pt")
    noise = torch.randn(8, tiny_model.config.latent_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents, kl = tiny_model.sample_caption_latents(batch["input_ids"], batch["attention_mask"], noise=noise)
        mean, log_variance = tiny_model.text_encoder(
            tiny_model.token_embedding(batch["input_ids"]), batch["attention_mask"], return_log_variance=True
        )
        at_mean, _ = tiny_model.sample_caption_latents(batch["input_ids"], batch["attention_mask"], noise=0 * noise)
    assert torch.allclose(latents, mean + noise * (0.5 * log_variance).exp(), atol=1e-6)
    assert torch.allclose(at_mean, mean, atol=1e-6)
    assert kl > 0
    # A text encoder that says nothing about its captions gives the seeds' N(0, I): the latents are the noise itself.
    silent = EngravingModel(tiny_model.config).eval()
    for head in (silent.text_encoder.projection, silent.text_encoder.to_log_variance):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    with torch.no_grad():
        latents, kl = silent.sample_caption_latents(batch["input_ids"], batch["attention_mask"], noise=noise)
    assert torch.equal(latents, noise) and kl == 0
