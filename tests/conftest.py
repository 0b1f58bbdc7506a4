"""Shared tiny fixtures: a tokenizer, a random tiny model and its pipeline, a small captioned DatasetDict."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from configuration_engraving import EngravingConfig  # noqa: E402
from modeling_engraving import EngravingModel  # noqa: E402
from pipeline_engraving import EngravingPipeline, caption_words  # noqa: E402
from tokenization_engraving import train_tokenizer  # noqa: E402


SHAPES = ["circle", "square", "cross", "bar"]
PLACES = ["left", "right"]


def shape_picture(shape, place, size=32):
    """A dark ink `shape` on light paper at the `place` half of a `size` px square, and its caption."""
    image = Image.new("RGB", (size, size), (236, 228, 210))
    draw = ImageDraw.Draw(image)
    x0 = size // 8 if place == "left" else size // 2 + size // 16
    box = (x0, size // 4, x0 + size * 3 // 8, size * 5 // 8)
    if shape == "circle":
        draw.ellipse(box, fill=(20, 20, 20))
    elif shape == "square":
        draw.rectangle(box, fill=(20, 20, 20))
    elif shape == "cross":
        draw.line(box, fill=(20, 20, 20), width=3)
        draw.line((box[0], box[3], box[2], box[1]), fill=(20, 20, 20), width=3)
    else:
        draw.rectangle((box[0], box[1], box[2], box[1] + size // 10), fill=(20, 20, 20))
    return image, f"An engraving depicting a {shape} on the {place}"


def shape_pairs(size=32):
    """The 8 distinct (image, caption) pairs of the shape vocabulary."""
    return [shape_picture(shape, place, size) for shape in SHAPES for place in PLACES]


def tiny_training_captions():
    return [caption for _, caption in shape_pairs()] + ["An engraving depicting a ship beneath the moon"]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(tiny_training_captions() * 4, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer):
    """The tiny preset as train.py configures it: its tokenizer's vocabulary, captions kept to the training words."""
    return EngravingConfig.from_preset(
        "tiny", vocab_size=len(tiny_tokenizer), caption_words=caption_words(tiny_training_captions())
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_config, tiny_tokenizer):
    import torch

    torch.manual_seed(0)
    return EngravingModel(tiny_config).eval()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model, tiny_tokenizer):
    return EngravingPipeline(tiny_model, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_drawing_pipeline(tiny_config, tiny_tokenizer):
    """The tiny pipeline of a model trained to draw captions: its seeds sample a caption first, then draw from it."""
    import torch

    torch.manual_seed(0)
    config = EngravingConfig.from_dict(
        {**tiny_config.to_dict(), "caption_drawing_loss_weight": 10.0, "caption_prior_share": 0.1}
    )
    return EngravingPipeline(EngravingModel(config).eval(), tiny_tokenizer)


@pytest.fixture(scope="session", params=["encoder_captions", "caption_drawing"])
def seed_pipeline(request):
    """Each way a seed becomes an engraving and a caption: the encoder reading the drawing, or the caption first."""
    name = "tiny_pipeline" if request.param == "encoder_captions" else "tiny_drawing_pipeline"
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline saved as train.py saves `model/`: weights, config, tokenizer and the three code files."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory):
    """A DatasetDict saved at `<dir>/dataset` with `train` (24 rows) and `validation` (8 rows) splits of shapes."""
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    features = Features({"image": ImageFeature(), "caption": Value("string")})

    def split(count):
        rows = [shape_picture(SHAPES[i % 4], PLACES[(i // 4) % 2]) for i in rng.permutation(count)]
        return Dataset.from_dict({"image": [r[0] for r in rows], "caption": [r[1] for r in rows]}, features=features)

    path = tmp_path_factory.mktemp("tiny_data")
    DatasetDict({"train": split(24), "validation": split(8)}).save_to_disk(path / "dataset")
    return path


@pytest.fixture(scope="session")
def tiny_image_folder_dir(tiny_dataset_dir, tmp_path_factory):
    """
    The tiny DatasetDict's splits as prepare_dataset.py's ImageFolder layout (PNGs beside a metadata.jsonl), next to a
    copy of the DatasetDict itself, as prepare_dataset.py leaves them.
    """
    from datasets import load_from_disk

    path = tmp_path_factory.mktemp("tiny_image_folder")
    shutil.copytree(tiny_dataset_dir / "dataset", path / "dataset")
    for name, split in load_from_disk(str(tiny_dataset_dir / "dataset")).items():
        (path / name).mkdir()
        rows = []
        for index, row in enumerate(split):
            row["image"].save(path / name / f"{index:03d}.png")
            rows.append(json.dumps({"file_name": f"{index:03d}.png", "caption": row["caption"]}))
        (path / name / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def without_datasets_library(tmp_path_factory):
    """Environment variables for a subprocess where `import datasets` and `import evaluate` fail, as on a GPU image."""
    path = tmp_path_factory.mktemp("no_datasets")
    for name in ("datasets", "evaluate"):
        (path / f"{name}.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    return {"PYTHONPATH": os.pathsep.join([str(path), str(REPO_ROOT)])}
