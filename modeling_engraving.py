"""PyTorch Engraving model: a generative image-caption model for engravings."""

import bisect
import itertools
import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging


try:  # Loaded from the Hub with trust_remote_code, this file lives in a package beside its config.
    from .configuration_engraving import EngravingConfig
except ImportError:  # Imported from a checkout of the repo.
    from configuration_engraving import EngravingConfig


logger = logging.get_logger(__name__)

# Caption sampling of `generate`: the decoder's own distribution, less its 5% tail. Kept to the training words
# (`config.caption_words`), it no longer misspells at this temperature, and gives fewer copies than a cooler 0.7.
CAPTION_TEMPERATURE = 1.0
CAPTION_TOP_P = 0.95


@dataclass
class EngravingOutput(ModelOutput):
    """
    Output of [`EngravingModel.forward`]: the weighted total loss, each of its components, and what they were computed on.

    Args:
        loss (`torch.FloatTensor` of shape `()`): weighted sum of the component losses below.
        loss_reconstruction (`torch.FloatTensor` of shape `()`): L1 + MSE between the images and their reconstructions.
        loss_kl (`torch.FloatTensor` of shape `()`): KL divergence of the posterior from N(0, I), per latent dimension.
        loss_caption (`torch.FloatTensor` of shape `()`): next-token cross-entropy of the captions, given the latent.
        loss_contrastive (`torch.FloatTensor` of shape `()`): symmetric InfoNCE between image and text latents.
        loss_prior (`torch.FloatTensor` of shape `()`): flow-matching loss of the latent prior.
        reconstructions (`torch.FloatTensor` of shape `(batch, channels, height, width)`): decoded images in [-1, 1].
        sampled_images (`torch.FloatTensor` of shape `(num_sampled_images, channels, height, width)`): images decoded
            from latents drawn from the Gaussian of the encoder's latents, for the adversarial loss.
        latents (`torch.FloatTensor` of shape `(batch, latent_size)`): posterior means of the images.
        latent_logvar (`torch.FloatTensor` of shape `(batch, latent_size)`): posterior log-variances.
        text_latents (`torch.FloatTensor` of shape `(batch, latent_size)`): the captions mapped into the latent space.
        caption_logits (`torch.FloatTensor` of shape `(batch, caption_length - 1, vocab_size)`): next-token logits.
    """

    loss: torch.FloatTensor | None = None
    loss_reconstruction: torch.FloatTensor | None = None
    loss_kl: torch.FloatTensor | None = None
    loss_caption: torch.FloatTensor | None = None
    loss_contrastive: torch.FloatTensor | None = None
    loss_prior: torch.FloatTensor | None = None
    reconstructions: torch.FloatTensor | None = None
    sampled_images: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    latent_logvar: torch.FloatTensor | None = None
    text_latents: torch.FloatTensor | None = None
    caption_logits: torch.FloatTensor | None = None


@dataclass
class EngravingGenerationOutput(ModelOutput):
    """
    What the public generation methods return.

    Args:
        images (`list[PIL.Image.Image]`): the engravings, `image_size` x `image_size` RGB.
        captions (`list[str]`): one caption per image.
        seeds (`list[int]`): the seed of each image, where it came from a seed.
        latents (`torch.FloatTensor` of shape `(batch, latent_size)`): the latents the images were decoded from.
    """

    images: list | None = None
    captions: list | None = None
    seeds: list | None = None
    latents: torch.FloatTensor | None = None



def estimate_paper_tone(image):
    """The paper colour of an RGB PIL image: the per-channel median of its one-pixel border, as an (R, G, B) tuple."""
    pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def resize_and_pad(image, size):
    """
    Fits a PIL image into a `size` x `size` RGB square, keeping its aspect ratio and padding with its own paper tone.

    Returns the square image and the padding box `(left, top, right, bottom)` where the picture sits.
    """
    image = ImageOps.exif_transpose(image).convert("RGB")
    scale = size / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), estimate_paper_tone(resized))
    left, top = (size - width) // 2, (size - height) // 2
    canvas.paste(resized, (left, top))
    return canvas, (left, top, left + width, top + height)



def level_widths(channels, num_levels):
    """Channel width at each of the `num_levels + 1` resolutions, repeating the last listed width."""
    return [channels[min(level, len(channels) - 1)] for level in range(num_levels + 1)]


def group_norm(num_channels, num_groups, affine=True):
    """GroupNorm with the largest group count up to `num_groups` that divides `num_channels`."""
    return nn.GroupNorm(math.gcd(num_groups, num_channels), num_channels, affine=affine)


def images_to_pixel_values(images, image_size):
    """PIL images -> `(batch, 3, image_size, image_size)` float tensor in [-1, 1], padded to square with paper tone."""
    arrays = [np.asarray(resize_and_pad(image, image_size)[0], dtype=np.float32) for image in images]
    pixel_values = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixel_values / 127.5 - 1.0


def pixel_values_to_images(pixel_values):
    """`(batch, 3, H, W)` tensor in [-1, 1] -> list of RGB PIL images."""
    pixels = ((pixel_values.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def seeded_generators(seeds):
    """One CPU `torch.Generator` per integer seed, so every sample's randomness depends on its seed alone."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def diff_augment(pixel_values):
    """
    Differentiable augmentation (Zhao et al., 2020) applied to both discriminator inputs, so a discriminator
    trained on a few thousand images does not memorise them: brightness, contrast, translation and cutout.
    """
    batch, _, height, width = pixel_values.shape
    device = pixel_values.device
    pixel_values = pixel_values + (torch.rand(batch, 1, 1, 1, device=device) - 0.5)
    mean = pixel_values.mean(dim=(1, 2, 3), keepdim=True)
    pixel_values = (pixel_values - mean) * (torch.rand(batch, 1, 1, 1, device=device) + 0.5) + mean
    shift_y, shift_x = height // 8, width // 8
    padded = F.pad(pixel_values, (shift_x, shift_x, shift_y, shift_y), mode="replicate")
    offset_y = torch.randint(0, 2 * shift_y + 1, (batch,), device=device)
    offset_x = torch.randint(0, 2 * shift_x + 1, (batch,), device=device)
    rows = (torch.arange(height, device=device)[None, :] + offset_y[:, None])[:, None, :, None]
    cols = (torch.arange(width, device=device)[None, :] + offset_x[:, None])[:, None, None, :]
    channels = torch.arange(pixel_values.shape[1], device=device)[None, :, None, None]
    pixel_values = padded[torch.arange(batch, device=device)[:, None, None, None], channels, rows, cols]
    cut_y, cut_x = height // 4, width // 4
    center_y = torch.randint(0, height, (batch, 1, 1), device=device)
    center_x = torch.randint(0, width, (batch, 1, 1), device=device)
    ys = torch.arange(height, device=device)[None, :, None]
    xs = torch.arange(width, device=device)[None, None, :]
    cut = ((ys - center_y).abs() < cut_y // 2 + 1) & ((xs - center_x).abs() < cut_x // 2 + 1)
    return pixel_values * (~cut)[:, None].to(pixel_values.dtype)


class EngravingResidualBlock(nn.Module):
    """Pre-activation residual block: GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected) shortcut."""

    def __init__(self, in_channels, out_channels, num_groups):
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
            self.qkv(hidden_states).view(batch, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
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


class EngravingImageEncoder(nn.Module):
    """
    CNN from `(batch, channels, image_size, image_size)` pixels to the posterior mean and log-variance of the latent;
    pixel patches are folded into channels first.
    """

    def __init__(self, config):
        super().__init__()
        widths = level_widths(config.encoder_channels, config.num_levels)
        self.unshuffle = nn.PixelUnshuffle(config.patch_size)
        self.stem = nn.Conv2d(config.num_channels * config.patch_size**2, widths[0], 3, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(
                EngravingResidualBlock(widths[level], widths[level], config.norm_num_groups),
                nn.Conv2d(widths[level], widths[level + 1], 3, stride=2, padding=1),
            )
            for level in range(config.num_levels)
        )
        self.bottleneck = EngravingResidualBlock(widths[-1], widths[-1], config.norm_num_groups)
        self.norm_out = group_norm(widths[-1], config.norm_num_groups)
        self.latent_grid_shape = config.latent_grid_shape
        if self.latent_grid_shape:
            self.to_moments = nn.Conv2d(widths[-1], 2 * config.latent_channels, 1)
        else:
            self.to_moments = nn.Linear(widths[-1] * config.bottleneck_size**2, 2 * config.latent_size)

    def forward(self, pixel_values):
        hidden_states = self.stem(self.unshuffle(pixel_values))
        for level in self.levels:
            hidden_states = level(hidden_states)
        hidden_states = F.silu(self.norm_out(self.bottleneck(hidden_states)))
        if self.latent_grid_shape:
            mean, logvar = (moments.flatten(1) for moments in self.to_moments(hidden_states).chunk(2, dim=1))
        else:
            mean, logvar = self.to_moments(hidden_states.flatten(1)).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)


class EngravingImageDecoder(nn.Module):
    """
    CNN from `(batch, latent_size)` latents up to `(batch, channels, image_size, image_size)` pixels in about [-1, 1];
    its last convolution writes each pixel patch as channels, unfolded by a pixel shuffle. With `config.ink_on_paper`
    it writes an ink density instead, laid between a grey ink and a tinted paper that it reads from the latent.
    """

    def __init__(self, config):
        super().__init__()
        self.widths = level_widths(config.decoder_channels, config.num_levels)
        self.bottleneck_size = config.bottleneck_size
        self.latent_grid_shape = config.latent_grid_shape
        if self.latent_grid_shape:
            self.from_latent = nn.Conv2d(config.latent_channels, self.widths[-1], 3, padding=1)
        else:
            self.from_latent = nn.Linear(config.latent_size, self.widths[-1] * config.bottleneck_size**2)
        self.bottleneck = EngravingResidualBlock(self.widths[-1], self.widths[-1], config.norm_num_groups)
        self.levels = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(self.widths[level + 1], self.widths[level], 3, padding=1),
                *(
                    EngravingResidualBlock(self.widths[level], self.widths[level], config.norm_num_groups)
                    for _ in range(config.decoder_blocks_per_level)
                ),
            )
            for level in reversed(range(config.num_levels))
        )
        self.norm_out = group_norm(self.widths[0], config.norm_num_groups)
        painted_channels = 1 if config.ink_on_paper else config.num_channels
        self.conv_out = nn.Conv2d(self.widths[0], painted_channels * config.patch_size**2, 3, padding=1)
        self.shuffle = nn.PixelShuffle(config.patch_size)
        if config.ink_on_paper:
            # Per image: the paper's grey, how far it has yellowed, and the ink's grey. The yellowing is one colour
            # shared by all images (`paper_tint`, learned): old paper turns one way, so no latent, and no sample of
            # the prior, can make it pink or green.
            self.to_paper_and_ink = nn.Linear(config.latent_size, 3)
            self.paper_tint = nn.Parameter(torch.zeros(config.num_channels))
        else:
            self.to_paper_and_ink = self.paper_tint = None

    def forward(self, latents):
        if self.latent_grid_shape:
            hidden_states = self.from_latent(latents.view(-1, *self.latent_grid_shape))
        else:
            hidden_states = self.from_latent(latents).view(
                -1, self.widths[-1], self.bottleneck_size, self.bottleneck_size
            )
        hidden_states = self.bottleneck(hidden_states)
        for level in self.levels:
            hidden_states = level(hidden_states)
        painted = self.shuffle(self.conv_out(F.silu(self.norm_out(hidden_states))))
        if self.to_paper_and_ink is None:
            return painted
        paper_grey, yellowing, ink = self.to_paper_and_ink(latents)[:, :, None, None].unbind(1)
        paper = torch.tanh(paper_grey)[:, None] + torch.sigmoid(yellowing)[:, None] * self.paper_tint[:, None, None]
        return torch.lerp(paper, torch.tanh(ink)[:, None], torch.sigmoid(painted))


class EngravingDetailBank(nn.Module):
    """
    Example-based detail (Freeman, Jones and Pasztor, 2002, "Example-based super-resolution"): a decoder trained with
    pixel losses from one small latent puts the right tones in the right places but blurs the line work, because where
    exactly each line falls is what the latent cannot say. The bank keeps `detail_bank_size` patches of training
    prints as pairs: a key, from the decoder's own drawing of the print (the mean tones of a 4 x 4 grid of half-patch
    cells: the patch and a half-patch margin around it), and a detail, from the real print (its grey values there
    minus their smoothed tones). Decoding cuts an image into `detail_patch_size` squares and adds to each, on every
    channel, the detail of the bank patch whose key is nearest its own: what real prints held where the decoder drew
    the same.

    Fitted to training images, not trained (`fit`). All zeros until then: it adds nothing.
    """

    def __init__(self, config):
        super().__init__()
        self.patch_size = config.detail_patch_size
        self.register_buffer("keys", torch.zeros(config.detail_bank_size, 16))
        self.register_buffer("details", torch.zeros(config.detail_bank_size, self.patch_size**2))

    def cell_tones(self, grey):
        """`(batch, 1, H, W)` grey pixels -> `(batch, 1, 2H / patch, 2W / patch)` mean tones of half-patch cells."""
        return F.avg_pool2d(grey, self.patch_size // 2)

    def patch_keys(self, grey):
        """`(batch, 1, H, W)` grey pixels -> `(batch, patches, 16)`: each patch's 4 x 4 cell tones, margin included."""
        tones = F.pad(self.cell_tones(grey), (1, 1, 1, 1), mode="replicate")
        # Sixteen one-hot 4 x 4 filters at stride 2 gather each patch's cells: an unfold that ONNX exports as a Conv.
        gather = torch.eye(16, device=grey.device, dtype=grey.dtype).view(16, 1, 4, 4)
        return F.conv2d(tones, gather, stride=2).flatten(2).transpose(1, 2)

    def patch_details(self, grey):
        """`(batch, 1, H, W)` grey pixels -> `(batch, patches, patch**2)`: each patch less its smoothed cell tones."""
        smooth = F.interpolate(self.cell_tones(grey), scale_factor=self.patch_size // 2, mode="bilinear", align_corners=False)
        batch, _, height, width = grey.shape
        size = self.patch_size
        detail = (grey - smooth).view(batch, height // size, size, width // size, size).permute(0, 1, 3, 2, 4)
        return detail.reshape(batch, -1, size * size)

    def nearest_patches(self, keys):
        """`(num_queries, 16)` keys -> `(num_queries,)` indices of the nearest bank keys (squared Euclidean)."""
        bank_keys = self.keys.to(keys.dtype)
        bank_norms = (bank_keys**2).sum(-1)

        def nearest(queries):
            return (bank_norms - 2 * queries @ bank_keys.T).argmin(dim=-1)

        if torch.jit.is_tracing():  # An exported graph takes any batch in one step (a traced split keeps its sizes).
            return nearest(keys)
        # Eager decoding bounds the distance matrix at 2**24 entries (64 MB).
        chunk_size = max(1, 2**24 // max(1, bank_keys.shape[0]))
        return torch.cat([nearest(chunk) for chunk in keys.split(chunk_size)])

    @torch.no_grad()
    def fit(self, pairs, seed=0):
        """
        Fills the bank with patches drawn uniformly, without replacement, from all the patches of `pairs`: an iterable
        of `(drawn, real)` pixel batches `(batch, channels, H, W)` in [-1, 1], keyed by the drawn images and detailed
        by the real ones. Each patch gets a seeded random priority and the lowest are kept (bottom-k sampling), so any
        number of batches streams through in bounded memory; with fewer patches than slots, they repeat. Returns the
        number of patches seen.
        """
        generator = torch.Generator().manual_seed(seed)
        keys = details = priorities = None
        num_patches = 0
        for drawn, real in pairs:
            batch_keys = self.patch_keys(drawn.to(self.keys.device, torch.float32).mean(dim=1, keepdim=True))
            batch_details = self.patch_details(real.to(self.keys.device, torch.float32).mean(dim=1, keepdim=True))
            batch_keys, batch_details = batch_keys.flatten(0, 1), batch_details.flatten(0, 1)
            batch_priorities = torch.rand(batch_keys.shape[0], generator=generator).to(self.keys.device)
            num_patches += batch_keys.shape[0]
            if keys is not None:
                batch_keys, batch_details = torch.cat([keys, batch_keys]), torch.cat([details, batch_details])
                batch_priorities = torch.cat([priorities, batch_priorities])
            kept = batch_priorities.topk(min(len(self.keys), len(batch_priorities)), largest=False).indices
            keys, details, priorities = batch_keys[kept], batch_details[kept], batch_priorities[kept]
        if keys is None:
            raise ValueError("A detail bank needs at least one batch of training images to fit.")
        slots = torch.arange(len(self.keys), device=keys.device) % len(keys)
        self.keys.copy_(keys[slots])
        self.details.copy_(details[slots])
        return num_patches

    def forward(self, pixel_values):
        """`(batch, channels, H, W)` pixels in about [-1, 1] -> the same with each patch's nearest real detail added."""
        # An unfitted bank (all zeros, e.g. a checkpoint saved before it had one) adds nothing: skip its search. A traced
        # graph keeps the search, since the check depends on the buffers' values.
        if not torch.jit.is_tracing() and not self.details.any():
            return pixel_values
        grey = pixel_values.mean(dim=1, keepdim=True)
        keys = self.patch_keys(grey)
        batch, _, height, width = grey.shape
        size = self.patch_size
        details = self.details.to(pixel_values.dtype)[self.nearest_patches(keys.flatten(0, 1))]
        details = details.view(batch, height // size, width // size, size, size).permute(0, 1, 3, 2, 4)
        return pixel_values + details.reshape(batch, 1, height, width)


class EngravingTextEncoder(nn.Module):
    """Bidirectional Transformer from caption token embeddings to one `(batch, latent_size)` text latent (masked mean pool)."""

    def __init__(self, config):
        super().__init__()
        self.position_embedding = nn.Embedding(config.max_caption_length, config.text_hidden_size)
        self.layers = nn.ModuleList(EngravingTransformerLayer(config) for _ in range(config.text_encoder_num_layers))
        self.norm = nn.LayerNorm(config.text_hidden_size)
        self.projection = nn.Linear(config.text_hidden_size, config.latent_size)

    def forward(self, token_embeddings, attention_mask):
        length = token_embeddings.shape[1]
        hidden_states = token_embeddings + self.position_embedding.weight[:length]
        key_mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=key_mask)
        weights = attention_mask[..., None].to(hidden_states.dtype)
        pooled = (self.norm(hidden_states) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
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
        hidden_states = hidden_states + self.position_embedding.weight[past_length : past_length + hidden_states.shape[1]]
        for index, layer in enumerate(self.layers):
            # A cached step's new tokens come last, so they may attend to every position: no causal mask then.
            hidden_states = layer(hidden_states, is_causal=not past_length, cache=None if cache is None else cache[index])
        if not past_length:
            hidden_states = hidden_states[:, self.num_prefix_tokens :]
        return self.lm_head(self.norm(hidden_states))


class EngravingPriorBlock(nn.Module):
    """Residual MLP block whose LayerNorm is scaled and shifted by the time-and-condition embedding (adaLN)."""

    def __init__(self, hidden_size):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.SiLU(), nn.Linear(2 * hidden_size, hidden_size))

    def forward(self, hidden_states, embedding):
        scale, shift = self.modulation(F.silu(embedding)).chunk(2, dim=-1)
        return hidden_states + self.mlp(self.norm(hidden_states) * (1 + scale) + shift)


class EngravingConvPriorBlock(nn.Module):
    """
    Residual convolutional block over the latent grid whose GroupNorm is scaled and shifted per channel by the
    time-and-condition embedding (adaLN, as in `EngravingPriorBlock`).
    """

    def __init__(self, channels, embedding_size, num_groups):
        super().__init__()
        self.norm = group_norm(channels, num_groups, affine=False)
        self.modulation = nn.Linear(embedding_size, 2 * channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states, embedding):
        scale, shift = self.modulation(F.silu(embedding))[:, :, None, None].chunk(2, dim=1)
        modulated = self.norm(hidden_states) * (1 + scale) + shift
        return hidden_states + self.conv2(F.silu(self.conv1(F.silu(modulated))))


class EngravingLatentPrior(nn.Module):
    """
    Rectified-flow prior over standardised latents. It learns the velocity that carries N(0, I) noise at t=0 to
    the distribution of the encoder's latents at t=1, optionally conditioned on a text latent; sampling
    integrates that velocity with `prior_num_steps` Euler steps, so a fixed noise gives a fixed latent.

    Its trunk is a residual MLP over the latent vector, or, with `prior_architecture="conv"` and a spatial latent,
    residual convolutions over the latent grid, so that neighbouring cells are drawn together.
    """

    def __init__(self, config):
        super().__init__()
        hidden = config.prior_hidden_size
        self.num_steps = config.prior_num_steps
        self.time_embedding = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.condition_projection = nn.Linear(config.latent_size, hidden)
        self.null_condition = nn.Parameter(torch.zeros(hidden))
        # The convolutional trunk works on the latent grid; the MLP on the flat vector.
        self.latent_grid_shape = config.latent_grid_shape if config.prior_architecture == "conv" else None
        if self.latent_grid_shape:
            channels = config.prior_conv_channels
            self.input_projection = nn.Conv2d(config.latent_channels, channels, 3, padding=1)
            self.blocks = nn.ModuleList(
                EngravingConvPriorBlock(channels, hidden, config.norm_num_groups) for _ in range(config.prior_num_layers)
            )
            self.norm_out = group_norm(channels, config.norm_num_groups)
            self.output_projection = nn.Conv2d(channels, config.latent_channels, 3, padding=1)
        else:
            self.input_projection = nn.Linear(config.latent_size, hidden)
            self.blocks = nn.ModuleList(EngravingPriorBlock(hidden) for _ in range(config.prior_num_layers))
            self.norm_out = nn.LayerNorm(hidden)
            self.output_projection = nn.Linear(hidden, config.latent_size)

    def timestep_features(self, timesteps):
        """Sinusoidal features of `(batch,)` times in [0, 1], of width `prior_hidden_size`."""
        half = self.null_condition.shape[0] // 2
        frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device) / half)
        angles = 1000.0 * timesteps[:, None].float() * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.null_condition.dtype)

    def forward(self, noisy_latents, timesteps, conditions=None, condition_mask=None):
        """
        Velocity `(batch, latent_size)` at `noisy_latents` `(batch, latent_size)` and times `(batch,)`.
        `conditions` `(batch, latent_size)` are unit text latents; rows where `condition_mask` is False use none.
        """
        embedding = self.time_embedding(self.timestep_features(timesteps))
        null = self.null_condition.expand_as(embedding)
        if conditions is None:
            embedding = embedding + null
        else:
            embedding = embedding + torch.where(condition_mask[:, None], self.condition_projection(conditions), null)
        if self.latent_grid_shape:
            noisy_latents = noisy_latents.view(-1, *self.latent_grid_shape)
        hidden_states = self.input_projection(noisy_latents)
        for block in self.blocks:
            hidden_states = block(hidden_states, embedding)
        return self.output_projection(self.norm_out(hidden_states)).flatten(1)

    def sample(self, noise, conditions=None, guidance_scale=1.0):
        """Integrates the flow from `noise` `(batch, latent_size)` to standardised latents, with classifier-free guidance."""
        latents = noise
        condition_mask = None if conditions is None else torch.ones(noise.shape[0], dtype=torch.bool, device=noise.device)
        for step in range(self.num_steps):
            timesteps = torch.full((noise.shape[0],), step / self.num_steps, device=noise.device)
            velocity = self(latents, timesteps)
            if conditions is not None:
                conditional = self(latents, timesteps, conditions, condition_mask)
                velocity = velocity + guidance_scale * (conditional - velocity)
            latents = latents + velocity / self.num_steps
        return latents


class EngravingDiscriminator(nn.Module):
    """
    Patch discriminator for the adversarial loss on reconstructions, with DiffAugment on both inputs.
    It trains beside [`EngravingModel`] (train.py gives it its own optimizer) and is not part of the saved model.
    """

    def __init__(self, config):
        super().__init__()
        self.diff_augment = config.diff_augment
        layers = [nn.PixelUnshuffle(config.discriminator_patch_size)]
        in_channels = config.num_channels * config.discriminator_patch_size**2
        for width in config.discriminator_channels:
            layers += [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            in_channels = width
        layers.append(nn.Conv2d(in_channels, 1, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixel_values):
        """`(batch, channels, H, W)` images -> `(batch, 1, h, w)` patch logits, real > 0 > fake."""
        if self.diff_augment:
            pixel_values = diff_augment(pixel_values)
        return self.layers(pixel_values)

    def generator_loss(self, fake_pixel_values):
        """Hinge loss for the generator: raise the discriminator's score of its images."""
        return -self(fake_pixel_values).mean()

    def discriminator_loss(self, real_pixel_values, fake_pixel_values):
        """Hinge loss for the discriminator on a real and a (detached) generated batch."""
        return F.relu(1 - self(real_pixel_values)).mean() + F.relu(1 + self(fake_pixel_values)).mean()


class EngravingPreTrainedModel(PreTrainedModel):
    config_class = EngravingConfig
    base_model_prefix = "engraving"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, nonlinearity="relu")
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.weight is not None:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, EngravingModel):
            init.constant_(module.logit_scale, math.log(1 / 0.07))
            init.zeros_(module.latent_mean)
            init.ones_(module.latent_std)
            # transformers skips `_init_weights` on remote-code modules that hold no parameters of their own, such as
            # the blocks below; the model is initialised after its children, so it sets theirs over their layers'.
            for block in module.modules():
                self._init_block_weights(block)

    def _init_block_weights(self, module):
        if isinstance(module, EngravingResidualBlock):
            # Each block starts as the identity, so deep decoders train from the first step.
            init.zeros_(module.conv2.weight)
        elif isinstance(module, EngravingImageDecoder):
            # ICNR (Aitken et al., 2017): every pixel of a patch starts with its colour's same filter, so the pixel
            # shuffle starts as a nearest-neighbour upsampling, free of the checkerboard that random filters draw.
            patch_pixels = self.config.patch_size**2
            init.copy_(module.conv_out.weight, module.conv_out.weight[::patch_pixels].repeat_interleave(patch_pixels, 0))
            if module.paper_tint is not None:
                init.zeros_(module.paper_tint)
        elif isinstance(module, EngravingLatentPrior):
            # As in DiT: Xavier-uniform linear layers, not the Transformers' N(0, 0.02), under which a 1,000-step
            # fit converged more slowly (seed KID 508 against 487 on one autoencoder; BENCHMARKS.md, "Prior fit and
            # temperature").
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    init.xavier_uniform_(layer.weight)
            init.zeros_(module.null_condition)
            init.zeros_(module.output_projection.weight)
        elif isinstance(module, EngravingPriorBlock):
            # adaLN-zero: each block starts as the identity.
            init.zeros_(module.modulation.weight)
            init.zeros_(module.mlp[-1].weight)
        elif isinstance(module, EngravingConvPriorBlock):
            init.zeros_(module.modulation.weight)
            init.zeros_(module.conv2.weight)
        elif isinstance(module, EngravingDetailBank):
            # An unfitted bank, or one a checkpoint from before the bank lacks, adds no detail.
            init.zeros_(module.keys)
            init.zeros_(module.details)


class EngravingModel(EngravingPreTrainedModel):
    """
    A generative model of engravings and their captions around one shared latent per image:

    - an image encoder gives a KL-regularised posterior over the latent, and an image decoder draws it back;
    - a caption decoder writes a caption from the latent, and a text encoder maps a caption into the latent space;
    - a flow-matching prior turns seeded N(0, I) noise into latents that lie where the encoder's latents lie,
      unconditionally (`generate`) or given a caption (`imagine`).
    """

    _tied_weights_keys = {"caption_decoder.lm_head.weight": "token_embedding.weight"}

    def __init__(self, config: EngravingConfig):
        super().__init__(config)
        self.image_encoder = EngravingImageEncoder(config)
        self.image_decoder = EngravingImageDecoder(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_hidden_size)
        self.caption_decoder = EngravingCaptionDecoder(config)
        self.text_encoder = EngravingTextEncoder(config)
        self.prior = EngravingLatentPrior(config)
        self.detail_bank = EngravingDetailBank(config) if config.detail_bank_size else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Running statistics that standardise latents for the prior; saved with the weights.
        self.register_buffer("latent_mean", torch.zeros(config.latent_size))
        self.register_buffer("latent_std", torch.ones(config.latent_size))
        self.tokenizer = None
        self.post_init()

    def get_input_embeddings(self):
        return self.token_embedding

    def set_input_embeddings(self, value):
        self.token_embedding = value

    def get_output_embeddings(self):
        return self.caption_decoder.lm_head

    # ----------------------------------------------------------------------------------------------------------
    # Saving and loading: the tokenizer travels with the model, so `generate()` returns text after `from_pretrained`.

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        hub_kwargs = {
            key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if key in kwargs
        }
        try:
            # The code of this repo is already running, so its config may be trusted when the tokenizer reads it.
            model.tokenizer = AutoTokenizer.from_pretrained(
                pretrained_model_name_or_path, trust_remote_code=True, **hub_kwargs
            )
        except (OSError, ValueError):
            logger.warning(f"No tokenizer found with {pretrained_model_name_or_path}: pass `tokenizer=` to get captions.")
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.tokenizer is not None and kwargs.get("is_main_process", True):
            self.tokenizer.save_pretrained(save_directory)

    # ----------------------------------------------------------------------------------------------------------
    # Tensor-level building blocks.

    def encode_images(self, pixel_values, sample_posterior=False, generator=None):
        """`(batch, channels, H, W)` pixels in [-1, 1] -> `(batch, latent_size)` latents: the posterior mean, or a sample."""
        mean, logvar = self.image_encoder(pixel_values)
        if not sample_posterior:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode_latents(self, latents, add_detail=True):
        """
        `(batch, latent_size)` latents -> `(batch, channels, image_size, image_size)` pixels in about [-1, 1], with the
        detail bank's line work added unless `add_detail=False` (or the config has no bank).
        """
        pixel_values = self.image_decoder(latents)
        if add_detail and self.detail_bank is not None:
            pixel_values = self.detail_bank(pixel_values)
        return pixel_values

    def encode_text(self, input_ids, attention_mask):
        """`(batch, length)` caption token ids -> `(batch, latent_size)` text latents in the image latent space."""
        return self.text_encoder(self.token_embedding(input_ids), attention_mask)

    def standardize_latents(self, latents):
        return (latents - self.latent_mean) / self.latent_std

    def unstandardize_latents(self, standardized):
        return standardized * self.latent_std + self.latent_mean

    @torch.no_grad()
    def update_latent_statistics(self, latents, momentum=None):
        """Moves the prior's standardisation towards the mean and std of `(batch, latent_size)` latents (momentum 1: set them)."""
        momentum = self.config.latent_statistics_momentum if momentum is None else momentum
        std = latents.float().std(dim=0) if latents.shape[0] > 1 else self.latent_std
        self.latent_mean.lerp_(latents.float().mean(dim=0), momentum)
        self.latent_std.lerp_(std.clamp(min=1e-4), momentum)

    def reconstruction_loss(self, reconstructions, pixel_values):
        """L1 + MSE between images average-pooled over `config.reconstruction_pool_size` squares."""
        pool_size = self.config.reconstruction_pool_size
        reconstructions, pixel_values = reconstructions.float(), pixel_values.float()
        if pool_size > 1:
            reconstructions, pixel_values = F.avg_pool2d(reconstructions, pool_size), F.avg_pool2d(pixel_values, pool_size)
        return F.l1_loss(reconstructions, pixel_values) + F.mse_loss(reconstructions, pixel_values)

    def prior_loss(self, latents, text_latents=None, generator=None):
        """
        Flow-matching loss of the prior on detached `(batch, latent_size)` latents, text-conditioned on a random share.
        The noise, times and condition mask come from `generator` (a CPU `torch.Generator`) when one is given, so that
        a fit repeats exactly; otherwise from the global generator, as in training.
        """
        target = self.standardize_latents(latents.detach())

        def draw(sampler, shape, dtype=torch.float32):
            if generator is None:
                return sampler(shape, dtype=dtype, device=target.device)
            return sampler(shape, dtype=dtype, generator=generator).to(target.device)

        noise = draw(torch.randn, target.shape, target.dtype)
        timesteps = draw(torch.rand, (target.shape[0],))
        noisy = (1 - timesteps[:, None]) * noise + timesteps[:, None] * target
        conditions = condition_mask = None
        if text_latents is not None:
            conditions = F.normalize(text_latents.detach(), dim=-1)
            condition_mask = draw(torch.rand, (target.shape[0],)) >= self.config.prior_condition_dropout
        velocity = self.prior(noisy, timesteps, conditions, condition_mask)
        return F.mse_loss(velocity.float(), (target - noise).float())

    def contrastive_loss(self, image_latents, text_latents):
        """Symmetric InfoNCE between matching rows of `(batch, latent_size)` image and text latents."""
        image_latents = F.normalize(image_latents.float(), dim=-1)
        text_latents = F.normalize(text_latents.float(), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100.0) * image_latents @ text_latents.T
        targets = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

    def forward(
        self, pixel_values, input_ids=None, attention_mask=None, sample_posterior=None, num_sampled_images=0, **kwargs
    ):
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, image_size, image_size)`): images in [-1, 1].
            input_ids (`torch.LongTensor` of shape `(batch, length)`, *optional*): captions as `<bos> ... <eos> <pad>*`.
            attention_mask (`torch.LongTensor` of shape `(batch, length)`, *optional*): 1 on tokens, 0 on padding.
            sample_posterior (`bool`, *optional*): decode a posterior sample rather than the mean; defaults to `self.training`.
            num_sampled_images (`int`): also decode this many latents drawn from N(`latent_mean`, `latent_std`^2), the
                Gaussian of the encoder's latents, as `sampled_images` for an adversarial loss.

        Returns:
            [`EngravingOutput`] with the weighted `loss` and each component.
        """
        sample_posterior = self.training if sample_posterior is None else sample_posterior
        mean, logvar = self.image_encoder(pixel_values)
        latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample_posterior else mean
        reconstructions = self.image_decoder(latents)
        sampled_images = None
        if num_sampled_images:
            noise = torch.randn(num_sampled_images, self.config.latent_size, device=mean.device, dtype=mean.dtype)
            sampled_images = self.image_decoder(self.unstandardize_latents(noise).to(mean.dtype))
        loss_reconstruction = self.reconstruction_loss(reconstructions, pixel_values)
        loss_kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).mean()
        loss = self.config.reconstruction_loss_weight * loss_reconstruction + self.config.kl_loss_weight * loss_kl

        loss_caption = loss_contrastive = caption_logits = text_latents = None
        if input_ids is not None:
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            token_embeddings = self.token_embedding(input_ids)
            caption_logits = self.caption_decoder(latents, token_embeddings[:, :-1])
            labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
            loss_caption = F.cross_entropy(caption_logits.float().transpose(1, 2), labels, ignore_index=-100)
            text_latents = self.text_encoder(token_embeddings, attention_mask)
            loss_contrastive = self.contrastive_loss(mean, text_latents)
            loss = loss + self.config.caption_loss_weight * loss_caption
            loss = loss + self.config.contrastive_loss_weight * loss_contrastive

        if self.training:
            self.update_latent_statistics(mean.detach())
        loss_prior = self.prior_loss(mean, text_latents)
        loss = loss + self.config.prior_loss_weight * loss_prior

        return EngravingOutput(
            loss=loss,
            loss_reconstruction=loss_reconstruction,
            loss_kl=loss_kl,
            loss_caption=loss_caption,
            loss_contrastive=loss_contrastive,
            loss_prior=loss_prior,
            reconstructions=reconstructions,
            sampled_images=sampled_images,
            latents=mean,
            latent_logvar=logvar,
            text_latents=text_latents,
            caption_logits=caption_logits,
        )

    @torch.no_grad()
    def sample_latents(self, seeds, text_latents=None, use_prior=True, guidance_scale=1.0):
        """
        Latents `(len(seeds), latent_size)` from integer seeds: each seed's N(0, I) noise, carried through the prior
        (conditioned on `text_latents` if given), or decoded as is with `use_prior=False`.
        """
        noise = torch.stack([torch.randn(self.config.latent_size, generator=g) for g in seeded_generators(seeds)])
        noise = noise.to(self.device, self.dtype)
        if not use_prior:
            return noise
        conditions = None if text_latents is None else F.normalize(text_latents, dim=-1)
        return self.prior_latents(noise, conditions, guidance_scale)

    def prior_latents(self, noise, conditions=None, guidance_scale=1.0):
        """
        Seed noise `(batch, latent_size)`, scaled by `config.prior_temperature`, carried through the prior's flow
        (conditioned on unit text latents `conditions` if given) to latents.
        """
        standardized = self.prior.sample(noise * self.config.prior_temperature, conditions, guidance_scale)
        return self.unstandardize_latents(standardized)

    @torch.no_grad()
    def generate_caption_ids(
        self, latents, temperature=0.0, top_p=1.0, generators=None, max_length=None, word_constraint=None
    ):
        """
        Writes captions for `(batch, latent_size)` latents, batched, until every row has produced `<eos>`.
        `temperature=0` is greedy; otherwise nucleus sampling with one `torch.Generator` per row, so a row's caption
        does not depend on the rest of the batch. A [`CaptionWordConstraint`] keeps every row to its whole words.
        Returns `(batch, length)` token ids starting with `<bos>`.
        """
        batch = latents.shape[0]
        max_length = max_length or self.config.max_caption_length
        input_ids = torch.full((batch, 1), self.config.bos_token_id, dtype=torch.long, device=latents.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=latents.device)
        open_words = [""] * batch
        cache = [{} for _ in self.caption_decoder.layers]
        for _ in range(max_length - 1):
            logits = self.caption_decoder(latents, self.token_embedding(input_ids[:, -1:]), cache)[:, -1].float()
            if word_constraint is not None:
                allowed = torch.stack([word_constraint.allowed_tokens(word) for word in open_words]).to(logits.device)
                logits = logits.masked_fill(~allowed, float("-inf"))
            if temperature > 0:
                next_tokens = sample_top_p(logits / temperature, top_p, generators)
            else:
                next_tokens = logits.argmax(dim=-1)
            next_tokens = next_tokens.masked_fill(finished, self.config.pad_token_id)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
            finished |= next_tokens == self.config.eos_token_id
            if word_constraint is not None:
                # A token outside the mask (only from non-finite logits, a diverged model) starts a fresh word.
                open_words = [
                    word if done else word_constraint.next_open_word(word, token) or ""
                    for word, token, done in zip(open_words, next_tokens.tolist(), finished.tolist())
                ]
            if finished.all():
                break
        return input_ids

    # ----------------------------------------------------------------------------------------------------------
    # Public API: seeds, PIL images and strings in; PIL images and strings out.

    def _require_tokenizer(self, tokenizer):
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError(
                "This model has no tokenizer: load it with `from_pretrained` from a folder that has one, or pass `tokenizer=`."
            )
        return tokenizer

    def caption_word_constraint(self, tokenizer):
        """The [`CaptionWordConstraint`] of `config.caption_words` for `tokenizer`, built once; `None` when unset."""
        words = self.config.caption_words
        if not words:
            return None
        built_for = getattr(self, "_caption_word_constraint", (None, None, None))
        if built_for[0] is not tokenizer or built_for[1] is not words:
            constraint = CaptionWordConstraint(words, tokenizer, self.config.vocab_size, self.config.eos_token_id)
            self._caption_word_constraint = (tokenizer, words, constraint)
        return self._caption_word_constraint[2]

    @torch.no_grad()
    def caption_latents(self, latents, tokenizer=None, temperature=0.0, top_p=1.0, generators=None):
        """
        Captions `(batch, latent_size)` latents: `list[str]`, greedy by default (see `generate_caption_ids`), in the
        whole words of `config.caption_words` when it is set.
        """
        tokenizer = self._require_tokenizer(tokenizer)
        word_constraint = self.caption_word_constraint(tokenizer)
        ids = self.generate_caption_ids(latents, temperature, top_p, generators, word_constraint=word_constraint)
        captions = [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        if word_constraint is not None:
            captions = [word_constraint.drop_half_spelt_word(caption) for caption in captions]
        return captions

    @torch.no_grad()
    def embed_captions(self, captions, tokenizer=None):
        """Caption strings -> `(batch, latent_size)` text latents: the alignment embedding, in the image latent space."""
        tokenizer = self._require_tokenizer(tokenizer)
        batch = tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.config.max_caption_length, return_tensors="pt"
        )
        return self.encode_text(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))

    @torch.no_grad()
    def generate(
        self,
        seeds=None,
        num_samples=None,
        temperature=CAPTION_TEMPERATURE,
        top_p=CAPTION_TOP_P,
        use_prior=True,
        add_detail=True,
        tokenizer=None,
        batch_size=16,
    ):
        """
        Draws new engravings with captions. The same integer seed always gives the same latent and caption; its
        image is identical for the same batch size, and across batch sizes may differ by one grey level in a few
        pixels, because batched convolutions round differently.

        Args:
            seeds (`list[int]`, *optional*): one engraving per seed.
            num_samples (`int`, *optional*): without `seeds`, this many engravings from random seeds.
            temperature (`float`): caption sampling temperature; 0 is greedy.
            top_p (`float`): nucleus of the caption sampling.
            use_prior (`bool`): carry the seed's noise through the learned prior; `False` decodes N(0, I) directly.
            add_detail (`bool`): add the detail bank's line work to the decoded images (see `decode_latents`).

        Returns:
            [`EngravingGenerationOutput`] with `images` (PIL), `captions` (str), `seeds` and `latents`.
        """
        tokenizer = self._require_tokenizer(tokenizer)
        if seeds is None:
            if not num_samples:
                raise ValueError("Pass `seeds=[...]` or `num_samples=N`.")
            seeds = torch.randint(0, 2**31 - 1, (num_samples,)).tolist()
        seeds = [int(seed) for seed in seeds]
        images, captions, latents = [], [], []
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start : start + batch_size]
            chunk_latents = self.sample_latents(chunk, use_prior=use_prior)
            # The caption's randomness continues from a generator of the same seed, after the latent noise.
            generators = seeded_generators(chunk)
            for generator in generators:
                torch.randn(self.config.latent_size, generator=generator)
            images += pixel_values_to_images(self.decode_latents(chunk_latents, add_detail))
            captions += self.caption_latents(chunk_latents, tokenizer, temperature, top_p, generators)
            latents.append(chunk_latents)
        return EngravingGenerationOutput(images=images, captions=captions, seeds=seeds, latents=torch.cat(latents))

    @torch.no_grad()
    def caption(self, images, tokenizer=None, temperature=0.0, top_p=1.0):
        """Captions PIL images (one or a list): `list[str]`, greedy by default."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        pixel_values = images_to_pixel_values(images, self.config.image_size).to(self.device, self.dtype)
        latents = self.encode_images(pixel_values)
        generators = seeded_generators(range(len(images)))
        return self.caption_latents(latents, tokenizer, temperature, top_p, generators)

    @torch.no_grad()
    def imagine(self, captions, seed=0, guidance_scale=2.0, add_detail=True, tokenizer=None):
        """
        Draws an engraving for each caption (a string or a list): the caption's text latent conditions the prior.
        Caption `i` uses seed `seed + i`. Returns [`EngravingGenerationOutput`].
        """
        captions = [captions] if isinstance(captions, str) else list(captions)
        text_latents = self.embed_captions(captions, tokenizer)
        seeds = [seed + index for index in range(len(captions))]
        latents = self.sample_latents(seeds, text_latents=text_latents, guidance_scale=guidance_scale)
        images = pixel_values_to_images(self.decode_latents(latents, add_detail))
        return EngravingGenerationOutput(images=images, captions=captions, seeds=seeds, latents=latents)

    @torch.no_grad()
    def interpolate(self, seed_a, seed_b, steps=8, add_detail=True, tokenizer=None):
        """
        Walks from the engraving of `seed_a` to that of `seed_b` in `steps` images: spherical interpolation of the
        two seeds' noise, each point carried through the prior. Captions are greedy. Returns [`EngravingGenerationOutput`].
        """
        tokenizer = self._require_tokenizer(tokenizer)
        if steps < 2:
            raise ValueError(f"`steps` must be at least 2, got {steps}.")
        noise_a, noise_b = (
            torch.randn(self.config.latent_size, generator=g) for g in seeded_generators([seed_a, seed_b])
        )
        angle = torch.arccos((F.normalize(noise_a, dim=0) @ F.normalize(noise_b, dim=0)).clamp(-1 + 1e-6, 1 - 1e-6))
        weights = torch.linspace(0, 1, steps)[:, None]
        noise = (torch.sin((1 - weights) * angle) * noise_a + torch.sin(weights * angle) * noise_b) / torch.sin(angle)
        latents = self.prior_latents(noise.to(self.device, self.dtype))
        images = pixel_values_to_images(self.decode_latents(latents, add_detail))
        captions = self.caption_latents(latents, tokenizer)
        return EngravingGenerationOutput(images=images, captions=captions, seeds=[seed_a, seed_b], latents=latents)

    def reset_prior(self, seed=0):
        """Replaces the prior with a freshly initialised one, drawn from `seed`, on the same device, dtype and mode."""
        old_prior = next(self.prior.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # A new module, not the old one initialised again: transformers' init functions skip loaded weights.
            prior = EngravingLatentPrior(self.config)
            prior.apply(self._init_weights)
            for module in prior.modules():
                self._init_block_weights(module)
        self.prior = prior.to(old_prior.device, old_prior.dtype).train(self.prior.training)

    def fit_prior(
        self, latents, text_latents=None, num_steps=1000, batch_size=256, learning_rate=1e-3, seed=0, from_scratch=True
    ):
        """
        Fits the prior to a set of training latents `(num_images, latent_size)` (and their text latents): sets the
        exact standardisation statistics, then trains only the prior for `num_steps`. Returns the final loss. The
        batches, noise and times all come from `seed`, so the same call on the same latents fits the same prior.

        With `from_scratch` (the default) the prior is first built afresh from `seed`. The prior that trained beside
        the autoencoder learnt moving latents under moving statistics, and fitted further it can stay behind: a fresh
        prior fitted the same way scored 0.59x its seed KID on a 1024-d latent, and 0.94x to level on the 256-d CPU
        recipe and the demo (BENCHMARKS.md).
        """
        latents = latents.to(self.device, torch.float32)
        text_latents = None if text_latents is None else text_latents.to(self.device, torch.float32)
        self.update_latent_statistics(latents, momentum=1.0)
        if from_scratch:
            self.reset_prior(seed)
        optimizer = torch.optim.AdamW(self.prior.parameters(), lr=learning_rate, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_steps)
        generator = torch.Generator().manual_seed(seed)
        was_training = self.prior.training
        self.prior.train()
        loss = torch.tensor(float("nan"))
        for _ in range(num_steps):
            index = torch.randint(0, latents.shape[0], (min(batch_size, latents.shape[0]),), generator=generator)
            batch_text = None if text_latents is None else text_latents[index.to(self.device)]
            loss = self.prior_loss(latents[index.to(self.device)], batch_text, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        self.prior.train(was_training)
        return loss.item()

    @torch.no_grad()
    def fit_detail_bank(self, batches, seed=0):
        """
        Fills the detail bank from training images: `batches` is an iterable of `(batch, channels, image_size,
        image_size)` pixel values in [-1, 1]. Each image's patches are keyed by this model's reconstruction of it (the
        posterior mean, decoded without detail), so that decoding later finds them from what the decoder draws, and
        carry the real image's detail (see [`EngravingDetailBank`]). Returns the number of patches seen.
        """
        if self.detail_bank is None:
            raise ValueError("This model's config has detail_bank_size=0: it has no detail bank to fit.")

        def reconstructed_pairs():
            for pixel_values in batches:
                pixel_values = pixel_values.to(self.device, self.dtype)
                yield self.decode_latents(self.encode_images(pixel_values), add_detail=False), pixel_values

        return self.detail_bank.fit(reconstructed_pairs(), seed=seed)


WORD_PATTERN = re.compile(r"\w+")


def caption_words(captions):
    """The distinct whole words (runs of `\\w`) of `captions`, sorted: a vocabulary for `EngravingConfig.caption_words`."""
    return sorted({word for caption in captions for word in WORD_PATTERN.findall(caption)})


class CaptionWordConstraint:
    """
    Keeps decoded captions to whole words of a vocabulary. A row may take a token only if every word the token
    completes is in the vocabulary and the word it leaves open starts one; it may end (`<eos>`) only on a complete
    word. A subword decoder trained on a thousand titles otherwise spells new words that are not words.

    The rule is on the text: a token's text splits at non-word characters into the end of the open word, any whole
    words, and the start of the next. Tokens that are not printable text on their own (control characters, or bytes
    of a character split across tokens, which a byte-level BPE has for rare letters) are never allowed.

    A mask is built from the words that start with the open word, not by testing every token, and cached per open
    word; the cache keeps the `max_cached_masks` last used, so a long-running app stays within about 32 MB.
    """

    def __init__(self, words, tokenizer, vocab_size, eos_token_id, max_cached_masks=4096):
        self.words = set(words)
        self.sorted_words = sorted(self.words)
        self.prefixes = {word[:end] for word in self.words for end in range(len(word) + 1)}
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        special_ids = set(tokenizer.all_special_ids)
        self.token_pieces = [None] * vocab_size
        # Usable tokens, by the text they add to the open word: tokens within a word (`continuing`), and tokens that
        # end it and whose further words are all known (`ending`), which only the completed word then decides. A
        # token that is neither keeps no pieces: it is never allowed.
        self.continuing, self.ending = {}, {}
        for token_id in range(min(vocab_size, len(tokenizer))):
            text = tokenizer.decode([token_id])
            if token_id in special_ids or not text.isprintable() or "\ufffd" in text:
                continue
            pieces = re.split(r"\W+", text)
            if len(pieces) == 1:
                self.continuing.setdefault(pieces[0], []).append(token_id)
            elif all(word in self.words for word in pieces[1:-1]) and pieces[-1] in self.prefixes:
                self.ending.setdefault(pieces[0], []).append(token_id)
            else:
                continue
            self.token_pieces[token_id] = pieces
        self.masks = OrderedDict()
        self.max_cached_masks = max_cached_masks

    def next_open_word(self, open_word, token_id):
        """The open word after `token_id`, or `None` where the token is not allowed after `open_word`."""
        pieces = self.token_pieces[token_id]
        if pieces is None:
            return None
        if len(pieces) == 1:
            return open_word + pieces[0] if open_word + pieces[0] in self.prefixes else None
        completed = open_word + pieces[0]
        return pieces[-1] if not completed or completed in self.words else None

    def allowed_tokens(self, open_word):
        """
        `(vocab_size,)` bool mask of the tokens allowed after `open_word` (those for which `next_open_word` is not
        `None`), `<eos>` included when the word is complete, or when nothing else is allowed (a word whose remaining
        letters no token spells).
        """
        if open_word in self.masks:
            self.masks.move_to_end(open_word)
            return self.masks[open_word]
        allowed_ids = list(self.ending.get("", [])) if not open_word else []
        start = bisect.bisect_left(self.sorted_words, open_word)
        for word in itertools.takewhile(lambda word: word.startswith(open_word), itertools.islice(self.sorted_words, start, None)):
            rest = word[len(open_word) :]
            allowed_ids += self.ending.get(rest, [])
            for end in range(len(rest) + 1):
                allowed_ids += self.continuing.get(rest[:end], [])
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[allowed_ids] = True
        mask[self.eos_token_id] = not open_word or open_word in self.words or not mask.any()
        self.masks[open_word] = mask
        if len(self.masks) > self.max_cached_masks:
            self.masks.popitem(last=False)
        return mask

    def drop_half_spelt_word(self, caption):
        """`caption` without its last word where that word is unfinished: a caption cut at `max_caption_length`."""
        last_word = re.search(rf"{WORD_PATTERN.pattern}$", caption)
        if last_word is not None and last_word.group() not in self.words:
            return caption[: last_word.start()].rstrip()
        return caption


def sample_top_p(logits, top_p, generators=None):
    """
    Samples one token per row of `(batch, vocab)` logits from its top-`p` nucleus. Row `i` draws its uniform number
    from `generators[i]`, so its choice is independent of the other rows.
    """
    probabilities = logits.softmax(dim=-1)
    sorted_probabilities, sorted_indices = probabilities.sort(dim=-1, descending=True)
    cumulative = sorted_probabilities.cumsum(dim=-1)
    sorted_probabilities = sorted_probabilities.masked_fill(cumulative - sorted_probabilities > top_p, 0.0)
    cumulative = sorted_probabilities.cumsum(dim=-1)
    if generators is None:
        uniform = torch.rand(logits.shape[0])
    else:
        uniform = torch.stack([torch.rand((), generator=generator) for generator in generators])
    threshold = uniform.to(logits.device)[:, None] * cumulative[:, -1:]
    choice = (cumulative < threshold).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    return sorted_indices.gather(-1, choice[:, None]).squeeze(-1)


__all__ = [
    "CaptionWordConstraint",
    "EngravingModel",
    "EngravingPreTrainedModel",
    "EngravingDiscriminator",
    "EngravingOutput",
    "caption_words",
]


EngravingModel.register_for_auto_class("AutoModel")
