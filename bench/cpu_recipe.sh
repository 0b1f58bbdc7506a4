#!/usr/bin/env bash
# The CPU recipe on real engravings: the `small` preset at 128 px for 23 minutes of training on 2 cores, then
# evaluate_model.py on the validation split (seed KID x1000, high-frequency ratio, memorisation, captions).
# With BASELINE_COMMIT set, the KL-VAE recipe of that commit (the image path before the GAN, as its README gave it)
# runs first in a git worktree, on the same data and machine, and is evaluated by that commit's evaluate_model.py:
# its seeds' KID without the detail bank is the "prior_no_detail" row of its report.
#
#   bash bench/cpu_recipe.sh data/engravings_128 runs/cpu_recipe
#   BASELINE_COMMIT=7ba7b86 bash bench/cpu_recipe.sh data/engravings_128 runs/cpu_recipe
#   BASELINE_COMMIT=7ba7b86 GAN_ARGS="--discriminator projected --pixel_head_weight 0.5" \
#       bash bench/cpu_recipe.sh data/engravings_128 runs/cpu_recipe
set -euo pipefail
DATA=$(realpath "${1:?DATA folder written by prepare_dataset.py at 128 px}")
OUT=$(realpath -m "${2:?OUT folder}")
MINUTES=${MINUTES:-23}
# An absolute path that keeps its virtual environment (a venv's python is a link: do not resolve it).
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
export HF_HUB_OFFLINE=1 TQDM_MININTERVAL=60
mkdir -p "$OUT"
started=$(date +%s)
stamp() { echo "=== $(( $(date +%s) - started )) s: $*"; }

if [ -n "${BASELINE_COMMIT:-}" ]; then
    stamp "baseline: the KL-VAE recipe of $BASELINE_COMMIT"
    worktree="$OUT/baseline_code"
    [ -d "$worktree" ] || git worktree add --detach "$worktree" "$BASELINE_COMMIT"
    (cd "$worktree" && "$PYTHON" train.py --dataset_path "$DATA" --preset small --output_dir "$OUT/baseline" \
        --train_batch_size 16 --learning_rate 1e-3 --lr_warmup_steps 30 --max_train_steps 1200 \
        --max_train_minutes "$MINUTES" --adversarial_loss_weight 0 --validation_epochs 1000 --checkpointing_steps 250 \
        --prior_fit_steps 3000 --config_overrides spatial_latent=true bottleneck_size=16 --report_to none \
        && "$PYTHON" evaluate_model.py --model "$OUT/baseline/model" --dataset_path "$DATA" --split validation \
        --num_samples 200 --output_dir "$OUT/baseline/eval" --feature_extractor efficientnet-lite0)
fi

stamp "the GAN recipe"
"$PYTHON" train.py --dataset_path "$DATA" --preset small --output_dir "$OUT/gan" --train_batch_size 16 \
    --generator_learning_rate 5e-4 --discriminator_learning_rate 5e-4 \
    --max_train_steps 1000000 --max_train_minutes "$MINUTES" --validation_epochs 1000 --checkpointing_steps 1000 \
    --report_to none ${GAN_ARGS:-}
"$PYTHON" evaluate_model.py --model "$OUT/gan/model" --dataset_path "$DATA" --split validation --num_samples 200 \
    --output_dir "$OUT/gan/eval" --feature_extractor efficientnet-lite0
stamp "done"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {"gan": ("gan", "samples")}
if (out / "baseline/eval/report.json").exists():
    rows = {"VAE, prior, no detail bank": ("baseline", "prior_no_detail"), "VAE, prior and detail bank": ("baseline", "prior"), **rows}
print("| model | seed KID x1000 | HF ratio | nearest-train distance (samples) | (validation prints) | near copies |")
print("|---|---:|---:|---:|---:|---:|")
for name, (run, row) in rows.items():
    report = json.loads((out / run / "eval/report.json").read_text())
    sample, real = report["sampling"][row], report["real_reference"]
    print(f"| {name} | {sample['kid_x1000']:.1f} ± {1000 * sample['kid_std']:.1f} | {sample['high_frequency_ratio']:.2f} "
          f"| {sample['nearest_train_distance_mean']:.4f} | {real['nearest_train_distance_mean']:.4f} | {sample['near_copy_share']:.1%} |")
PY
