#!/usr/bin/env bash
# Compute-only training throughput (bench/train_throughput.py (a), with its FLOP count) of the base preset at 512 px
# and of variants, in one call of a lent GPU: where the step's time goes, and what a lighter model would gain.
#
#   bash bench/gpu_throughput_variants.sh data/engravings_384 gpu_out
set -uo pipefail
DATA=${1:?DATA folder}
OUT=${2:?OUT folder}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

variant() {  # name, then extra flags of bench/train_throughput.py
  local name=$1
  shift
  echo "=== $name"
  timeout "${VARIANT_TIMEOUT:-150}" $PYTHON bench/train_throughput.py --preset base --image_size 512 \
    --train_batch_size "${BATCH:-64}" --mixed_precision bf16 --dataset_path "$DATA" --compute_only --num_steps 10 \
    --warmup_steps 5 --output_dir "/tmp/throughput_variants/$name" --output_json "$OUT/$name.json" "$@" | tail -8
}

variant base
variant no_adversarial --adversarial_loss_weight 0
variant light_discriminator --config_overrides "discriminator_channels=[32,64,128,256]"
variant half_width_top_levels --config_overrides "encoder_channels=[8,16,32,64,128,256,256,256]" \
  "decoder_channels=[8,16,32,64,128,256,256,256]" "discriminator_channels=[32,64,128,256]"
VARIANT_TIMEOUT=100 variant compiled --torch_compile
