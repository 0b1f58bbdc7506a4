"""Engraving model configuration."""

import copy

from transformers import PretrainedConfig


ENGRAVING_PRESETS = {
    # The reference design: 512 px, one 1024-d latent, a 3-layer 8-head 512-d caption decoder. Its convolutions
    # run on 4x4 pixel patches, at 128 px and below: full-resolution activations would bound a GPU by memory traffic.
    # Seeds start the prior's flow at temperature 0.8: on real prints that lowered their KID by about a tenth and kept
    # each seed's composition; 0.5 fades some seeds to blank paper (BENCHMARKS.md, "Prior fit and temperature").
    "base": {"prior_temperature": 0.8},
    # Trains on a CPU in minutes at 128 px. Its detail bank (65,536 patches of 8 px) took the CPU recipe's seed samples
    # from KID x1000 410 to 146 (BENCHMARKS.md, "A detail bank").
    "small": {
        "image_size": 128,
        "latent_size": 256,
        "patch_size": 2,
        "encoder_channels": [32, 64, 128, 256, 256],
        "decoder_channels": [64, 128, 192, 256, 256],
        "text_hidden_size": 256,
        "text_num_heads": 4,
        "text_num_layers": 2,
        "text_encoder_num_layers": 1,
        "prior_hidden_size": 512,
        "prior_num_layers": 3,
        "prior_temperature": 0.8,
        "detail_bank_size": 65536,
        "detail_patch_size": 8,
        "discriminator_patch_size": 1,
        "discriminator_channels": [32, 64, 128, 256],
    },
    # `make demo`: the procedural demo scenes at 64 px, trained on 2 CPU cores in a few minutes. No discriminator; a
    # detail bank of 4 px patches gives the scenes' hatching back (0.27x the seed KID without it, BENCHMARKS.md).
    "demo": {
        "image_size": 64,
        "latent_size": 128,
        "patch_size": 2,
        "encoder_channels": [32, 32, 64, 128],
        "decoder_channels": [32, 64, 64, 128],
        "text_hidden_size": 128,
        "text_num_heads": 4,
        "text_num_layers": 2,
        "text_encoder_num_layers": 1,
        "prior_hidden_size": 256,
        "prior_num_layers": 3,
        "adversarial_loss_weight": 0.0,
        "detail_bank_size": 16384,
        "detail_patch_size": 4,
        "discriminator_channels": [16, 32, 64],
    },
    # For tests: one training step well under a second on one CPU core.
    "tiny": {
        "image_size": 32,
        "latent_size": 32,
        "patch_size": 2,
        "encoder_channels": [8, 16, 32],
        "decoder_channels": [8, 16, 32],
        "text_hidden_size": 32,
        "text_num_heads": 2,
        "text_num_layers": 1,
        "text_encoder_num_layers": 1,
        "vocab_size": 512,
        "max_caption_length": 32,
        "num_prefix_tokens": 2,
        "prior_hidden_size": 64,
        "prior_num_layers": 2,
        "prior_num_steps": 16,
        "detail_bank_size": 256,
        "detail_patch_size": 4,
        "discriminator_channels": [8, 16, 32],
    },
}


class EngravingConfig(PretrainedConfig):
    r"""
    Configuration of an [`EngravingModel`]: a KL-regularised image autoencoder with a learned
    flow-matching prior over its latent, a latent-conditioned caption decoder and a text encoder
    that maps captions into the same latent space.

    The defaults are the reference design (the `"base"` preset). Use
    [`EngravingConfig.from_preset`] for the smaller `"small"` and `"tiny"` presets.
    """

    model_type = "engraving"

    def __init__(
        self,
        image_size=512,
        num_channels=3,
        latent_size=1024,
        patch_size=4,
        bottleneck_size=4,
        spatial_latent=False,
        encoder_channels=(64, 128, 256, 256, 256, 256),
        decoder_channels=(64, 128, 256, 256, 256, 256),
        decoder_blocks_per_level=1,
        ink_on_paper=False,
        detail_bank_size=16384,
        detail_patch_size=32,
        norm_num_groups=8,
        text_hidden_size=512,
        text_num_heads=8,
        text_num_layers=3,
        text_encoder_num_layers=2,
        text_mlp_ratio=4,
        vocab_size=8000,
        max_caption_length=48,
        num_prefix_tokens=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        reconstruction_loss_weight=1.0,
        reconstruction_pool_size=1,
        kl_loss_weight=1e-3,
        caption_loss_weight=2.0,
        contrastive_loss_weight=0.5,
        prior_loss_weight=1.0,
        prior_hidden_size=1024,
        prior_num_layers=3,
        prior_num_steps=32,
        prior_temperature=1.0,
        prior_architecture="mlp",
        prior_conv_channels=256,
        prior_condition_dropout=0.2,
        latent_statistics_momentum=0.01,
        adversarial_loss_weight=0.1,
        adversarial_start_step=500,
        adversarial_sample_fraction=0.5,
        discriminator_patch_size=2,
        discriminator_channels=(64, 128, 256, 512),
        diff_augment=True,
        caption_words=None,
        initializer_range=0.02,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.image_size = image_size
        """Side of the square images, in pixels; the decoder upsamples to exactly this size."""
        self.num_channels = num_channels
        """Colour channels of the images (3: RGB, which keeps the paper tone)."""
        self.latent_size = latent_size
        """Dimension of the one shared latent vector per image."""
        self.patch_size = patch_size
        """
        Side of the pixel patches that the encoder folds into channels (pixel unshuffle) and the decoder unfolds
        (pixel shuffle), so the convolutions run at `image_size / patch_size`: wide and short rather than narrow and
        long at full resolution, where memory traffic, not arithmetic, bounds a GPU.
        """
        self.bottleneck_size = bottleneck_size
        """Side of the spatial grid at the bottom of the encoder and the top of the decoder."""
        self.spatial_latent = spatial_latent
        """
        Lay the latent out as a `latent_channels x bottleneck_size x bottleneck_size` grid, reached from the encoder's
        last feature map by a 1x1 convolution and read by the decoder's first 3x3 convolution, instead of one vector
        behind dense layers. It is still one `latent_size` vector to the prior, the caption decoder and the text
        encoder. Each latent cell then says what one region of the print holds, so the decoder learns local line
        work from every region of every image rather than a whole picture from each latent.
        """
        self.encoder_channels = list(encoder_channels)
        """Encoder width per resolution level, from full resolution down; the last is repeated if short."""
        self.decoder_channels = list(decoder_channels)
        """Decoder width per resolution level, from full resolution down; the last is repeated if short."""
        self.decoder_blocks_per_level = decoder_blocks_per_level
        """Residual blocks per decoder level: the decoder's depth, and so its capacity for line work."""
        self.ink_on_paper = ink_on_paper
        """
        Draw every image as one ink layer over paper, as a print is: the decoder paints an ink density in [0, 1] per
        pixel; each image's latent gives the grey of its paper, how far the paper has yellowed (along one tint that
        the whole model learns) and the grey of its ink. Colour is then the paper's, along one direction: neither the
        adversarial loss nor the prior can tint an engraving green or magenta. `False` paints RGB.
        """
        self.detail_bank_size = detail_bank_size
        """
        Patches of real training prints kept to put line work back into decoded images (`EngravingDetailBank`,
        filled by `EngravingModel.fit_detail_bank`); 0 decodes the plain decoder's images.
        """
        self.detail_patch_size = detail_patch_size
        """
        Side, in pixels, of the squares that get their detail from one bank patch: about one line-spacing of hatching
        across a few lines (8 at 128 px). Even, and a divisor of `image_size`.
        """
        self.norm_num_groups = norm_num_groups
        """Groups of the GroupNorm layers in the convolutional blocks."""
        self.text_hidden_size = text_hidden_size
        """Width of the caption decoder and the text encoder."""
        self.text_num_heads = text_num_heads
        """Attention heads per Transformer layer."""
        self.text_num_layers = text_num_layers
        """Transformer layers of the caption decoder."""
        self.text_encoder_num_layers = text_encoder_num_layers
        """Transformer layers of the text encoder."""
        self.text_mlp_ratio = text_mlp_ratio
        """Width of the Transformer MLP as a multiple of `text_hidden_size`."""
        self.vocab_size = vocab_size
        """Size of the BPE vocabulary; set from the tokenizer when training."""
        self.max_caption_length = max_caption_length
        """Longest caption in tokens, `<bos>` and `<eos>` included."""
        self.num_prefix_tokens = num_prefix_tokens
        """Prefix tokens the latent is projected to, to condition the caption decoder."""
        self.reconstruction_loss_weight = reconstruction_loss_weight
        """Weight of the L1 + MSE pixel reconstruction loss."""
        self.reconstruction_pool_size = reconstruction_pool_size
        """
        Side of the pixel squares averaged before the reconstruction loss compares images (1: pixel by pixel). One
        global latent cannot place a print's hatching line for line, so a pixel loss pays the decoder to average it to
        grey; pooled, it constrains the composition and tone, and leaves detail finer than the squares to the
        adversarial loss.
        """
        self.kl_loss_weight = kl_loss_weight
        """Weight of the KL divergence of the posterior from N(0, I), averaged per latent dimension."""
        self.caption_loss_weight = caption_loss_weight
        """Weight of the caption cross-entropy."""
        self.contrastive_loss_weight = contrastive_loss_weight
        """Weight of the symmetric InfoNCE loss aligning image and text latents."""
        self.prior_loss_weight = prior_loss_weight
        """Weight of the flow-matching loss of the latent prior (trained on detached latents)."""
        self.prior_hidden_size = prior_hidden_size
        """
        Width of the prior's residual MLP. Its velocity leaves through a layer this wide, so below `latent_size` it can
        move the noise only within a subspace: keep it at least `latent_size`.
        """
        self.prior_num_layers = prior_num_layers
        """Residual blocks of the prior's MLP."""
        self.prior_num_steps = prior_num_steps
        """Euler steps that integrate the prior's flow from noise to a latent."""
        self.prior_temperature = prior_temperature
        """
        Scale of the seed noise that the prior's flow starts from. Below 1, seeds keep to the denser part of the latent
        distribution (the temperature of Glow, the truncation of BigGAN): samples less varied and closer to the prints.
        """
        self.prior_architecture = prior_architecture
        """
        The prior's trunk: `"mlp"`, residual MLP blocks over the latent vector, or `"conv"` (needs `spatial_latent`),
        residual 3x3 convolutions over the latent grid, so that neighbouring cells are drawn together.
        """
        self.prior_conv_channels = prior_conv_channels
        """Width of the convolutional prior's blocks (`prior_architecture="conv"`)."""
        self.prior_condition_dropout = prior_condition_dropout
        """Share of training examples whose text condition is dropped, so the prior also samples unconditionally."""
        self.latent_statistics_momentum = latent_statistics_momentum
        """Momentum of the running mean and std that standardise latents for the prior."""
        self.adversarial_loss_weight = adversarial_loss_weight
        """
        Weight of the hinge adversarial loss on reconstructions, relative to the reconstruction loss: train.py scales the
        adversarial gradient at the decoder's output layer to this share of the reconstruction gradient there (0 turns
        the discriminator off).
        """
        self.adversarial_start_step = adversarial_start_step
        """Optimizer step at which the adversarial loss starts, once reconstructions have structure."""
        self.adversarial_sample_fraction = adversarial_sample_fraction
        """
        Latents drawn from the Gaussian of the encoder's latents and decoded for the discriminator, per training image,
        beside the reconstructions (as in VAE-GAN): the adversarial loss then shapes the images drawn from seeds, not
        only those of the training set's own latents.
        """
        self.discriminator_patch_size = discriminator_patch_size
        """Side of the pixel patches the discriminator folds into channels before its strided convolutions."""
        self.discriminator_channels = list(discriminator_channels)
        """Widths of the patch discriminator's stride-2 convolutions."""
        self.diff_augment = diff_augment
        """Apply differentiable augmentation (DiffAugment) to both discriminator inputs, for small data."""
        self.caption_words = list(caption_words) if caption_words else None
        """
        The whole words that decoded captions may use, in the order of `caption_words()`: train.py sets them from the
        training captions. `None` leaves decoding free over the BPE vocabulary.
        """
        self.initializer_range = initializer_range
        """Standard deviation of the normal initialisation of linear and embedding weights."""
        side = image_size // (patch_size * bottleneck_size)
        if image_size % (patch_size * bottleneck_size) or side < 1 or side & (side - 1):
            raise ValueError(
                f"image_size ({image_size}) must be patch_size ({patch_size}) x bottleneck_size ({bottleneck_size}) "
                "times a power of two."
            )
        if detail_bank_size and (detail_patch_size % 2 or image_size % detail_patch_size):
            raise ValueError(
                f"detail_patch_size ({detail_patch_size}) must be even and divide image_size ({image_size})."
            )
        if prior_architecture not in ("mlp", "conv") or (prior_architecture == "conv" and not spatial_latent):
            raise ValueError(
                f"prior_architecture must be 'mlp', or 'conv' with spatial_latent=True; got {prior_architecture!r}."
            )
        if spatial_latent and latent_size % bottleneck_size**2:
            raise ValueError(
                f"A spatial latent needs latent_size ({latent_size}) to be a multiple of bottleneck_size ({bottleneck_size}) squared."
            )
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def num_levels(self):
        """Number of 2x up/downsampling stages between `image_size / patch_size` and `bottleneck_size`."""
        return max(0, (self.image_size // (self.patch_size * self.bottleneck_size)).bit_length() - 1)

    @property
    def latent_channels(self):
        """Channels of the spatial latent grid (`spatial_latent`): `latent_size / bottleneck_size**2`."""
        return self.latent_size // self.bottleneck_size**2

    @property
    def latent_grid_shape(self):
        """`(latent_channels, bottleneck_size, bottleneck_size)` with `spatial_latent`, else None (one flat vector)."""
        return (self.latent_channels, self.bottleneck_size, self.bottleneck_size) if self.spatial_latent else None

    @classmethod
    def from_preset(cls, name, **kwargs):
        """Builds the named preset (`"base"`, `"small"` or `"tiny"`); keyword arguments override its fields."""
        if name not in ENGRAVING_PRESETS:
            raise ValueError(f"Unknown preset {name!r}: choose one of {sorted(ENGRAVING_PRESETS)}.")
        return cls(**{**copy.deepcopy(ENGRAVING_PRESETS[name]), **kwargs})


EngravingConfig.register_for_auto_class()

__all__ = ["EngravingConfig", "ENGRAVING_PRESETS"]
