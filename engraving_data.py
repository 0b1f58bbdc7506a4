"""
The data layer shared by train.py, evaluate_model.py and bench/: captioned splits (a saved DatasetDict, or
prepare_dataset.py's ImageFolder folders read without the `datasets` library), a uint8 pixel cache decoded once, and
seeded batches augmented on the device.
"""

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from pipeline_engraving import resize_and_pad


class ImageFolderSplit:
    """
    One split of prepare_dataset.py's ImageFolder output (`metadata.jsonl` with `file_name` and `caption`, beside the
    image files), read without the `datasets` library: the GPU images this trains on may not have it. It offers the
    few `datasets.Dataset` members train.py and evaluate_model.py use.
    """

    column_names = ["image", "caption"]

    def __init__(self, folder):
        self.folder = Path(folder)
        metadata = (self.folder / "metadata.jsonl").read_bytes()
        rows = [json.loads(line) for line in metadata.decode("utf-8").splitlines() if line.strip()]
        self.file_names = [row["file_name"] for row in rows]
        self.captions = [row["caption"] for row in rows]
        # The pixel cache is keyed by this, as by a Dataset's own fingerprint.
        self._fingerprint = hashlib.sha256(metadata).hexdigest()[:16]

    def __len__(self):
        return len(self.file_names)

    def __getitem__(self, column):
        if column == "caption":
            return list(self.captions)
        if column == "image":
            return [self.image(index) for index in range(len(self))]
        raise KeyError(f"{self.folder} has the columns {self.column_names}, not {column!r}.")

    def image(self, index):
        with Image.open(self.folder / self.file_names[index]) as image:
            image.load()
            return image

    def select(self, indices):
        """The rows at `indices`, in that order."""
        subset = copy.copy(self)
        subset.file_names = [self.file_names[index] for index in indices]
        subset.captions = [self.captions[index] for index in indices]
        subset._fingerprint = hashlib.sha256(f"{self._fingerprint}{list(indices)}".encode()).hexdigest()[:16]
        return subset


def saved_dataset_dict_folder(path, splits):
    """
    `path` or `path/dataset` if a DatasetDict was saved there with `save_to_disk`, else None. Also None where the
    `datasets` library is missing and `path` holds the ImageFolder `splits` that prepare_dataset.py writes beside it.
    """
    path = Path(path)
    saved = next((folder for folder in (path, path / "dataset") if (folder / "dataset_dict.json").is_file()), None)
    if saved is not None and has_image_folder_splits(path, splits):
        try:
            import datasets  # noqa: F401
        except ImportError:
            return None
    return saved


def has_image_folder_splits(path, splits):
    return all((Path(path) / split / "metadata.jsonl").is_file() for split in splits)


class DatasetNotFoundError(ValueError):
    """The dataset folder is missing, or lacks a split or a column: the message says which and what to pass."""


def load_splits(path, splits=("train", "validation")):
    """
    The named `splits` at `path` (a list, in that order): its DatasetDict saved with `save_to_disk` (at `path` or
    `path/dataset`), else its ImageFolder folders with `metadata.jsonl`, read without the `datasets` library.
    Raises [`DatasetNotFoundError`] with one sentence that says what is missing.
    """
    path = Path(path)
    folder = saved_dataset_dict_folder(path, splits)
    if folder is None and has_image_folder_splits(path, splits):
        return [ImageFolderSplit(path / split) for split in splits]
    if folder is None:
        folders = " and ".join(f"`{split}/`" for split in splits)
        raise DatasetNotFoundError(
            f"{path} holds no dataset: pass a folder written by prepare_dataset.py (a DatasetDict saved with "
            f"`save_to_disk`, at the folder or its `dataset/`, or ImageFolder splits {folders} with metadata.jsonl)."
        )
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(folder))
    except Exception as error:  # `datasets` cannot read a split saved empty, or damaged files: say which folder
        raise DatasetNotFoundError(
            f"{folder} could not be read ({type(error).__name__}): a split is empty or a file is damaged; prepare it "
            "again with prepare_dataset.py."
        ) from error
    if not isinstance(dataset, DatasetDict):
        raise DatasetNotFoundError(f"{folder} is a single Dataset; pass a DatasetDict with the splits {list(splits)}.")
    for split in splits:
        if split not in dataset:
            raise DatasetNotFoundError(f"The dataset at {folder} has no `{split}` split (it has {sorted(dataset)}).")
        missing = {"image", "caption"} - set(dataset[split].column_names)
        if missing:
            raise DatasetNotFoundError(f"The `{split}` split at {folder} lacks the column(s) {sorted(missing)}.")
    return [dataset[split] for split in splits]


def split_images(split, chunk_size=256):
    """The split's PIL images in order, decoded `chunk_size` at a time."""
    if isinstance(split, ImageFolderSplit):
        yield from (split.image(index) for index in range(len(split)))
        return
    images = split.select_columns(["image"])
    for start in range(0, len(split), chunk_size):
        yield from images[start : start + chunk_size]["image"]


def decode_to_cache(split, image_size, cache_dir):
    """
    Decodes a split's images once, fitted to `image_size` squares, into a uint8 `(N, 3, S, S)` .npy file keyed by the
    split's fingerprint, and returns it memory-mapped. The file is written under a temporary name, then renamed.
    """
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / f"{split._fingerprint}-{len(split)}-{image_size}px.npy"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
        pixels = np.lib.format.open_memmap(
            partial, mode="w+", dtype=np.uint8, shape=(len(split), 3, image_size, image_size)
        )
        images = tqdm(split_images(split), total=len(split), desc=f"Decoding {len(split)} images", unit="image")
        for index, image in enumerate(images):
            pixels[index] = np.asarray(resize_and_pad(image, image_size)[0]).transpose(2, 0, 1)
        pixels.flush()
        del pixels
        os.replace(partial, path)
    return np.load(path, mmap_mode="r")


class PixelCache:
    """uint8 images `(N, 3, S, S)`: on the GPU when they fit in a third of its free memory, else memory-mapped."""

    def __init__(self, pixels, device):
        self.device = device
        self.pixels = pixels
        if device.type == "cuda" and pixels.nbytes < torch.cuda.mem_get_info(device)[0] / 3:
            self.pixels = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)

    def __len__(self):
        return len(self.pixels)

    def batch(self, indices):
        """Float pixel values in [-1, 1] on the device for a 1-d tensor of indices."""
        if isinstance(self.pixels, torch.Tensor):
            pixels = self.pixels[indices.to(self.device)]
        else:
            pixels = torch.from_numpy(self.pixels[indices.numpy()]).to(self.device, non_blocking=True)
        return pixels.float() / 127.5 - 1.0


def epoch_batches(num_images, epoch, seed, batches_per_epoch, batch_size, num_processes, process_index):
    """
    This process's `(batches_per_epoch, batch_size)` image indices for `epoch`: a permutation seeded by
    `(seed, epoch)`, cut into global batches whose consecutive slices go to each process.
    """
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(num_images, generator=generator)[: batches_per_epoch * batch_size * num_processes]
    return order.view(batches_per_epoch, num_processes, batch_size)[:, process_index]


def augment(pixel_values, crop_scale, random_flip):
    """
    Random resized crop (side between `crop_scale` and 1 of the image, anywhere inside it) and an optional horizontal
    flip, batched on the device with the global RNG, so a resume that restores the RNG replays them exactly.
    """
    if crop_scale >= 1 and not random_flip:
        return pixel_values
    batch, device = pixel_values.shape[0], pixel_values.device
    scale = torch.empty(batch, device=device).uniform_(crop_scale, 1.0)
    shift_x, shift_y = ((torch.rand(2, batch, device=device) * 2 - 1) * (1 - scale)).unbind(0)
    flip = torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0) if random_flip else torch.ones_like(scale)
    zeros = torch.zeros_like(scale)
    theta = torch.stack([torch.stack([scale * flip, zeros, shift_x], 1), torch.stack([zeros, scale, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)
    return F.grid_sample(pixel_values, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
