"""generate.py, run in-process on the tiny model folder, as a user runs it from the command line."""

import json

import numpy as np
import pytest
from conftest import shape_picture
from PIL import Image

import generate
from pipeline_engraving import GRID_MIN_CELL, caption_font, wrap_caption


def read_records(output_dir):
    return [json.loads(line) for line in (output_dir / "captions.jsonl").read_text().splitlines()]


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_seeds_write_one_png_each_their_captions_and_a_captioned_grid(tiny_model_dir, tiny_config, tmp_path):
    generate.main(["--model", str(tiny_model_dir), "--seeds", "0-4", "--output_dir", str(tmp_path), "--grid"])
    records = read_records(tmp_path)
    assert [record["seed"] for record in records] == [0, 1, 2, 3, 4]
    for record in records:
        assert record["caption"] and record["file"] == f"seed_{record['seed']}.png"
        assert Image.open(tmp_path / record["file"]).size == (tiny_config.image_size, tiny_config.image_size)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width == 3 * GRID_MIN_CELL and grid.height > 2 * GRID_MIN_CELL


def test_same_seed_gives_same_engraving_and_caption_in_any_batch(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    generate.main(["--model", model, "--seeds", "0-3", "--batch_size", "4", "--output_dir", str(tmp_path / "a")])
    generate.main(["--model", model, "--seeds", "2", "--output_dir", str(tmp_path / "b")])
    batched, alone = read_records(tmp_path / "a")[2], read_records(tmp_path / "b")[0]
    assert batched["caption"] == alone["caption"]
    # Batched convolutions may round a few pixels one grey level apart.
    assert np.abs(pixels(tmp_path / "a" / "seed_2.png") - pixels(tmp_path / "b" / "seed_2.png")).max() <= 1


def test_interpolation_writes_each_step_and_a_strip(tiny_model_dir, tiny_config, tmp_path):
    args = ["--model", str(tiny_model_dir), "--interpolate", "3", "9", "--steps", "4", "--output_dir", str(tmp_path)]
    generate.main(args)
    records = read_records(tmp_path)
    assert [record["step"] for record in records] == [0, 1, 2, 3]
    assert all((tmp_path / record["file"]).exists() and record["caption"] for record in records)
    assert Image.open(tmp_path / "interpolation.png").width == 4 * GRID_MIN_CELL


def test_a_caption_is_drawn_once_per_seed_as_imagine_draws_it(tiny_pipeline, tiny_model_dir, tmp_path):
    caption = "An engraving depicting a circle on the left"
    args = ["--model", str(tiny_model_dir), "--caption", caption, "--seeds", "3,4,9", "--batch_size", "2"]
    generate.main([*args, "--output_dir", str(tmp_path)])
    records = read_records(tmp_path)
    assert [(record["seed"], record["caption"]) for record in records] == [(3, caption), (4, caption), (9, caption)]
    expected = tiny_pipeline.imagine([caption, caption], seed=3).images + tiny_pipeline.imagine(caption, seed=9).images
    for record, image in zip(records, expected):
        assert np.abs(pixels(tmp_path / record["file"]) - np.asarray(image, dtype=np.int16)).max() <= 1


def test_a_picture_gets_its_caption_and_its_engraved_reconstruction(tiny_pipeline, tiny_model_dir, tmp_path):
    picture, _ = shape_picture("cross", "right", size=48)
    picture.save(tmp_path / "cross.png")
    generate.main(
        ["--model", str(tiny_model_dir), "--image", str(tmp_path / "cross.png"), "--output_dir", str(tmp_path)]
    )
    [record] = read_records(tmp_path)
    assert record["source"] == str(tmp_path / "cross.png")
    assert record["caption"] == tiny_pipeline.caption(picture)[0]
    assert Image.open(tmp_path / record["file"]).size == (32, 32)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--seeds", "9-x"], "is not a seed list"),
        (["--seeds", "5-2"], "must name seeds from 0"),
        (["--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--interpolate", "0", "1", "--steps", "1"], "--steps must be at least 2"),
    ],
)
def test_bad_arguments_stop_with_one_clear_sentence(tiny_model_dir, tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit):
        generate.main(["--model", str(tiny_model_dir), "--output_dir", str(tmp_path), *arguments])
    assert message in capsys.readouterr().err


def test_an_unreadable_picture_or_model_stops_with_one_clear_sentence(tiny_model_dir, tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(SystemExit, match="notes.jpg is not an image that can be read"):
        generate.main(
            ["--model", str(tiny_model_dir), "--image", str(tmp_path / "notes.jpg"), "--output_dir", str(tmp_path)]
        )
    with pytest.raises(SystemExit, match="Could not load an Engraving model from"):
        generate.main(["--model", str(tmp_path / "missing"), "--output_dir", str(tmp_path)])


def test_grid_captions_draw_the_accented_letters_and_dashes_of_real_titles():
    font = caption_font(16)
    # A letter the font lacks is drawn as a "missing glyph" box, the same for every such letter; U+0378 is unassigned.
    missing = np.asarray(font.getmask("\u0378"))
    for letter in "éè—’œ":
        assert not np.array_equal(np.asarray(font.getmask(letter)), missing), letter


def test_grid_captions_wrap_within_their_cell_and_keep_every_word():
    font = caption_font(12)
    captions = [
        "An engraving depicting a large windmill in the centre, among hills under a stormy sky beneath a crescent "
        "moon",
        "Mmmm WWWW mmmm WWWW Mmmm WWWW iiii llll iiii",
        "Abbé Cosette — an unbreakablewordwiderthanthecellbyfar",
    ]
    for caption in captions:
        lines = wrap_caption(caption, font, 120)
        assert " ".join(lines) == " ".join(caption.split())
        assert all(font.getlength(line) <= 120 for line in lines if " " in line)
        # Greedy: no line could have taken the next line's first word.
        assert all(font.getlength(f"{line} {after.split()[0]}") > 120 for line, after in zip(lines, lines[1:]))
