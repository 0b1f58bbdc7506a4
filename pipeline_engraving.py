"""
Engraving pipeline: seeds, captions and pictures in; engravings and captions out.

    >>> from pipeline_engraving import EngravingPipeline
    >>> pipe = EngravingPipeline.from_pretrained("outputs/demo/model")   # a folder written by train.py, or a Hub id
    >>> output = pipe(seeds=[0, 1, 2])                                    # output.images (PIL), output.captions (str)

The network is [`EngravingModel`] (modeling_engraving.py); this file holds what turns it into a product, as a diffusers
pipeline does: seeding, caption decoding (kept to the training words by [`CaptionWordConstraint`], a transformers
`LogitsProcessor`), PIL conversion and captioned grids. train.py saves it beside the model, so a model folder or Hub
repo carries it; from the Hub, load it with `transformers.dynamic_module_utils.get_class_from_dynamic_module`.
"""

import bisect
import itertools
import json
import math
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from transformers import AutoModel, AutoTokenizer, LogitsProcessor, LogitsProcessorList
from transformers.utils import ModelOutput


# Caption sampling of a seed's caption: the decoder's own distribution, less its 5% tail. Kept to the training words
# (`config.caption_words`), it does not misspell at this temperature.
CAPTION_TEMPERATURE = 1.0
CAPTION_TOP_P = 0.95
# How far `imagine` strays from the latent a caption names, in units of the N(0, I) seed noise.
IMAGINE_VARIATION = 0.5
MAX_SEED = 2**32 - 1
# Pictures to caption are refused above this (a 6,000 x 6,000 print; 10,000 x 10,000 is not), before decoding.
MAX_PICTURE_PIXELS = 36_000_000
# Grid cells are drawn at least this wide, so a 32 px model's samples stay visible beside their captions.
GRID_MIN_CELL = 128
WORD_PATTERN = re.compile(r"\w+")
# A LoRA adapter's folder keeps the caption words of its training captions here: config.caption_words of the base
# model joined by the new ones (the adapter's own config holds only peft's fields).
ADAPTER_CAPTION_WORDS_NAME = "caption_words.json"


@dataclass
class EngravingPipelineOutput(ModelOutput):
    """
    What the pipeline's drawing methods return.

    Args:
        images (`list[PIL.Image.Image]`): the engravings, `image_size` x `image_size` RGB.
        captions (`list[str]`): one caption per image.
        seeds (`list[int]`): the seed of each image, where it came from a seed.
        latents (`torch.FloatTensor` of shape `(batch, latent_size)`): the latents the images were drawn from.
    """

    images: list | None = None
    captions: list | None = None
    seeds: list | None = None
    latents: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Images: PIL in and out.


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


def images_to_pixel_values(images, image_size):
    """PIL images -> `(batch, 3, image_size, image_size)` float tensor in [-1, 1], padded to square with paper tone."""
    arrays = [np.asarray(resize_and_pad(image, image_size)[0], dtype=np.float32) for image in images]
    pixel_values = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixel_values / 127.5 - 1.0


def pixel_values_to_images(pixel_values):
    """`(batch, 3, H, W)` tensor in [-1, 1] -> list of RGB PIL images."""
    pixels = ((pixel_values.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def open_image(path, max_pixels=MAX_PICTURE_PIXELS):
    """
    Opens an image file as RGB, or raises a ValueError that says what is wrong: not a readable image, or more than
    `max_pixels` pixels (checked from the header, before anything is decoded, so a decompression bomb never is).
    """
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(
                    f"{Path(path).name} is {image.width} x {image.height} pixels, more than the {max_pixels:,} this "
                    "accepts: resize it first."
                )
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"{Path(path).name} is not an image that can be read ({type(error).__name__}): "
            "use a PNG, JPEG, WebP or TIFF."
        ) from None


def caption_font(size):
    """A font of `size` pixels for grid captions: DejaVu Sans where the system has it, else Pillow's built-in one."""
    # Pillow's built-in font has no accented letters or dashes, which real titles have ("Abbé", "—"); DejaVu Sans
    # has them and is on most Linux systems (Debian's fonts-dejavu-core). Pillow finds it by file name.
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def wrap_caption(caption, font, width):
    """`caption`'s words in lines no wider than `width` pixels in `font` (a word wider than that gets a line alone)."""
    lines = []
    for word in caption.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def captioned_grid(images, captions, columns):
    """Lays images out in rows of `columns` on white paper, each with its whole caption wrapped beneath it."""
    scale = max(1, math.ceil(GRID_MIN_CELL / images[0].width))
    width, height = images[0].width * scale, images[0].height * scale
    font = caption_font(max(10, width // 22))
    line_height = font.size + 4
    caption_lines = [wrap_caption(caption, font, width - 8) for caption in captions]  # a 4 px margin on each side
    cell_height = height + max(map(len, caption_lines), default=0) * line_height + 8
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, lines) in enumerate(zip(images, caption_lines)):
        left, top = (index % columns) * width, (index // columns) * cell_height
        grid.paste(image.resize((width, height), Image.Resampling.NEAREST), (left, top))
        for line_index, line in enumerate(lines):
            draw.text((left + 4, top + height + 4 + line_index * line_height), line, fill="black", font=font)
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Seeds.


def seeded_generators(seeds):
    """One CPU `torch.Generator` per integer seed, so every sample's randomness depends on its seed alone."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def seed_latents(seeds, latent_size, generators=None):
    """
    `(len(seeds), latent_size)` CPU latents: each integer seed's N(0, I) draw, whatever else is in the batch. Pass the
    seeds' `generators` to keep drawing from them after the latents.
    """
    generators = seeded_generators(seeds) if generators is None else generators
    return torch.stack([torch.randn(latent_size, generator=generator) for generator in generators])


# ----------------------------------------------------------------------------------------------------------------
# Caption decoding.


def caption_words(captions):
    """The distinct whole words (runs of `\\w`) of `captions`, sorted: a vocabulary for `config.caption_words`."""
    return sorted({word for caption in captions for word in WORD_PATTERN.findall(caption)})


class CaptionWordConstraint(LogitsProcessor):
    """
    A `LogitsProcessor` that keeps decoded captions to whole words of a vocabulary. A row may take a token only if
    every word the token completes is in the vocabulary and the word it leaves open starts one; it may end (`<eos>`)
    only on a complete word. A subword decoder trained on a thousand titles otherwise spells words that are not words.

    The rule is on the text: a token's text splits at non-word characters into the end of the open word, any whole
    words, and the start of the next. Tokens that are not printable text on their own (control characters, or bytes
    of a character split across tokens, which a byte-level BPE has for rare letters) are never allowed.

    A mask is built from the words that start with the open word, not by testing every token, and cached per open
    word; the cache keeps the `max_cached_masks` last used, so a long-running app stays within about 32 MB. The open
    word of each row is read from its tokens after `<bos>`, remembered by prefix so that a step costs one lookup.
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
        self.open_words = {}

    def __call__(self, input_ids, scores):
        """`(batch, length)` ids starting with `<bos>` and `(batch, vocab)` scores -> scores, disallowed at -inf."""
        if input_ids.shape[1] == 1:
            self.open_words = {}
        allowed = torch.stack([self.allowed_tokens(self.open_word(row)) for row in input_ids[:, 1:].tolist()])
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))

    def open_word(self, token_ids):
        """The word left open by `token_ids` (those after `<bos>`): empty where a token was not allowed (a diverged
        model's non-finite logits) or the caption has ended."""
        key = tuple(token_ids)
        if key not in self.open_words:
            previous = self.open_word(token_ids[:-1]) if token_ids else ""
            self.open_words[key] = (self.next_open_word(previous, token_ids[-1]) or "") if token_ids else ""
        return self.open_words[key]

    def next_open_word(self, open_word, token_id):
        """The open word after `token_id`, or `None` where the token is not allowed after `open_word`."""
        pieces = self.token_pieces[token_id] if 0 <= token_id < self.vocab_size else None
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
        following = itertools.islice(self.sorted_words, start, None)
        for word in itertools.takewhile(lambda word: word.startswith(open_word), following):
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


def load_adapter(model, adapter_id):
    """
    `model` wrapped in a peft `PeftModel` with the LoRA adapter `adapter_id` (a folder or Hub id), its config's
    caption words those the adapter was trained with.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter_id)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a LoRA adapter from {adapter_id!r} ({type(error).__name__}): give a folder written by "
            "train.py --lora_rank for this base model, or a Hub id of one."
        ) from error
    path = Path(adapter_id) / ADAPTER_CAPTION_WORDS_NAME
    if not Path(adapter_id).is_dir():
        try:
            path = Path(hf_hub_download(adapter_id, ADAPTER_CAPTION_WORDS_NAME))
        except EntryNotFoundError:
            return model
    if path.is_file():
        model.config.caption_words = json.loads(path.read_text())
    return model


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


# ----------------------------------------------------------------------------------------------------------------
# The pipeline.


class EngravingPipeline:
    """
    Draws engravings and their captions with an [`EngravingModel`] and its tokenizer.

    - `pipe(seeds=[...])`: a new engraving per seed, with a caption written from the encoder's latent of the drawing,
      so the caption describes what was drawn;
    - `pipe.caption(images)`: captions of pictures; `pipe.engrave(images)`: their captions and engraved redrawings;
    - `pipe.imagine(captions, seed, variation)`: an engraving per caption;
    - `pipe.interpolate(seed_a, seed_b, steps)`: a walk between two seeds' engravings.

    The same integer seed always gives the same latent and caption; its image is identical for the same batch size,
    and across batch sizes may differ by one grey level in a few pixels, because batched convolutions round
    differently.
    """

    def __init__(self, model, tokenizer, generator_dtype=None):
        self.model = model
        self.tokenizer = tokenizer
        # `torch.bfloat16` draws under autocast: on CPUs with AMX or AVX512-BF16 the generator runs about 1.5 times as
        # fast, and its pixels differ from float32's by rounding (a seed's image, and so its caption, may then differ).
        self.generator_dtype = generator_dtype
        config = model.config
        self.word_constraint = (
            CaptionWordConstraint(config.caption_words, tokenizer, config.vocab_size, config.eos_token_id)
            if config.caption_words
            else None
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, device="cpu", adapter_id=None, generator_dtype=None, **kwargs
    ):
        """
        Loads the model (running the modeling code saved with it, `trust_remote_code`, as `AutoModel` does on the
        Hub) and its tokenizer, in eval mode on `device`, from a folder written by train.py or a Hub id. `kwargs` go
        to both `from_pretrained` calls (`revision`, `token`, `cache_dir`, `local_files_only`, ...). `adapter_id`, a
        LoRA adapter folder (or Hub id) written by `train.py --lora_rank`, wraps the model in a peft `PeftModel`;
        `generator_dtype` is as in `EngravingPipeline`.
        """
        try:
            model = AutoModel.from_pretrained(pretrained_model_name_or_path, trust_remote_code=True, **kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not load an Engraving model from {pretrained_model_name_or_path!r} "
                f"({type(error).__name__}): give a folder written by train.py or a Hub model id."
            ) from error
        try:
            tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, trust_remote_code=True, **kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} has no tokenizer: save the model with its tokenizer for captions."
            ) from error
        if adapter_id is not None:
            model = load_adapter(model, adapter_id)
        return cls(model.to(device).eval(), tokenizer, generator_dtype)

    def save_pretrained(self, save_directory, **kwargs):
        """
        Saves the model, its tokenizer and this file, so that the folder (or a Hub repo of it) loads as it is. For a
        peft model, the model is its adapter (weights and `adapter_config.json`), with its caption words.
        """
        self.model.save_pretrained(save_directory, **kwargs)
        if kwargs.get("is_main_process", True):
            self.tokenizer.save_pretrained(save_directory)
            shutil.copy(__file__, Path(save_directory) / "pipeline_engraving.py")
            if hasattr(self.model, "peft_config"):
                words = json.dumps(self.model.config.caption_words)
                (Path(save_directory) / ADAPTER_CAPTION_WORDS_NAME).write_text(words)

    def to(self, device):
        self.model.to(device)
        return self

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    # ------------------------------------------------------------------------------------------------------------
    # Tensor-level steps.

    def draw(self, latents):
        """`(batch, latent_size)` latents -> `(batch, 3, image_size, image_size)` engravings, in `generator_dtype`."""
        if self.generator_dtype is None:
            return self.model.decode_latents(latents)
        with torch.autocast(self.device.type, dtype=self.generator_dtype):
            return self.model.decode_latents(latents).to(self.dtype)

    def seed_latents(self, seeds, generators=None):
        """`seed_latents` of the integer seeds (and their generators), on the model's device and dtype."""
        return seed_latents(seeds, self.model.config.latent_size, generators).to(self.device, self.dtype)

    @torch.no_grad()
    def generate_caption_ids(self, latents, temperature=0.0, top_p=1.0, generators=None, max_length=None):
        """
        Writes captions for `(batch, latent_size)` latents, batched, until every row has produced `<eos>`.
        `temperature=0` is greedy; otherwise nucleus sampling with one `torch.Generator` per row, so a row's caption
        does not depend on the rest of the batch. Returns `(batch, length)` token ids starting with `<bos>`.
        """
        config = self.model.config
        processors = LogitsProcessorList([self.word_constraint] if self.word_constraint is not None else [])
        input_ids = torch.full((latents.shape[0], 1), config.bos_token_id, dtype=torch.long, device=latents.device)
        finished = torch.zeros(latents.shape[0], dtype=torch.bool, device=latents.device)
        cache = self.model.new_caption_cache()
        for _ in range((max_length or config.max_caption_length) - 1):
            logits = processors(input_ids, self.model.caption_logits(latents, input_ids[:, -1:], cache)[:, -1].float())
            if temperature > 0:
                next_tokens = sample_top_p(logits / temperature, top_p, generators)
            else:
                next_tokens = logits.argmax(dim=-1)
            next_tokens = next_tokens.masked_fill(finished, config.pad_token_id)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
            finished |= next_tokens == config.eos_token_id
            if finished.all():
                break
        return input_ids

    def decode_caption_ids(self, ids):
        """`(batch, length)` caption token ids -> `list[str]`, without a word the length limit cut half-spelt."""
        captions = [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        if self.word_constraint is not None:
            captions = [self.word_constraint.drop_half_spelt_word(caption) for caption in captions]
        return captions

    @torch.no_grad()
    def caption_latents(self, latents, temperature=0.0, top_p=1.0, generators=None):
        """Captions `(batch, latent_size)` latents: `list[str]`, greedy by default, in `config.caption_words`."""
        return self.decode_caption_ids(self.generate_caption_ids(latents, temperature, top_p, generators))

    @torch.no_grad()
    def sample_seeds(self, seeds, temperature=CAPTION_TEMPERATURE, top_p=CAPTION_TOP_P):
        """
        Each integer seed's latent, whatever else is in the batch, without drawing it. A model that draws from
        captions (`config.draws_from_captions`) first samples the seed's caption from the captions' prior (the caption
        decoder on the zero latent), then takes the latent `mean + std * noise` from that caption's posterior with the
        seed's `N(0, I)` noise. Otherwise the seed's noise is the latent. Returns `(latents, caption_ids, generators)`:
        `caption_ids` is `None` without caption drawing, and the seeds' generators continue after what was drawn.
        """
        generators = seeded_generators(seeds)
        latents = self.seed_latents(seeds, generators)
        if not self.model.config.draws_from_captions:
            return latents, None, generators
        caption_ids = self.generate_caption_ids(torch.zeros_like(latents), temperature, top_p, generators)
        attention_mask = (caption_ids != self.model.config.pad_token_id).long()
        latents, _ = self.model.sample_caption_latents(caption_ids, attention_mask, noise=latents)
        return latents.to(self.dtype), caption_ids, generators

    @torch.no_grad()
    def draw_seeds(self, seeds, temperature=CAPTION_TEMPERATURE, top_p=CAPTION_TOP_P):
        """
        Each integer seed's latent, engraving `(batch, 3, image_size, image_size)` and caption, whatever else is in
        the batch ([`~EngravingPipeline.sample_seeds`]). With caption drawing the caption is the one the engraving was
        drawn from; otherwise it is the encoder's reading of the engraving, sampled on from each seed's generator.
        """
        latents, caption_ids, generators = self.sample_seeds(seeds, temperature, top_p)
        pixel_values = self.draw(latents)
        if caption_ids is None:
            return latents, pixel_values, self.caption_pixel_values(pixel_values, temperature, top_p, generators)
        return latents, pixel_values, self.decode_caption_ids(caption_ids)

    @torch.no_grad()
    def caption_pixel_values(self, pixel_values, temperature=0.0, top_p=1.0, generators=None):
        """Captions `(batch, 3, H, W)` images in [-1, 1] through their encoded latents: `list[str]`."""
        return self.caption_latents(self.model.encode_images(pixel_values), temperature, top_p, generators)

    @torch.no_grad()
    def embed_captions(self, captions):
        """Caption strings -> `(batch, latent_size)` text latents: the alignment embedding, in the image latents."""
        batch = self.tokenize(captions)
        return self.model.encode_text(batch["input_ids"], batch["attention_mask"])

    def tokenize(self, captions):
        """Caption strings -> padded `input_ids` and `attention_mask` on the model's device."""
        batch = self.tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            max_length=self.model.config.max_caption_length,
            return_tensors="pt",
        )
        return {name: batch[name].to(self.device) for name in ["input_ids", "attention_mask"]}

    # ------------------------------------------------------------------------------------------------------------
    # Seeds, PIL images and strings in; PIL images and strings out.

    @torch.no_grad()
    def __call__(
        self, seeds=None, num_samples=None, temperature=CAPTION_TEMPERATURE, top_p=CAPTION_TOP_P, batch_size=16
    ):
        """
        Draws new engravings with captions.

        Args:
            seeds (`list[int]`, *optional*): one engraving per seed.
            num_samples (`int`, *optional*): without `seeds`, this many engravings from random seeds.
            temperature (`float`): caption sampling temperature; 0 is greedy.
            top_p (`float`): nucleus of the caption sampling.
            batch_size (`int`): images drawn per forward pass.

        Returns:
            [`EngravingPipelineOutput`] with `images` (PIL), `captions` (str), `seeds` and `latents`.
        """
        if seeds is None:
            if not num_samples:
                raise ValueError("Pass `seeds=[...]` or `num_samples=N`.")
            seeds = torch.randint(0, 2**31 - 1, (num_samples,)).tolist()
        seeds = [int(seed) for seed in seeds]
        images, captions, latents = [], [], []
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start : start + batch_size]
            chunk_latents, pixel_values, chunk_captions = self.draw_seeds(chunk, temperature, top_p)
            images += pixel_values_to_images(pixel_values)
            captions += chunk_captions
            latents.append(chunk_latents)
        return EngravingPipelineOutput(images=images, captions=captions, seeds=seeds, latents=torch.cat(latents))

    def pictures_to_pixel_values(self, images):
        """PIL images (one or a list) -> `(batch, 3, image_size, image_size)` on the model's device and dtype."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        return images_to_pixel_values(images, self.model.config.image_size).to(self.device, self.dtype)

    @torch.no_grad()
    def caption(self, images, temperature=0.0, top_p=1.0):
        """Captions PIL images (one or a list): `list[str]`, greedy by default."""
        pixel_values = self.pictures_to_pixel_values(images)
        generators = seeded_generators(range(len(pixel_values)))
        return self.caption_pixel_values(pixel_values, temperature, top_p, generators)

    @torch.no_grad()
    def engrave(self, images):
        """Captions PIL pictures and redraws each from its latent: [`EngravingPipelineOutput`]."""
        latents = self.model.encode_images(self.pictures_to_pixel_values(images))
        engravings = pixel_values_to_images(self.draw(latents))
        return EngravingPipelineOutput(images=engravings, captions=self.caption_latents(latents), latents=latents)

    @torch.no_grad()
    def imagine(self, captions, seed=0, variation=IMAGINE_VARIATION):
        """
        Draws an engraving for each caption (a string or a list): the text encoder names a latent for the caption, and
        the seed's N(0, I) draw, scaled by `variation`, moves it (0: the caption's own latent, the same for every
        seed). Caption `i` uses seed `seed + i`. Returns [`EngravingPipelineOutput`].
        """
        captions = [captions] if isinstance(captions, str) else list(captions)
        seeds = [seed + index for index in range(len(captions))]
        noise = variation * self.seed_latents(seeds)
        if self.model.config.draws_from_captions:
            # Within the caption's posterior: the seed's noise scaled by the posterior's spread.
            batch = self.tokenize(captions)
            latents = self.model.sample_caption_latents(batch["input_ids"], batch["attention_mask"], noise=noise)[0]
            latents = latents.to(self.dtype)
        else:
            latents = self.embed_captions(captions) + noise
        images = pixel_values_to_images(self.draw(latents))
        return EngravingPipelineOutput(images=images, captions=captions, seeds=seeds, latents=latents)

    @torch.no_grad()
    def interpolate(self, seed_a, seed_b, steps=8):
        """
        Walks from the engraving of `seed_a` to that of `seed_b` in `steps` images, along the great circle between the
        two seeds' latents (which keeps every step at the norm of a seed's latent). Captions are greedy. Returns
        [`EngravingPipelineOutput`].
        """
        if steps < 2:
            raise ValueError(f"`steps` must be at least 2, got {steps}.")
        latent_a, latent_b = self.sample_seeds([seed_a, seed_b])[0].float()
        cosine = F.normalize(latent_a, dim=0) @ F.normalize(latent_b, dim=0)
        angle = torch.arccos(cosine.clamp(-1 + 1e-6, 1 - 1e-6))
        weights = torch.linspace(0, 1, steps, device=latent_a.device)[:, None]
        latents = (torch.sin((1 - weights) * angle) * latent_a + torch.sin(weights * angle) * latent_b) / torch.sin(
            angle
        )
        pixel_values = self.draw(latents.to(self.dtype))
        images = pixel_values_to_images(pixel_values)
        return EngravingPipelineOutput(
            images=images, captions=self.caption_pixel_values(pixel_values), seeds=[seed_a, seed_b], latents=latents
        )
