#!/usr/bin/env bash
# The GPU recipe on real engravings, in one call of a lent H100/H200 (which has torch, transformers and accelerate
# but not `datasets` or `evaluate`):
#
#   1. a 30-step smoke run of every code path below, so a broken setup fails in seconds, not minutes;
#   2. bench/train_throughput.py: base preset at 512 px, compute-only step vs train.py's real loop;
#   3. the base preset at 256 px, then at 512 px, each for a fixed number of training minutes, then
#      `evaluate_model.py --save_model_outputs --no_scoring`: seed samples, reconstructions and captions in one .npz,
#      scored later on a machine with the metric libraries (`evaluate_model.py --model_outputs FILE`);
#   4. if the call's time allows (COMPILE_BENCH_BEFORE seconds have not passed), the compute-only step compiled.
#
# DATA is a folder of prepare_dataset.py ImageFolder splits (train/ and validation/ with metadata.jsonl): train.py
# and evaluate_model.py read them without `datasets`. Everything worth keeping lands in OUT (at most 8 files).
#
#   bash bench/gpu_recipe.sh data/engravings_384 gpu_out 10 10    # minutes of training at 256 px, at 512 px
#
# SMOKE_PRESET, BENCH_PRESET, RUN_PRESET and the sizes can be overridden to rehearse the script on a CPU; SMOKE=0 and
# THROUGHPUT=0 skip steps 1 and 2, to spend a second call on the training runs alone.
set -uo pipefail
DATA=${1:?DATA folder}
OUT=${2:?OUT folder}
MINUTES_256=${3:-3}
MINUTES_512=${4:-2}
SMOKE_PRESET=${SMOKE_PRESET:-base}
BENCH_PRESET=${BENCH_PRESET:-base}
RUN_PRESET=${RUN_PRESET:-base}
SIZES=${SIZES:-"256 512"}
BENCH_SIZE=${BENCH_SIZE:-512}
BATCH=${BATCH:-64}
NUM_SAMPLES=${NUM_SAMPLES:-200}
ADVERSARIAL_WEIGHT=${ADVERSARIAL_WEIGHT:-0.5}
SMOKE=${SMOKE:-1}
THROUGHPUT=${THROUGHPUT:-1}
COMPILE_BENCH_BEFORE=${COMPILE_BENCH_BEFORE:-480}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=${WORK:-/tmp/engraving_gpu}
CACHE="$WORK/cache"
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
started=$(date +%s)
stamp() { echo "=== $(( $(date +%s) - started )) s: $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PYTHON -c "import torch, transformers, accelerate, tokenizers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'tokenizers', tokenizers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

# Flags shared by every training run: bf16, EMA, flips (real titles rarely say left or right), a constant rate after
# warmup (the run ends on a time budget, not a step count), the adversarial loss after the autoencoder has structure.
TRAIN_FLAGS=(--dataset_path "$DATA" --cache_dir "$CACHE" --train_batch_size "$BATCH" --mixed_precision bf16
  --use_ema --random_flip --learning_rate 5e-4 --lr_scheduler constant_with_warmup --lr_warmup_steps 200
  --adversarial_loss_weight "$ADVERSARIAL_WEIGHT"
  --report_to none --checkpointing_steps 1000000 --logging_steps 100 --num_validation_samples 16)

# Flags shared by both throughput measurements (eager, then compiled compute-only).
BENCH_FLAGS=(--preset "$BENCH_PRESET" --image_size "$BENCH_SIZE" --train_batch_size "$BATCH" --mixed_precision bf16
  --dataset_path "$DATA")

evaluate_outputs() {  # model folder, output .npz, number of samples, JPEG quality
  $PYTHON evaluate_model.py --model "$1" --dataset_path "$DATA" --save_model_outputs "$2" --no_scoring \
    --num_samples "$3" --image_size 256 --jpeg_quality "${4:-90}" --batch_size 100 --output_dir "$WORK/eval"
}

if [ "$SMOKE" = 1 ]; then
  stamp "1. smoke run"
  $PYTHON train.py "${TRAIN_FLAGS[@]}" --preset "$SMOKE_PRESET" --image_size 256 --output_dir "$WORK/smoke" \
    --max_train_steps 30 --adversarial_start_step 10 --validation_epochs 1 --prior_fit_steps 20 --logging_steps 10 \
    && evaluate_outputs "$WORK/smoke/model" "$WORK/smoke.npz" 8
  if [ $? -ne 0 ]; then stamp "smoke run failed: stopping"; exit 1; fi
fi

if [ "$THROUGHPUT" = 1 ]; then
  stamp "2. throughput"
  $PYTHON bench/train_throughput.py "${BENCH_FLAGS[@]}" --output_dir "$WORK/throughput" \
    --output_json "$OUT/throughput.json"
fi

for size in $SIZES; do
  minutes=$MINUTES_256; [ "$size" = 512 ] && minutes=$MINUTES_512
  run="$WORK/real$size"
  stamp "3. base preset at $size px for $minutes minutes"
  $PYTHON train.py "${TRAIN_FLAGS[@]}" --preset "$RUN_PRESET" --image_size "$size" --output_dir "$run" \
    --max_train_steps 1000000 --max_train_minutes "$minutes" --adversarial_start_step 1000 --validation_epochs 100 \
    --prior_fit_steps 2000
  evaluate_outputs "$run/model" "$OUT/real${size}_outputs.npz" "$NUM_SAMPLES"
  # A file over 16 MiB would not come back: fall back to a lower JPEG quality.
  if [ "$(stat -c %s "$OUT/real${size}_outputs.npz" 2>/dev/null || echo 0)" -gt 16000000 ]; then
    evaluate_outputs "$run/model" "$OUT/real${size}_outputs.npz" "$NUM_SAMPLES" 75
  fi
  (cd "$run" && tar -czf "$OUT/real$size.tar.gz" metrics.json training.log samples.png \
    "$(ls -t reconstructions-*.png | head -1)" model/README.md model/config.json)
  ls -la "$OUT"
done
if [ $(( $(date +%s) - started )) -lt "$COMPILE_BENCH_BEFORE" ]; then
  stamp "4. compiled compute-only throughput"
  $PYTHON bench/train_throughput.py "${BENCH_FLAGS[@]}" --output_dir "$WORK/throughput_compiled" --compute_only \
    --torch_compile --output_json "$OUT/throughput_compiled.json"
fi
stamp "done"
