#!/usr/bin/env bash
# The GPU recipe on real engravings, in one call of a lent H100/H200 (which has torch, transformers and accelerate
# but not `datasets` or `evaluate`):
#
#   1. a 30-step smoke run of every code path below, so a broken setup fails in seconds, not minutes (it also
#      decodes the 256 px pixel cache the runs share);
#   2. bench/train_throughput.py: base preset at 512 px, compute-only step vs train.py's real loop;
#   3. the training runs listed in RUNS, side by side on the one GPU (a step of the base preset uses a few percent of
#      an H100's arithmetic, so two or three runs share it at little cost each), each for MINUTES of training, then
#      `evaluate_model.py --save_model_outputs --no_scoring`: seed samples, reconstructions and captions in one .npz,
#      scored later on a machine with the metric libraries (`evaluate_model.py --model_outputs FILE`).
#
# DATA is a folder of prepare_dataset.py ImageFolder splits (train/ and validation/ with metadata.jsonl): train.py
# and evaluate_model.py read them without `datasets`. Everything worth keeping lands in OUT: log.txt,
# throughput.json, and per run NAME_outputs.npz and NAME.tar.gz (at most 8 files come back from a call: 3 runs).
#
#   bash bench/gpu_recipe.sh data/engravings_384 gpu_out 10
#
# RUNS holds one run per line: a name, an image size, then extra train.py flags, e.g. an ablation beside the recipe:
#
#   RUNS="spatial256 256 --config_overrides spatial_latent=true bottleneck_size=16
#   adversarial256 256 --adversarial_loss_weight 0.5 --config_overrides spatial_latent=true bottleneck_size=16" \
#     bash bench/gpu_recipe.sh data/engravings_384 gpu_out 4.5
#
# The default is the recipe at 256 px and at 512 px: the base preset with its latent laid out as a 4 x 16 x 16 grid
# (`spatial_latent`), which halved the reconstructions' KID on the H200 in session 9 (BENCHMARKS.md).
#
# THROUGHPUT_VARIANTS holds further compute-only throughput measurements of step 2, one per line as
# train_throughput.py flags (their figures go to log.txt), e.g.
#
#   THROUGHPUT_VARIANTS="--config_overrides spatial_latent=true bottleneck_size=16"
#
# SMOKE_PRESET, SMOKE_OVERRIDES (the smoke run's config), BENCH_PRESET, RUN_PRESET and BENCH_SIZE can be overridden
# to rehearse the script on a CPU; SMOKE=0 and THROUGHPUT=0 skip steps 1 and 2.
set -uo pipefail
DATA=${1:?DATA folder}
OUT=${2:?OUT folder}
MINUTES=${3:-4}
RUNS=${RUNS:-"spatial256 256 --config_overrides spatial_latent=true bottleneck_size=16
spatial512 512 --config_overrides spatial_latent=true bottleneck_size=16"}
SMOKE_PRESET=${SMOKE_PRESET:-base}
BENCH_PRESET=${BENCH_PRESET:-base}
RUN_PRESET=${RUN_PRESET:-base}
BENCH_SIZE=${BENCH_SIZE:-512}
BATCH=${BATCH:-64}
NUM_SAMPLES=${NUM_SAMPLES:-200}
SMOKE=${SMOKE:-1}
SMOKE_OVERRIDES=${SMOKE_OVERRIDES:-"spatial_latent=true bottleneck_size=16"}
THROUGHPUT=${THROUGHPUT:-1}
PYTHON=${PYTHON:-python3}
# tqdm reads TQDM_* overrides: one progress line a minute keeps the logs readable.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=60
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
# warmup (the run ends on a time budget, not a step count), and no adversarial loss: with the spatial latent it made
# both reconstructions and seed samples worse in session 9. A run's own flags in RUNS come after these and override
# them; `--adversarial_loss_weight 0.5` there turns it on from step 1,000.
TRAIN_FLAGS=(--dataset_path "$DATA" --cache_dir "$CACHE" --train_batch_size "$BATCH" --mixed_precision bf16
  --use_ema --random_flip --learning_rate 5e-4 --lr_scheduler constant_with_warmup --lr_warmup_steps 200
  --adversarial_loss_weight 0 --adversarial_start_step 1000
  --report_to none --checkpointing_steps 1000000 --logging_steps 100 --num_validation_samples 16)

evaluate_outputs() {  # model folder, output .npz, number of samples, JPEG quality
  $PYTHON evaluate_model.py --model "$1" --dataset_path "$DATA" --save_model_outputs "$2" --no_scoring \
    --num_samples "$3" --image_size 256 --jpeg_quality "${4:-90}" --batch_size 100 --output_dir "$2.eval"
}

if [ "$SMOKE" = 1 ]; then
  stamp "1. smoke run (bf16), and beside it the same under fp16, whose GradScaler the CPU never runs"
  SMOKE_FLAGS=(--image_size 256 --max_train_steps 30 --adversarial_loss_weight 0.5 --adversarial_start_step 10
    --config_overrides $SMOKE_OVERRIDES --validation_epochs 1
    --prior_fit_steps 20 --logging_steps 10)
  $PYTHON train.py "${TRAIN_FLAGS[@]}" "${SMOKE_FLAGS[@]}" --preset "$SMOKE_PRESET" --mixed_precision fp16 \
    --output_dir "$WORK/smoke_fp16" > "$WORK/smoke_fp16.log" 2>&1 &
  fp16_smoke=$!
  $PYTHON train.py "${TRAIN_FLAGS[@]}" "${SMOKE_FLAGS[@]}" --preset "$SMOKE_PRESET" --output_dir "$WORK/smoke" \
    && evaluate_outputs "$WORK/smoke/model" "$WORK/smoke.npz" 8
  if [ $? -ne 0 ]; then stamp "smoke run failed: stopping"; exit 1; fi
  wait $fp16_smoke && echo "fp16 smoke run finished" || echo "fp16 smoke run FAILED"
  grep -E "step 30/|Skipped|Stopped|Error" "$WORK/smoke_fp16.log" | tail -n 4
fi

if [ "$THROUGHPUT" = 1 ]; then
  stamp "2. throughput"
  $PYTHON bench/train_throughput.py --preset "$BENCH_PRESET" --image_size "$BENCH_SIZE" --train_batch_size "$BATCH" \
    --mixed_precision bf16 --dataset_path "$DATA" --output_dir "$WORK/throughput" --output_json "$OUT/throughput.json"
  while read -r variant; do
    [ -z "$variant" ] && continue
    echo "--- compute-only variant: $variant"
    # $variant is split into words on purpose: it holds train_throughput.py flags.
    # shellcheck disable=SC2086
    $PYTHON bench/train_throughput.py --preset "$BENCH_PRESET" --image_size "$BENCH_SIZE" --train_batch_size "$BATCH" \
      --mixed_precision bf16 --dataset_path "$DATA" --output_dir "$WORK/throughput_variant" --compute_only $variant
  done <<< "${THROUGHPUT_VARIANTS:-}"
fi

stamp "3. training runs, side by side, $MINUTES minutes each:"
echo "$RUNS"
pids=()
while read -r name size flags; do
  [ -z "$name" ] && continue
  # $flags is split into words on purpose: it holds train.py flags.
  # shellcheck disable=SC2086
  ( if $PYTHON train.py "${TRAIN_FLAGS[@]}" --preset "$RUN_PRESET" --image_size "$size" --output_dir "$WORK/$name" \
      --max_train_steps 1000000 --max_train_minutes "$MINUTES" --validation_epochs 100000 --prior_fit_steps 3000 \
      $flags > "$WORK/$name.log" 2>&1; then
      # A file over 16 MiB would not come back: step the JPEG quality down until it fits. Real prints at 256 px
      # average 23.9 KB at quality 90, 14.7 at 75 and 11.2 at 60, so the default 944 images (200 x 3 seed sets,
      # 172 x 2 reconstructions) come to about 22.6, 13.8 and 10.6 MB.
      for quality in 90 75 60; do
        evaluate_outputs "$WORK/$name/model" "$OUT/${name}_outputs.npz" "$NUM_SAMPLES" "$quality" >> "$WORK/$name.log" 2>&1
        bytes=$(stat -c %s "$OUT/${name}_outputs.npz" 2>/dev/null || echo 0)
        echo "$name outputs at JPEG quality $quality: $bytes bytes" >> "$WORK/$name.log"
        [ "$bytes" -le 16000000 ] && break
      done
    fi
    cp "$WORK/$name.log" "$WORK/$name/run.log"
    (cd "$WORK/$name" && tar -czf "$OUT/$name.tar.gz" run.log metrics.json training.log samples.png \
      "$(ls -t reconstructions-*.png | head -1)" model/README.md model/config.json)
    stamp "$name finished" ) &
  pids+=($!)
done <<< "$RUNS"
wait "${pids[@]}"
for log in "$WORK"/*.log; do echo "--- $log"; grep -E "INFO|Error|error|JPEG quality" "$log" | tail -n 12; done
ls -la "$OUT"
stamp "done"
