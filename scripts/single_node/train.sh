#!/usr/bin/env bash
# GRPO on one node. Usage: bash scripts/single_node/train.sh [preset] [--config.x=y ...]
#   bash scripts/single_node/train.sh vace --config.train.beta=0.01
set -euo pipefail
cd "$(dirname "$0")/../.."
preset="${1:-vace}"; shift || true
accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml \
    --num_processes "${NUM_GPUS:-8}" --main_process_port "${PORT:-29501}" \
    train_wan2_1_vace.py --config "config/dgx.py:${preset}" "$@"
