"""The procedural demo engravings: deterministic, fast, varied, and captioned with what is visible."""

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from datasets import load_from_disk


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prepare_dataset  # noqa: E402
from demo_scenes import POSITION_PHRASES, SKY_PHRASES, caption_subject_and_position, render_scene, sample_scene  # noqa: E402


def test_same_seed_gives_same_engraving_and_caption():
    first, second, other = render_scene(3, 64), render_scene(3, 64), render_scene(4, 64)
    assert first[1] == second[1]
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))


def test_engravings_are_dark_ink_on_warm_paper():
    image, caption = render_scene(11, 128)
    assert (image.mode, image.size) == ("RGB", (128, 128))
    assert caption.startswith("An engraving depicting ")
    pixels = np.asarray(image, dtype=float).reshape(-1, 3)
    paper = np.percentile(pixels, 90, axis=0)
    assert paper[0] > paper[2] + 20 and paper.mean() > 200, "paper should be warm and light"
    assert (pixels.mean(axis=1) < 90).mean() > 0.03, "there should be dark ink lines"


def test_scenes_vary_independently_and_captions_name_what_is_visible():
    import random

    scenes = [sample_scene(random.Random(seed)) for seed in range(400)]
    for attribute, values in (("subject", 7), ("position", 3), ("size", 2), ("weather", 3), ("sky_object", 4)):
        assert len(Counter(getattr(s, attribute) for s in scenes)) == values
    combinations = Counter((s.subject, s.position, s.size, s.weather, s.sky_object) for s in scenes)
    assert len(combinations) > 200
    for scene in scenes:
        caption = scene.caption
        assert f"a {scene.size} {scene.subject} {POSITION_PHRASES[scene.position]}" in caption
        assert (SKY_PHRASES.get(scene.sky_object, "beneath") in caption) == (scene.sky_object != "none")
        assert ("birds" in caption) == scene.birds
        assert all(obj in caption for obj in scene.secondary)
        assert caption_subject_and_position(caption) == (scene.subject, scene.position)
    assert caption_subject_and_position("An engraving of a harbour") == (None, None)


def test_demo_renders_at_least_50_images_per_second_at_128px_on_one_core():
    render_scene(0, 128)
    start = time.process_time()
    for seed in range(40):
        render_scene(seed, 128)
    assert 40 / (time.process_time() - start) >= 50


def test_demo_source_makes_a_dataset_train_py_can_load(tmp_path):
    prepare_dataset.main(
        prepare_dataset.parse_args(
            [
                "--source",
                "demo",
                "--num_images",
                "20",
                "--image_size",
                "32",
                "--min_size",
                "8",
                "--output_dir",
                str(tmp_path),
            ]
        )
    )
    dataset = load_from_disk(str(tmp_path / "dataset"))
    assert (dataset["train"].num_rows, dataset["validation"].num_rows) == (18, 2)
    example = dataset["train"][0]
    assert example["image"].size == (32, 32)
    assert example["caption"].startswith("An engraving depicting ")


def test_recognisability_benchmark_scores_a_saved_model(tiny_model_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import demo_recognisability

    report = tmp_path / "recognisability.json"
    demo_recognisability.main(
        demo_recognisability.parse_args(
            [
                "--model",
                str(tiny_model_dir),
                "--num_samples",
                "4",
                "--num_train_renders",
                "48",
                "--num_heldout_renders",
                "16",
                "--classifier_epochs",
                "1",
                "--output_json",
                str(report),
            ]
        )
    )
    rows = json.loads(report.read_text())["rows"]
    assert list(rows) == [
        "held-out renders (ceiling)",
        "reconstructions of them",
        "captions of them (subject named)",
        "seed samples, own captions",
        "caption -> engraving (imagine)",
    ]
    assert rows["held-out renders (ceiling)"]["count"] == rows["reconstructions of them"]["count"] == 16
    for row in rows.values():
        assert all(0.0 <= row[k] <= 1.0 or math.isnan(row[k]) for k in ("subject", "position", "subject_chance"))
        if row["count"]:
            assert sum(row["misread_as"].values()) == round(row["count"] * (1 - row["subject"]))
    # An untrained tiny model's captions name no demo subject, so its sample rows score nothing rather than fail.
    assert rows["seed samples, own captions"]["count"] <= 4
    # Every seed sample is read as exactly one subject, whatever its caption names.
    assert math.isclose(sum(rows["seed samples, own captions"]["read_as"].values()), 1.0, abs_tol=1e-6)
    assert rows["captions of them (subject named)"]["count"] == 16
