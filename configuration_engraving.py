"""Engraving model configuration."""

import copy

from transformers import PretrainedConfig


ENGRAVING_PRESETS = {
    # The reference design: 512 px, one 1024-d latent, a 3-layer 8-head 512-d caption decoder. The GPU recipe trains
    # it at 256 px (`image_size=256`): the widths are listed from low resolution up, so a smaller image drops the top.
    "base": {},
    # The CPU recipe on real prints: 128 px on 2 cores, about a second a step at batch 16 (widths three times those
    # ran 3.9 s a step). DiffAugment translates only, as in the demo preset: a short run learns its layouts faster.
    "small": {
        "image_size": 128,
        "latent_size": 256,
        "generator_channels": [256, 128, 64, 32, 16, 16],
        "encoder_channels": [256, 128, 64, 32, 16],
        "discriminator_channels": [128, 64, 32, 16],
        "diff_augment_policy": "translation",
        "text_hidden_size": 256,
        "text_num_heads": 4,
        "text_num_layers": 2,
        "text_encoder_num_layers": 1,
    },
    # `make demo`: the procedural demo scenes at 64 px, trained on 2 CPU cores in a few minutes. DiffAugment translates
    # only: 2,000 freshly drawn scenes need no defence against memorising, and in a 4-minute run colour and cutout
    # held the layout back. The generator also draws each scene from its caption (L1), and seeds sample a caption
    # first: in 4 minutes the adversarial loss alone drew dark masses, not subjects (BENCHMARKS.md, "make demo").
    # The encoder's reconstruction loss is off: its extra generator pass cost a sixth of the steps for nothing.
    "demo": {
        "image_size": 64,
        "latent_size": 128,
        "generator_channels": [128, 64, 32, 16, 16],
        "encoder_channels": [128, 64, 32, 16],
        "discriminator_channels": [64, 32, 16],
        "diff_augment_policy": "translation",
        "caption_drawing_loss_weight": 100.0,
        "caption_prior_share": 0.1,
        "reconstruction_loss_weight": 0.0,
        "text_hidden_size": 128,
        "text_num_heads": 4,
        "text_num_layers": 2,
        "text_encoder_num_layers": 1,
    },
    # For tests: one training step well under a second on one CPU core.
    "tiny": {
        "image_size": 32,
        "latent_size": 32,
        "generator_channels": [32, 16, 8, 8],
        "encoder_channels": [32, 16, 8, 8],
        "discriminator_channels": [16, 8, 8],
        "text_hidden_size": 32,
        "text_num_heads": 2,
        "text_num_layers": 1,
        "text_encoder_num_layers": 1,
        "vocab_size": 512,
        "max_caption_length": 32,
        "num_prefix_tokens": 2,
    },
}


class EngravingConfig(PretrainedConfig):
    r"""
    Configuration of an [`EngravingModel`]: a generator that draws an engraving from a latent `z ~ N(0, I)`, an image
    encoder that maps an engraving back into that latent space, a caption decoder that writes a caption from a latent,
    and a text encoder that maps a caption into the same space. The discriminator that trains the generator
    ([`EngravingDiscriminator`]) is configured here too but is not part of the saved model.

    The defaults are the reference design (the `"base"` preset); [`EngravingConfig.from_preset`] builds the others.

    Args:
        image_size (`int`, *optional*, defaults to 512):
            Side of the square images, in pixels: a power of two, at least 16.
        latent_size (`int`, *optional*, defaults to 1024):
            Dimension of the one latent vector shared by the image and its caption.
        generator_channels (`list[int]`, *optional*):
            Generator width at 4 px, then at each doubling of the resolution up to `image_size`; the last is repeated.
        encoder_channels (`list[int]`, *optional*):
            Image encoder width at 4 px, then at each doubling up to `image_size / 2`; the last is repeated.
        discriminator_channels (`list[int]`, *optional*):
            Discriminator width at 8 px, then at each doubling up to `image_size / 2`; the last is repeated.
        diff_augment_policy (`str`, *optional*, defaults to `"color,translation,cutout"`):
            The DiffAugment transforms the discriminator's inputs go through, comma-separated (empty: none).
        text_hidden_size (`int`, *optional*, defaults to 512):
            Width of the caption decoder and the text encoder.
        text_num_heads (`int`, *optional*, defaults to 8):
            Attention heads per Transformer layer.
        text_num_layers (`int`, *optional*, defaults to 3):
            Transformer layers of the caption decoder.
        text_encoder_num_layers (`int`, *optional*, defaults to 2):
            Transformer layers of the text encoder.
        text_mlp_ratio (`int`, *optional*, defaults to 4):
            Width of the Transformer MLPs as a multiple of `text_hidden_size`.
        vocab_size (`int`, *optional*, defaults to 8000):
            Size of the BPE vocabulary; train.py sets it from the tokenizer.
        max_caption_length (`int`, *optional*, defaults to 48):
            Longest caption in tokens, `<bos>` and `<eos>` included.
        num_prefix_tokens (`int`, *optional*, defaults to 4):
            Prefix tokens the latent is projected to, to condition the caption decoder.
        caption_loss_weight (`float`, *optional*, defaults to 2.0):
            Weight of the caption cross-entropy.
        contrastive_loss_weight (`float`, *optional*, defaults to 0.5):
            Weight of the symmetric InfoNCE loss between image and text latents.
        latent_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the encoder's regression of generated images back to the latents that drew them.
        reconstruction_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the L1 distance between a real print and the generator's drawing of its encoded latent (it trains
            the encoder on real prints).
        text_latent_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the text encoder's regression to the image latents, which lets a caption pick a latent to draw.
        caption_drawing_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the L1 distance between a real print and the generator's drawing of a latent sampled from its
            caption's posterior `N(mean, variance)` (the text encoder's): a supervised shape signal that teaches the
            generator what each caption looks like far faster than the adversarial loss alone. 0 turns it off.
        caption_kl_loss_weight (`float`, *optional*, defaults to 0.01):
            Weight of the KL divergence from the captions' posteriors to the seeds' `N(0, I)`, which keeps the latents
            that captions pick where seeds land.
        caption_prior_share (`float`, *optional*, defaults to 0.0):
            Share of training captions the caption decoder writes from the zero latent, which makes it a language model
            of the captions too. With `caption_drawing_loss_weight`, a seed samples its caption from that prior and the
            generator draws a latent from the caption's posterior.
        caption_words (`list[str]`, *optional*):
            The whole words decoded captions may use; train.py sets them from the training captions. `None` leaves
            decoding free over the BPE vocabulary.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights.

    Example:

    ```python
    >>> from configuration_engraving import EngravingConfig
    >>> from modeling_engraving import EngravingModel

    >>> config = EngravingConfig.from_preset("demo")
    >>> model = EngravingModel(config)
    >>> config.image_size, config.latent_size
    (64, 128)
    ```
    """

    model_type = "engraving"

    def __init__(
        self,
        image_size=512,
        latent_size=1024,
        generator_channels=(256, 512, 256, 128, 128, 64, 32, 16),
        encoder_channels=(256, 256, 256, 128, 64, 32, 16, 16),
        discriminator_channels=(512, 256, 128, 64, 32, 16),
        diff_augment_policy="color,translation,cutout",
        text_hidden_size=512,
        text_num_heads=8,
        text_num_layers=3,
        text_encoder_num_layers=2,
        text_mlp_ratio=4,
        vocab_size=8000,
        max_caption_length=48,
        num_prefix_tokens=4,
        caption_loss_weight=2.0,
        contrastive_loss_weight=0.5,
        latent_loss_weight=1.0,
        reconstruction_loss_weight=1.0,
        text_latent_loss_weight=1.0,
        caption_drawing_loss_weight=0.0,
        caption_kl_loss_weight=0.01,
        caption_prior_share=0.0,
        caption_words=None,
        initializer_range=0.02,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        **kwargs,
    ):
        if image_size < 16 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two of at least 16, got {image_size}.")
        self.image_size = image_size
        self.latent_size = latent_size
        self.generator_channels = list(generator_channels)
        self.encoder_channels = list(encoder_channels)
        self.discriminator_channels = list(discriminator_channels)
        self.diff_augment_policy = diff_augment_policy
        self.text_hidden_size = text_hidden_size
        self.text_num_heads = text_num_heads
        self.text_num_layers = text_num_layers
        self.text_encoder_num_layers = text_encoder_num_layers
        self.text_mlp_ratio = text_mlp_ratio
        self.vocab_size = vocab_size
        self.max_caption_length = max_caption_length
        self.num_prefix_tokens = num_prefix_tokens
        self.caption_loss_weight = caption_loss_weight
        self.contrastive_loss_weight = contrastive_loss_weight
        self.latent_loss_weight = latent_loss_weight
        self.reconstruction_loss_weight = reconstruction_loss_weight
        self.text_latent_loss_weight = text_latent_loss_weight
        self.caption_drawing_loss_weight = caption_drawing_loss_weight
        self.caption_kl_loss_weight = caption_kl_loss_weight
        self.caption_prior_share = caption_prior_share
        self.caption_words = list(caption_words) if caption_words else None
        self.initializer_range = initializer_range
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def draws_from_captions(self):
        """Whether the generator was trained to draw captions, so that a seed samples its caption first."""
        return self.caption_drawing_loss_weight > 0

    @classmethod
    def from_preset(cls, name, **kwargs):
        """Builds the named preset (`"base"`, `"small"`, `"demo"` or `"tiny"`); keyword arguments override fields."""
        if name not in ENGRAVING_PRESETS:
            raise ValueError(f"Unknown preset {name!r}: choose one of {sorted(ENGRAVING_PRESETS)}.")
        return cls(**{**copy.deepcopy(ENGRAVING_PRESETS[name]), **kwargs})


EngravingConfig.register_for_auto_class()

__all__ = ["EngravingConfig", "ENGRAVING_PRESETS"]
