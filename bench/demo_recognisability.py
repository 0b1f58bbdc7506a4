"""
Does a demo model draw what its captions say? A small CNN, trained here on freshly rendered demo scenes (with blur,
so a soft sample is still read), names the main subject (ship, lighthouse, tower, house, tree, windmill, bridge) and
its position (left, centre, right) in:

- held-out renders: the classifier's own ceiling;
- the model's reconstructions of those renders, against the renders' labels: what the autoencoder keeps;
- the model's captions of those renders: whether they name the rendered subject and position (no classifier);
- the model's seed samples, against the subject and position their own caption names;
- the engravings the model draws for held-out captions (`imagine`), against those captions.

"Chance" is the agreement expected if the images said nothing about the captions: the sum over classes of the caption
share times the prediction share. Writes nothing but an optional JSON summary.

    python bench/demo_recognisability.py --model outputs/demo/model --num_samples 200
    python bench/demo_recognisability.py --model outputs/demo/model --adapter outputs/lora/model   # a LoRA adapter
"""

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from demo_scenes import POSITION_PHRASES, SUBJECTS, caption_subject_and_position, render_scene  # noqa: E402
from pipeline_engraving import EngravingPipeline, images_to_pixel_values  # noqa: E402


POSITIONS = tuple(POSITION_PHRASES)
# Render seeds far above prepare_dataset.py's demo seeds, so the classifier and the held-out renders are unseen scenes.
FIRST_RENDER_SEED = 10_000_000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Subject and position agreement of a demo model's images and captions."
    )
    parser.add_argument("--model", required=True, help="A demo model folder written by train.py (with its tokenizer).")
    parser.add_argument(
        "--adapter", default=None, help="A LoRA adapter of --model written by train.py --lora_rank, to measure."
    )
    parser.add_argument("--num_samples", type=int, default=200, help="Seed samples per row (seeds 0..N-1).")
    parser.add_argument("--num_train_renders", type=int, default=6000, help="Renders the classifier trains on.")
    parser.add_argument(
        "--num_heldout_renders", type=int, default=500, help="Held-out renders (ceiling and reconstructions)."
    )
    parser.add_argument("--classifier_epochs", type=int, default=6, help="Classifier training epochs.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the classifier's initialisation and augmentation.")
    parser.add_argument("--output_json", default=None, help="Optional path for a JSON summary.")
    return parser.parse_args(argv)


def render_labelled(seeds, image_size):
    """Pixel values in [-1, 1], (subject, position) class indices and captions of the demo scenes of `seeds`."""
    images, subjects, positions, captions = [], [], [], []
    for seed in seeds:
        image, caption = render_scene(seed, image_size)
        subject, position = caption_subject_and_position(caption)
        images.append(image)
        subjects.append(SUBJECTS.index(subject))
        positions.append(POSITIONS.index(position))
        captions.append(caption)
    return images_to_pixel_values(images, image_size), torch.tensor(subjects), torch.tensor(positions), captions


class SubjectClassifier(nn.Module):
    """Four stride-2 convolutions, global average pooling, and one linear head per attribute (GroupNorm, not
    BatchNorm: running batch statistics of mostly blurred batches would misread sharp images)."""

    def __init__(self, width=32):
        super().__init__()
        layers, channels = [], 3
        for out_channels in (width, width * 2, width * 4, width * 4):
            layers += [
                nn.Conv2d(channels, out_channels, 3, stride=2, padding=1),
                nn.GroupNorm(8, out_channels),
                nn.ReLU(),
            ]
            channels = out_channels
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.subject_head = nn.Linear(channels, len(SUBJECTS))
        self.position_head = nn.Linear(channels, len(POSITIONS))

    def forward(self, pixel_values):
        features = self.features(pixel_values)
        return self.subject_head(features), self.position_head(features)

    @torch.no_grad()
    def predict(self, pixel_values, batch_size=256):
        self.eval()
        logits = [self(chunk) for chunk in pixel_values.split(batch_size)]
        return torch.cat([s for s, _ in logits]).argmax(-1), torch.cat([p for _, p in logits]).argmax(-1)


def blur_randomly(pixel_values, generator):
    """Gaussian blur of a random strength per batch (sometimes none), so that soft model outputs are still read."""
    sigma = float(torch.empty(1).uniform_(0.0, 2.0, generator=generator))
    if sigma < 0.3:
        return pixel_values
    kernel = 2 * int(3 * sigma) + 1
    return gaussian_blur(pixel_values, [kernel, kernel], [sigma, sigma])


def train_classifier(pixel_values, subjects, positions, epochs, seed, batch_size=64):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    classifier = SubjectClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=2e-3, total_steps=epochs * ((len(pixel_values) + batch_size - 1) // batch_size)
    )
    classifier.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(pixel_values), generator=generator).split(batch_size):
            subject_logits, position_logits = classifier(blur_randomly(pixel_values[batch], generator))
            loss = F.cross_entropy(subject_logits, subjects[batch]) + F.cross_entropy(
                position_logits, positions[batch]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return classifier


def agreement(classifier, pixel_values, subjects, positions):
    """Shares of images whose predicted subject, position, and both, match the labels; and the subject's chance."""
    if len(subjects) == 0:
        nan_shares = dict.fromkeys(("subject", "position", "subject_and_position", "subject_chance"), float("nan"))
        return nan_shares | {"subject_by_class": {}, "misread_as": {}, "count": 0}
    predicted_subjects, predicted_positions = classifier.predict(pixel_values)
    subject_match, position_match = predicted_subjects == subjects, predicted_positions == positions
    label_share = torch.bincount(subjects, minlength=len(SUBJECTS)).float() / len(subjects)
    prediction_share = torch.bincount(predicted_subjects, minlength=len(SUBJECTS)).float() / len(subjects)
    by_subject = {
        name: subject_match[subjects == index].float().mean().item()
        for index, name in enumerate(SUBJECTS)
        if (subjects == index).any()
    }
    misread = Counter(
        f"{SUBJECTS[label]} -> {SUBJECTS[predicted]}"
        for label, predicted in zip(subjects.tolist(), predicted_subjects.tolist())
        if label != predicted
    )
    return {
        "subject": subject_match.float().mean().item(),
        "subject_by_class": by_subject,
        "misread_as": dict(misread.most_common()),
        "position": position_match.float().mean().item(),
        "subject_and_position": (subject_match & position_match).float().mean().item(),
        "subject_chance": (label_share * prediction_share).sum().item(),
        "count": len(subjects),
    }


def caption_agreement(captions, subjects, positions):
    """
    Shares of `captions` (the model's captions of labelled renders) that name the labelled subject, position and both,
    in `agreement`'s format; a caption naming no subject counts as a miss.
    """
    named = [caption_subject_and_position(caption) for caption in captions]
    named_subjects = torch.tensor([SUBJECTS.index(s) if s else -1 for s, _ in named])
    named_positions = torch.tensor([POSITIONS.index(p) if p else -1 for _, p in named])
    subject_match, position_match = named_subjects == subjects, named_positions == positions
    label_share = torch.bincount(subjects, minlength=len(SUBJECTS)).float() / len(subjects)
    named_share = torch.bincount(named_subjects.clamp(min=0), minlength=len(SUBJECTS)).float() / len(subjects)
    misread = Counter(
        f"{SUBJECTS[label]} -> {SUBJECTS[name] if name >= 0 else 'none'}"
        for label, name in zip(subjects.tolist(), named_subjects.tolist())
        if label != name
    )
    return {
        "subject": subject_match.float().mean().item(),
        "subject_by_class": {
            name: subject_match[subjects == index].float().mean().item()
            for index, name in enumerate(SUBJECTS)
            if (subjects == index).any()
        },
        "misread_as": dict(misread.most_common()),
        "position": position_match.float().mean().item(),
        "subject_and_position": (subject_match & position_match).float().mean().item(),
        "subject_chance": (label_share * named_share).sum().item(),
        "count": len(subjects),
    }


def labelled_images(images, captions, image_size):
    """Pixel values and (subject, position) labels of the images whose caption names both, and that share of them."""
    labels = [caption_subject_and_position(caption) for caption in captions]
    named = [i for i, (subject, position) in enumerate(labels) if subject and position]
    pixel_values = (
        images_to_pixel_values([images[i] for i in named], image_size)
        if named
        else torch.empty(0, 3, image_size, image_size)
    )
    subjects = torch.tensor([SUBJECTS.index(labels[i][0]) for i in named], dtype=torch.long)
    positions = torch.tensor([POSITIONS.index(labels[i][1]) for i in named], dtype=torch.long)
    return pixel_values, subjects, positions, len(named) / max(1, len(captions))


def sample_rows(pipeline, classifier, num_samples, heldout_captions):
    """
    Agreement of seed samples with the captions written for them, and of the engravings `imagine` draws for held-out
    captions with those captions.
    """
    size = pipeline.model.config.image_size
    seeds = pipeline(seeds=list(range(num_samples)))
    imagined = pipeline.imagine(heldout_captions[:num_samples], seed=0)
    rows = {}
    for name, output in (("seed samples, own captions", seeds), ("caption -> engraving (imagine)", imagined)):
        *labelled, share = labelled_images(output.images, output.captions, size)
        rows[name] = {**agreement(classifier, *labelled), "captions_naming_both": share}
    # Every seed sample, whatever its caption says: which subject the classifier reads, and which its caption names.
    read = classifier.predict(images_to_pixel_values(seeds.images, size))[0]
    named = Counter(caption_subject_and_position(caption)[0] for caption in seeds.captions)
    rows["seed samples, own captions"]["read_as"] = {
        s: (read == i).float().mean().item() for i, s in enumerate(SUBJECTS)
    }
    rows["seed samples, own captions"]["named"] = {subject: named[subject] / num_samples for subject in SUBJECTS}
    return rows


def main(args):
    started = time.perf_counter()
    torch.set_grad_enabled(True)
    pipeline = EngravingPipeline.from_pretrained(args.model, adapter_id=args.adapter)
    model = pipeline.model
    image_size = model.config.image_size

    train_seeds = range(FIRST_RENDER_SEED, FIRST_RENDER_SEED + args.num_train_renders)
    heldout_seeds = range(train_seeds.stop, train_seeds.stop + args.num_heldout_renders)
    classifier = train_classifier(*render_labelled(train_seeds, image_size)[:3], args.classifier_epochs, args.seed)

    heldout_pixel_values, heldout_subjects, heldout_positions, heldout_captions = render_labelled(
        heldout_seeds, image_size
    )
    with torch.no_grad():
        reconstructions = torch.cat(
            [model.decode_latents(model.encode_images(chunk)).clamp(-1, 1) for chunk in heldout_pixel_values.split(64)]
        )
    captions = [
        caption for chunk in heldout_pixel_values.split(64) for caption in pipeline.caption_pixel_values(chunk)
    ]
    rows = {
        "held-out renders (ceiling)": agreement(classifier, heldout_pixel_values, heldout_subjects, heldout_positions),
        "reconstructions of them": agreement(classifier, reconstructions, heldout_subjects, heldout_positions),
        "captions of them (subject named)": caption_agreement(captions, heldout_subjects, heldout_positions),
        **sample_rows(pipeline, classifier, args.num_samples, heldout_captions),
    }

    name = f"{args.model} + {args.adapter}" if args.adapter else args.model
    print(f"\n{name}: {image_size} px, {time.perf_counter() - started:.0f} s\n")
    print("| images | subject | position | both | subject by chance | n |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['subject']:.1%} | {row['position']:.1%} | {row['subject_and_position']:.1%} "
            f"| {row['subject_chance']:.1%} | {row['count']} |"
        )
    print("\nSubject agreement per class (labels: the renders' captions, or each sample's own caption)\n")
    print("| images | " + " | ".join(SUBJECTS) + " |")
    print("|---|" + "---:|" * len(SUBJECTS))
    for name, row in rows.items():
        shares = [row["subject_by_class"].get(subject) for subject in SUBJECTS]
        print(f"| {name} | " + " | ".join("" if share is None else f"{share:.0%}" for share in shares) + " |")
    print(f"\nShare of all {args.num_samples} seed samples read as each subject, and whose caption names it\n")
    print("| seed samples | " + " | ".join(SUBJECTS) + " |")
    print("|---|" + "---:|" * len(SUBJECTS))
    seed_row = rows["seed samples, own captions"]
    for name, key in (("read as", "read_as"), ("caption names", "named")):
        print(f"| {name} | " + " | ".join(f"{seed_row[key].get(subject, 0):.0%}" for subject in SUBJECTS) + " |")
    misread = rows["seed samples, own captions"]["misread_as"]
    print("\nSeed samples whose subject was misread (caption's subject -> what the classifier saw): ", end="")
    print(", ".join(f"{pair} {count}" for pair, count in list(misread.items())[:8]) or "none")
    if args.output_json:
        summary = {"model": args.model, "adapter": args.adapter, "rows": rows}
        Path(args.output_json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(parse_args())
