"""prepare_dataset.py on a tiny fixture folder holding every kind of bad file, plus good ones: offline, in seconds."""

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from datasets import load_dataset, load_from_disk
from PIL import Image


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import prepare_dataset  # noqa: E402
from demo_scenes import render_scene, scene_subject  # noqa: E402


IMAGE_SIZE = 48


def engraving(seed, size=96, aspect=1.0):
    image, _ = render_scene(seed, size)
    return image.resize((size, round(size / aspect)))


def decompression_bomb_png():
    """A few-byte PNG whose header claims 30000 x 30000 pixels."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 200).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", 30000, 30000) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A Kaggle-like tree: 8 kept images in odd modes, 2 duplicates, 8 bad files, and a notes file to ignore."""
    root = tmp_path_factory.mktemp("source")
    classes = root / "dataset_updated" / "training_set"
    engravings, paintings = classes / "engraving", classes / "painting"
    engravings.mkdir(parents=True)
    paintings.mkdir(parents=True)

    engraving(1).save(engravings / "plain.jpg", quality=95)
    engraving(2, size=256, aspect=2.0).save(engravings / "wide.png")
    engraving(3).convert("P", palette=Image.Palette.ADAPTIVE).save(engravings / "palette.png")
    rgba = engraving(4).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0).resize(rgba.size))
    rgba.paste(engraving(4).crop((20, 20, 76, 76)), (20, 20))
    rgba.save(engravings / "alpha.png")
    engraving(5).convert("CMYK").save(engravings / "cmyk.jpg")
    sixteen = (np.asarray(engraving(6).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(engravings / "sixteen_bit.png")
    rotated = engraving(7, size=96, aspect=1.5)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(engravings / "exif_rotated.jpg", exif=exif, quality=95)
    engraving(8).save(paintings / "painting.png")

    (engravings / "plain_copy.jpg").write_bytes((engravings / "plain.jpg").read_bytes())
    engraving(2, size=256, aspect=2.0).resize((230, 115)).save(engravings / "wide_resaved.jpg", quality=90)

    (engravings / "empty.jpg").write_bytes(b"")
    (engravings / "text.png").write_text("this is not an image")
    jpeg = io.BytesIO()
    engraving(9).save(jpeg, format="JPEG", quality=95)
    (engravings / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (engravings / "bomb.png").write_bytes(decompression_bomb_png())
    frames = [engraving(10), engraving(11)]
    frames[0].save(engravings / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    engraving(12, size=20).save(engravings / "tiny.png")
    (engravings / "broken_link.png").symlink_to(engravings / "missing.png")
    (engravings / "notes.txt").write_text("not a candidate image")

    metadata = root / "metadata.csv"
    metadata.write_text(
        "file_name,title,source,description\n"
        'dataset_updated/training_set/engraving/plain.jpg,"  ""The   Knight of La Mancha."" ",dore_quixote,\n'
        "wide.png,,dore_quixote,\n"
        "dataset_updated/training_set/engraving/palette.png,,,A quiet harbour at dusk.\n"
    )
    return root


def run_prepare(*argv):
    prepare_dataset.main(prepare_dataset.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("prepared")
    run_prepare(
        "--source",
        source,
        "--metadata",
        source / "metadata.csv",
        "--output_dir",
        output_dir,
        "--image_size",
        IMAGE_SIZE,
        "--min_size",
        32,
        "--num_proc",
        2,
        "--val_fraction",
        0.25,
    )
    return output_dir


def read_json(path):
    return json.loads(Path(path).read_text())


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_every_file_is_accounted_for_in_the_report(prepared):
    report = read_json(prepared / "report.json")
    reasons = {Path(entry["path"]).name: entry["reason"].split(":")[0] for entry in report["skipped"]}
    assert reasons == {
        "plain_copy.jpg": "exact duplicate",
        "wide_resaved.jpg": "near duplicate",
        "empty.jpg": "empty file",
        "text.png": "not an image",
        "truncated.jpg": "truncated",
        "bomb.png": "decompression bomb",
        "animated.gif": "animated",
        "tiny.png": "too small",
        "broken_link.png": "unreadable",
    }
    duplicate_of = {
        Path(e["path"]).name: Path(e["duplicate_of"]).name for e in report["skipped"] if "duplicate_of" in e
    }
    assert duplicate_of == {"plain_copy.jpg": "plain.jpg", "wide_resaved.jpg": "wide.png"}
    assert report["total_files"] == 17
    # The printed summary gives each reason a sentence of its own.
    assert all(reason in prepare_dataset.SKIP_REASONS for reason in report["skipped_by_reason"])
    assert prepare_dataset.skip_summary({"too small": 2}) == [
        "2 skipped, too small: the image's shorter side is below --min_size."
    ]
    assert report["kept"] == 8
    assert report["kept"] + len(report["skipped"]) == report["total_files"]
    assert sorted(Path(p).name for p in report["ignored_non_image_files"]) == ["metadata.csv", "notes.txt"]
    images = [p.name for split in ("train", "validation") for p in (prepared / split).iterdir()]
    assert len(images) == report["kept"] + 2, "one image per kept file, plus a metadata.jsonl per split"


def test_include_class_keeps_only_files_under_that_folder(source, tmp_path):
    run_prepare(
        "--source",
        source,
        "--include_class",
        "PAINTING",
        "--output_dir",
        tmp_path,
        "--image_size",
        IMAGE_SIZE,
        "--min_size",
        32,
        "--captioner",
        "none",
    )
    report = read_json(tmp_path / "report.json")
    assert (report["total_files"], report["kept"]) == (1, 1)


def test_odd_modes_and_exif_rotation_become_square_rgb(prepared):
    per_image = read_json(prepared / "metadata" / "engraving_metadata.json")
    by_source = {Path(entry["source_path"]).name: (name, entry) for name, entry in per_image.items()}
    for name, _ in by_source.values():
        image = Image.open(prepared / name)
        assert (image.mode, image.size) == ("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    assert by_source["exif_rotated.jpg"][1]["original_size"] == [64, 96]
    left, top, right, bottom = by_source["exif_rotated.jpg"][1]["padding_box"]
    assert bottom - top > right - left
    sixteen = np.asarray(Image.open(prepared / by_source["sixteen_bit.png"][0]))
    eight = np.asarray(engraving(6).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE)))
    assert abs(sixteen.mean() - eight.mean()) < 10


def test_padding_keeps_the_aspect_ratio_and_uses_the_paper_tone(prepared):
    per_image = read_json(prepared / "metadata" / "engraving_metadata.json")
    name, entry = next((n, e) for n, e in per_image.items() if e["source_path"].endswith("wide.png"))
    left, top, right, bottom = entry["padding_box"]
    width, height = entry["original_size"]
    assert (right - left) / (bottom - top) == pytest.approx(width / height, rel=0.05)
    pixels = np.asarray(Image.open(prepared / name))
    padding = pixels[: top - 1].reshape(-1, 3)
    assert padding.min() > 150, "padding must be the paper tone, not black"
    assert np.abs(padding.astype(int) - padding[0]).max() == 0


def test_split_is_deterministic_and_ninety_ten():
    records = [{"sha256": f"{i * 7919 % 1000:03d}" + "0" * 61, "path": str(i)} for i in range(50)]
    train, validation = prepare_dataset.split_by_hash(records, 0.1)
    again_train, again_validation = prepare_dataset.split_by_hash(records[::-1], 0.1)
    assert (len(train), len(validation)) == (45, 5)
    assert {r["path"] for r in validation} == {r["path"] for r in again_validation}
    assert {r["path"] for r in validation} == {r["path"] for r in sorted(records, key=lambda r: r["sha256"])[:5]}


def test_jsonl_imagefolder_and_datasetdict_agree(prepared):
    saved = load_from_disk(str(prepared / "dataset"))
    folder = load_dataset("imagefolder", data_dir=str(prepared))
    assert set(saved) == set(folder) == {"train", "validation"}
    assert (saved["train"].num_rows, saved["validation"].num_rows) == (6, 2)
    for split, short in (("train", "train"), ("validation", "val")):
        lines = {row["sha256"]: row for row in read_jsonl(prepared / "captions" / f"engraving_{short}.jsonl")}
        folder_rows = {row["sha256"]: row for row in folder[split]}
        assert set(lines) == set(folder_rows) == set(saved[split]["sha256"])
        for row in saved[split]:
            line, folder_row = lines[row["sha256"]], folder_rows[row["sha256"]]
            for column in ("caption", "title", "source", "original_size"):
                assert row[column] == line[column] == folder_row[column]
            assert np.array_equal(np.asarray(row["image"]), np.asarray(folder_row["image"]))
            assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(prepared / line["file_name"])))


def test_metadata_captions_use_the_title_then_the_book_then_the_description(prepared):
    caption = prepare_dataset.metadata_caption
    assert caption({"title": '  "The   Knight of La Mancha." '}) == "An engraving depicting the Knight of La Mancha"
    assert caption({"title": 'Moses and the “Bulrushers"'}) == "An engraving depicting Moses and the Bulrushers"
    assert caption({"title": "I Knew I Wasn’T Mistaken"}) == "An engraving depicting I Knew I Wasn’t Mistaken"
    assert caption({"title": "", "source": "dore_quixote"}) == "An engraving from Don Quixote"
    assert caption({"source": "my_old_book"}) == "An engraving from My Old Book"
    assert caption({"description": "A quiet harbour at dusk."}) == "An engraving depicting a quiet harbour at dusk"
    assert caption({}) == "An engraving depicting an untitled scene"
    captions = {
        row["sha256"]: row
        for name in ("train", "val")
        for row in read_jsonl(prepared / "captions" / f"engraving_{name}.jsonl")
    }
    per_image = read_json(prepared / "metadata" / "engraving_metadata.json")
    by_source = {Path(e["source_path"]).name: captions[e["sha256"]] for e in per_image.values()}
    assert by_source["plain.jpg"]["caption"] == "An engraving depicting the Knight of La Mancha"
    assert by_source["plain.jpg"]["title"] == "The Knight of La Mancha"
    assert by_source["wide.png"]["caption"] == "An engraving from Don Quixote"
    assert by_source["palette.png"]["caption"] == "An engraving depicting a quiet harbour at dusk"
    assert by_source["cmyk.jpg"]["caption"] == "An engraving depicting an untitled scene"


def test_stats_and_card_describe_the_kept_images(prepared):
    stats = read_json(prepared / "stats.json")
    assert stats["count"] == 8
    assert len(stats["channel_mean"]) == len(stats["channel_std"]) == 3
    assert 0 < stats["ink_coverage"]["median"] < 1
    card = (prepared / "README.md").read_text()
    header = card.split("---")[1]
    for key in ("license:", "task_categories:", "size_categories:", "pretty_name:"):
        assert key in header
    assert "n<1K" in header and "8 engravings" in card


def tiny_blip2(folder):
    """A randomly initialised BLIP-2 with a 13-word tokenizer, saved with its processor like a real checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    words = "</s> <pad> <unk> an engraving depicting a ship tower sea moon of the".split()
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=4)
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**tiny, image_size=32, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(**tiny, encoder_hidden_size=16, vocab_size=len(tokenizer)).to_dict(),
        text_config=OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        ).to_dict(),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_blip2_captioner_runs_batched_and_resumes_from_its_cache(tmp_path):
    model_dir = tiny_blip2(tmp_path / "blip2")
    output_dir = tmp_path / "out"
    common = (
        "--source",
        "demo",
        "--num_images",
        5,
        "--image_size",
        32,
        "--min_size",
        8,
        "--output_dir",
        output_dir,
        "--captioner",
        "blip2",
        "--caption_batch_size",
        2,
        "--max_caption_tokens",
        4,
    )
    run_prepare(*common, "--captioner_model", model_dir)
    cache = read_jsonl(output_dir / "captions" / "blip2_cache.jsonl")
    assert len(cache) == 5
    saved = load_from_disk(str(output_dir / "dataset"))
    captions = list(saved["train"]["caption"]) + list(saved["validation"]["caption"])
    assert all(c.startswith("An engraving depicting ") and c == c[0] + c[1:].lower() for c in captions)
    assert {c["caption"] for c in cache} == set(captions)

    run_prepare(*common, "--captioner_model", tmp_path / "no_model_needed_when_everything_is_cached")
    assert read_jsonl(output_dir / "captions" / "blip2_cache.jsonl") == cache


def test_blip2_captions_are_normalised():
    normalise = prepare_dataset.normalise_caption
    assert (
        normalise("An Engraving Depicting a ship a ship a ship at sea at sea")
        == "An engraving depicting a ship at sea"
    )
    assert normalise("  A TOWER ON A HILL.  ") == "An engraving depicting a tower on a hill"


def test_push_to_hub_dry_run_lists_the_exact_files(prepared, capsys, source):
    run_prepare(
        "--source",
        source,
        "--metadata",
        source / "metadata.csv",
        "--output_dir",
        prepared,
        "--image_size",
        IMAGE_SIZE,
        "--min_size",
        32,
        "--val_fraction",
        0.25,
        "--push_to_hub",
        "someone/engravings",
        "--dry_run",
    )
    printed = capsys.readouterr().out.split("Dry run: would upload 3 files to the dataset repo someone/engravings:\n")
    listed = [line.strip() for line in printed[1].splitlines()]
    assert listed == ["README.md", "data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet"]


def test_push_to_hub_offline_fails_with_one_sentence_after_the_local_outputs(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "prepare_dataset.py"),
            "--source",
            "demo",
            "--num_images",
            "4",
            "--image_size",
            "32",
            "--min_size",
            "8",
            "--output_dir",
            str(tmp_path),
            "--push_to_hub",
            "someone/engravings",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: Could not push to the Hub dataset repo someone/engravings")
    assert "Traceback" not in result.stderr
    assert load_from_disk(str(tmp_path / "dataset"))["train"].num_rows + 1 == 4


def test_kaggle_source_is_read_from_the_kagglehub_cache(source, tmp_path, monkeypatch):
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_dataset_handle

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    handle = parse_dataset_handle("someone/art-images/versions/1")
    downloaded = Path(Cache().get_path(handle)) / "dataset_updated" / "training_set" / "engraving"
    downloaded.mkdir(parents=True)
    for name in ("plain.jpg", "wide.png"):
        (downloaded / name).write_bytes(
            (source / "dataset_updated" / "training_set" / "engraving" / name).read_bytes()
        )
    Cache().mark_as_complete(handle)
    run_prepare(
        "--source",
        "kaggle:someone/art-images/versions/1",
        "--include_class",
        "engraving",
        "--output_dir",
        tmp_path / "out",
        "--image_size",
        IMAGE_SIZE,
        "--min_size",
        32,
    )
    assert read_json(tmp_path / "out" / "report.json")["kept"] == 2


def test_hf_source_is_read_with_load_dataset_and_keeps_its_text_columns(tmp_path):
    hub_copy = tmp_path / "hub_copy"
    (hub_copy / "train").mkdir(parents=True)
    for index in range(3):
        engraving(20 + index).save(hub_copy / "train" / f"{index}.png")
    rows = [{"file_name": f"{index}.png", "title": f"Plate {index}"} for index in range(3)]
    (hub_copy / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    run_prepare(
        "--source", f"hf:{hub_copy}", "--output_dir", tmp_path / "out", "--image_size", IMAGE_SIZE, "--min_size", 32
    )
    saved = load_from_disk(str(tmp_path / "out" / "dataset"))
    captions = sorted(list(saved["train"]["caption"]) + list(saved["validation"]["caption"]))
    assert captions == [f"An engraving depicting Plate {index}" for index in range(3)]


@pytest.mark.parametrize("remote", ["kaggle:someone/art-images", "hf:someone/engravings"])
def test_remote_sources_fail_fast_offline_with_one_sentence(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    with pytest.raises(prepare_dataset.UserError) as error:
        run_prepare("--source", remote, "--output_dir", tmp_path / "out")
    assert time.perf_counter() - start < 20
    message = str(error.value)
    assert message.startswith("Cannot ") and message.count(". ") == 0 and message.endswith(".")


def test_demo_subject_options_keep_or_leave_out_one_subject_and_still_fill_num_images():
    def seeds(*flags):
        arguments = ["--source", "demo", "--output_dir", "unused", *flags]
        return prepare_dataset.demo_seeds(prepare_dataset.parse_args(arguments))

    windmills = seeds("--num_images", "6", "--only_subject", "windmill")
    others = seeds("--num_images", "40", "--exclude_subject", "windmill")
    assert len(windmills) == 6 and {scene_subject(seed) for seed in windmills} == {"windmill"}
    assert len(others) == 40 and "windmill" not in {scene_subject(seed) for seed in others}
    assert all(render_scene(seed, 32)[1].count("windmill") for seed in windmills)
    with pytest.raises(prepare_dataset.UserError, match="also excluded"):
        seeds("--only_subject", "ship", "--exclude_subject", "ship")
