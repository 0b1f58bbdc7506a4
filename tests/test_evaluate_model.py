"""evaluate_model.py and its metrics: each metric is checked on inputs whose answer is known, then on a tiny model."""

import json
import math
import os
import subprocess
import sys

import evaluate
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, shape_pairs
from PIL import Image, ImageFilter

from engraving_features import (
    ImageFeatureExtractor,
    SentenceEmbedder,
    images_to_uint8_batch,
    kernel_inception_distance,
)
from evaluate_model import (
    caption_neighbour_agreement,
    load_eval_splits,
    main,
    memorisation,
    near_copy_threshold,
    parse_args,
)


def load_metric(name):
    return evaluate.load(str(REPO_ROOT / "metrics" / name))


@pytest.fixture(scope="module")
def extractor():
    return ImageFeatureExtractor(prefer_inception=False)


def shifted_shape_pictures(count, seed):
    """`count` light-paper shape engravings at 64 px, each shifted by a random few pixels: the 'real' distribution."""
    rng = np.random.default_rng(seed)
    pictures = [image for image, _ in shape_pairs(64)]
    return [
        Image.fromarray(
            np.roll(np.asarray(pictures[rng.integers(len(pictures))]), rng.integers(-6, 7, size=2), axis=(0, 1))
        )
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def real_pictures():
    return shifted_shape_pictures(24, seed=0)


def gaussian_features(count, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(loc=shift, size=(count, 32)).astype(np.float32)


def test_kid_is_about_zero_for_one_distribution_and_large_for_a_shifted_one():
    kid = load_metric("kid")
    same = kid.compute(predictions=gaussian_features(300, seed=1), real_features=gaussian_features(250, seed=2))
    shifted = kid.compute(
        predictions=gaussian_features(300, shift=0.5, seed=1), real_features=gaussian_features(250, seed=2)
    )
    assert shifted["kid"] > 0.1
    assert abs(same["kid"]) < 0.05 * shifted["kid"]
    assert shifted["kid_x1000"] == pytest.approx(1000 * shifted["kid"])
    assert same["subset_size"] == 100


def test_kid_uses_smaller_subsets_when_there_are_fewer_samples():
    result = load_metric("kid").compute(predictions=gaussian_features(12), real_features=gaussian_features(40, seed=3))
    assert result["subset_size"] == 12


def test_training_kid_is_the_evaluation_kid():
    """train.py's KID clock (no `evaluate` on a bare GPU image) and evaluate_model.py's metric module agree exactly."""
    generated, real = gaussian_features(60, shift=0.3), gaussian_features(50, seed=3)
    metric = load_metric("kid").compute(
        predictions=generated, real_features=real, subset_size=40, num_subsets=20, seed=5
    )
    kid, kid_std = kernel_inception_distance(
        torch.from_numpy(generated), torch.from_numpy(real), subset_size=40, num_subsets=20, seed=5
    )
    assert kid == pytest.approx(metric["kid"], rel=1e-9) and kid_std == pytest.approx(metric["kid_std"], rel=1e-9)
    assert kid > 0


def test_fid_is_zero_for_identical_sets_and_exact_for_shifted_and_scaled_ones():
    fid = load_metric("fid")
    real = gaussian_features(400, seed=2)
    assert fid.compute(predictions=real, real_features=real)["fid"] == pytest.approx(0.0, abs=1e-6)
    # The same points moved by 0.5 in each of 32 dimensions: identical covariances, so FID = 32 * 0.25.
    assert fid.compute(predictions=real + 0.5, real_features=real)["fid"] == pytest.approx(8.0, rel=1e-6)
    # Scaled by 2: S' = 4 S, so the cross term is 2 tr(S) twice over and FID = |mu|^2 + tr(S) exactly.
    expected = np.square(real.astype(np.float64).mean(0)).sum() + real.astype(np.float64).var(0, ddof=1).sum()
    assert fid.compute(predictions=2 * real, real_features=real)["fid"] == pytest.approx(expected, rel=1e-6)


def test_noise_and_grey_images_score_far_worse_kid_than_real_pictures(extractor, real_pictures):
    kid = load_metric("kid")
    rng = np.random.default_rng(0)
    real_features = extractor(shifted_shape_pictures(24, seed=1)).numpy()

    def kid_x1000(images):
        return kid.compute(predictions=extractor(images).numpy(), real_features=real_features)["kid_x1000"]

    real = kid_x1000(real_pictures)
    noise = kid_x1000([Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(24)])
    grey = kid_x1000([Image.new("RGB", (64, 64), (128, 128, 128))] * 24)
    assert extractor(real_pictures[:2]).shape == (2, 1280)
    assert noise > 20 * abs(real) and grey > 20 * abs(real)
    assert abs(real) < 30


def test_onnxruntime_features_equal_the_pytorch_features(extractor, real_pictures):
    pixels = images_to_uint8_batch(real_pictures[:4], extractor.network.input_size)
    with torch.inference_mode():
        expected = extractor.network(pixels)
    assert extractor.backend == "onnxruntime"
    torch.testing.assert_close(extractor.run(pixels), expected, atol=1e-3, rtol=1e-3)


def test_blurred_images_have_a_lower_high_frequency_share(real_pictures):
    high_frequency = load_metric("high_frequency_energy")
    crisp = high_frequency.compute(predictions=real_pictures[:8])["high_frequency_share"]
    blurred = high_frequency.compute(predictions=[p.filter(ImageFilter.GaussianBlur(2)) for p in real_pictures[:8]])
    flat = high_frequency.compute(predictions=[Image.new("RGB", (64, 64), (200, 190, 170))])
    assert 0 < blurred["high_frequency_share"] < 0.5 * crisp < 1
    assert flat["high_frequency_share"] == 0.0


def test_reconstruction_scores_are_perfect_for_identical_images_and_drop_with_blur(real_pictures):
    reconstruction = load_metric("reconstruction")
    originals = real_pictures[:4]
    perfect = reconstruction.compute(predictions=originals, references=originals)
    blurred = reconstruction.compute(
        predictions=[p.filter(ImageFilter.GaussianBlur(3)) for p in originals], references=originals
    )
    assert perfect["psnr"] == pytest.approx(100.0) and perfect["ssim"] == pytest.approx(1.0)
    assert 5 < blurred["psnr"] < 40 and blurred["ssim"] < 0.95


def test_bleu_is_one_for_an_exact_caption_and_smoothed_and_length_penalised_otherwise():
    bleu = load_metric("bleu")
    exact = bleu.compute(
        predictions=["An engraving of a ship at sea."], references=[["An engraving of a ship at sea."]]
    )
    short = bleu.compute(
        predictions=["An engraving of a ship"], references=[["an engraving of a ship at sea", "a ship"]]
    )
    unrelated = bleu.compute(predictions=["Portrait of a bishop"], references=[["An engraving of a ship at sea"]])
    assert exact["bleu"] == pytest.approx(1.0)
    # Every n-gram matches; the closest reference has 7 words against 5: BP = exp(1 - 7/5).
    assert short["bleu"] == pytest.approx(math.exp(1 - 7 / 5))
    # "of", "a" and "of a" match: add-one precisions 3/5, 2/4, 1/3, 1/2 and BP = exp(1 - 7/4).
    assert unrelated["bleu"] == pytest.approx((3 / 5 * 2 / 4 * 1 / 3 * 1 / 2) ** 0.25 * math.exp(1 - 7 / 4))


def test_caption_quality_flags_missing_prefix_cut_off_endings_and_loops():
    quality = load_metric("caption_quality")
    result = quality.compute(
        predictions=[
            "An engraving of a ship at sea",
            "An engraving of a man with the",
            "A portrait of a bishop",
            "An engraving of the the church",
        ],
        training_captions=["An engraving of a ship  at sea"],
    )
    assert result["well_formed"] == 0.25
    assert (result["has_prefix"], result["clean_ending"], result["no_loop"]) == (0.75, 0.75, 0.75)
    assert result["copied"] == 0.25
    # Only the copy uses no word outside "an engraving of a ship at sea"; none is new and readable.
    assert (result["known_words"], result["novel_known_words"]) == (0.25, 0.0)
    recombined = quality.compute(
        predictions=["An engraving of a ship", "An engraving of a shpi"],
        training_captions=["An engraving of a ship at sea"],
    )
    assert (recombined["copied"], recombined["known_words"], recombined["novel_known_words"]) == (0.0, 0.5, 0.5)
    repeated = quality.compute(predictions=["An engraving of a ship"] * 4)
    assert repeated["distinct_1"] == pytest.approx(5 / 20) and repeated["distinct_2"] == pytest.approx(4 / 16)
    assert "copied" not in repeated


def test_retrieval_finds_every_partner_of_matching_embeddings_and_none_of_mismatched_ones():
    retrieval = load_metric("retrieval")
    embeddings = np.eye(8, dtype=np.float32)
    perfect = retrieval.compute(predictions=embeddings, references=embeddings)
    mismatched = retrieval.compute(predictions=embeddings, references=np.roll(embeddings, 1, axis=0))
    assert perfect["image_to_text_r1"] == perfect["text_to_image_r1"] == 1.0
    # Each image's partner now ranks second (a tie with six unrelated texts counts in its favour).
    assert mismatched["image_to_text_r1"] == mismatched["text_to_image_r1"] == 0.0
    assert mismatched["image_to_text_r5"] == 1.0


def test_memorisation_counts_copies_of_training_images_as_near_copies():
    train = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    threshold = near_copy_threshold(train, quantile=0.01)
    fresh = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    result = memorisation(torch.cat([train[:10] + 1e-4 * fresh, fresh]), train, threshold)
    assert result["near_copy_share"] == 0.5
    assert 0 < threshold < memorisation(fresh, train, threshold)["nearest_train_distance_mean"]


def test_generated_captions_agree_with_their_images_neighbours_more_than_shuffled_ones():
    captions = [caption for _, caption in shape_pairs()]
    embedder = SentenceEmbedder()
    caption_embeddings = embedder(captions)
    features = torch.eye(len(captions))
    agreement = caption_neighbour_agreement(caption_embeddings, features, features, caption_embeddings, k=1, seed=0)
    assert agreement["caption_agreement"] == pytest.approx(1.0, abs=1e-5)
    assert agreement["caption_agreement_gain"] > 0.01
    assert agreement["caption_agreement_shuffled"] < agreement["caption_agreement"]


def test_dataset_path_may_be_the_datasetdict_or_the_folder_that_holds_it(tiny_dataset_dir):
    for path in (tiny_dataset_dir, tiny_dataset_dir / "dataset"):
        validation, train = load_eval_splits(path, "validation", "train")
        assert (len(validation), len(train)) == (8, 24)


@pytest.mark.parametrize(
    "model, dataset, split, message",
    [
        ("missing_model", "data", "validation", "not a folder saved with `save_pretrained`"),
        ("model", "missing_data", "validation", "holds no dataset"),
        ("model", "data", "test", "has no `test` split"),
    ],
)
def test_bad_paths_and_splits_are_reported_in_one_sentence(
    tiny_model_dir, tiny_dataset_dir, tmp_path, model, dataset, split, message
):
    paths = {"model": tiny_model_dir, "data": tiny_dataset_dir}
    args = parse_args(
        [
            "--model",
            str(paths.get(model, tmp_path / model)),
            "--dataset_path",
            str(paths.get(dataset, tmp_path / dataset)),
            "--split",
            split,
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    with pytest.raises(SystemExit, match=message):
        main(args)


def test_report_of_a_tiny_model_has_every_metric_for_every_sampling_row_and_all_are_finite(
    tiny_model_dir, tiny_dataset_dir, tmp_path
):
    args = parse_args(
        [
            "--model",
            str(tiny_model_dir),
            "--dataset_path",
            str(tiny_dataset_dir),
            "--num_samples",
            "6",
            "--kid_num_subsets",
            "10",
            "--max_train_images",
            "12",
            "--output_dir",
            str(tmp_path),
            "--feature_extractor",
            "efficientnet-lite0",
        ]
    )
    main(args)
    report = json.loads((tmp_path / "report.json").read_text())

    assert report["feature_extractor"].startswith("efficientnet-lite0")
    assert set(report["sampling"]) == {"samples"}
    for row in report["sampling"].values():
        for key in (
            "fid",
            "kid",
            "kid_x1000",
            "high_frequency_ratio",
            "caption_well_formed",
            "caption_distinct_1",
            "caption_distinct_2",
            "caption_copied",
            "caption_known_words",
            "caption_novel_known_words",
            "caption_agreement",
            "caption_agreement_shuffled",
            "caption_agreement_gain",
            "nearest_train_distance_mean",
            "near_copy_share",
        ):
            assert math.isfinite(row[key]), key
        assert len(row["example_captions"]) == 5
    for section, keys in {
        "reconstruction": ("psnr", "ssim", "fid", "kid_x1000", "high_frequency_ratio"),
        "validation_captions": ("bleu", "well_formed", "distinct_1", "distinct_2", "copied"),
        "retrieval": ("image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "text_to_image_r5"),
        "real_reference": ("high_frequency_share", "near_copy_threshold", "nearest_train_distance_mean"),
    }.items():
        for key in keys:
            assert math.isfinite(report[section][key]), f"{section}.{key}"
    assert report["retrieval"]["num_pairs"] == report["num_eval_images"] == 8
    assert "| kid_x1000 |" in (tmp_path / "report.md").read_text()
    assert report["caption_words"] == "model"


@pytest.mark.parametrize("caption_words", ["train", "none"])
def test_caption_words_keep_captions_to_the_training_split_or_free(
    caption_words, tiny_model_dir, tiny_dataset_dir, tmp_path
):
    """The tiny model is untrained: only the constraint keeps its token soup to words of the training captions."""
    args = parse_args(
        [
            "--model",
            str(tiny_model_dir),
            "--dataset_path",
            str(tiny_dataset_dir),
            "--num_samples",
            "6",
            "--kid_num_subsets",
            "10",
            "--max_train_images",
            "12",
            "--output_dir",
            str(tmp_path),
            "--feature_extractor",
            "efficientnet-lite0",
            "--caption_words",
            caption_words,
        ]
    )
    report = main(args)
    assert report["caption_words"] == caption_words
    known = [row["caption_known_words"] for row in report["sampling"].values()]
    assert all(share == 1.0 for share in known) if caption_words == "train" else all(share < 1.0 for share in known)


def test_outputs_saved_without_the_metric_libraries_score_like_a_direct_run(
    tiny_model_dir, tiny_dataset_dir, tiny_image_folder_dir, without_datasets_library, tmp_path
):
    """The GPU-side half (no `datasets` or `evaluate`, ImageFolder data) and scoring give the direct report."""
    common = [
        "--num_samples",
        "6",
        "--kid_num_subsets",
        "10",
        "--max_train_images",
        "12",
        "--feature_extractor",
        "efficientnet-lite0",
        "--jpeg_quality",
        "100",
    ]
    saved = tmp_path / "outputs.npz"
    command = [
        sys.executable,
        str(REPO_ROOT / "evaluate_model.py"),
        "--model",
        str(tiny_model_dir),
        "--dataset_path",
        str(tiny_image_folder_dir),
        "--save_model_outputs",
        str(saved),
        "--no_scoring",
        *common,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **without_datasets_library}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    direct = main(
        parse_args(
            [
                "--model",
                str(tiny_model_dir),
                "--dataset_path",
                str(tiny_dataset_dir),
                "--output_dir",
                str(tmp_path / "direct"),
                *common,
            ]
        )
    )
    scored = main(
        parse_args(
            [
                "--model_outputs",
                str(saved),
                "--dataset_path",
                str(tiny_dataset_dir),
                "--output_dir",
                str(tmp_path / "scored"),
                *common,
            ]
        )
    )

    assert scored["retrieval"] == direct["retrieval"]
    assert scored["validation_captions"] == direct["validation_captions"]
    for row in ("samples",):
        assert scored["sampling"][row]["example_captions"] == direct["sampling"][row]["example_captions"]
        # The images travel as JPEG (quality 100 here): the scores move by rounding, not more. The untrained tiny
        # generator draws a near-flat grey whose few levels JPEG moves relatively far, and 6 samples make KID noisy.
        for key in ("kid_x1000", "high_frequency_ratio", "caption_agreement"):
            assert scored["sampling"][row][key] == pytest.approx(direct["sampling"][row][key], rel=0.1, abs=1.0), key
    assert scored["reconstruction"]["psnr"] == pytest.approx(direct["reconstruction"]["psnr"], abs=1.0)


def test_model_and_model_outputs_are_exclusive(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--dataset_path", str(tmp_path)])
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--model_outputs", "o.npz", "--dataset_path", str(tmp_path)])
