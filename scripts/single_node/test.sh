#!/usr/bin/env bash
# Batch inference on the test split, one node. Usage:
#   bash scripts/single_node/test.sh [preset] [--config.x=y ...]
#   bash scripts/single_node/test.sh vace --config.train.lora_path=outputs/identity_grpo/<run>/lora
#   bash scripts/single_node/test.sh vace --config.train.lora_path=... --config.eval_baseline=True
# NUM_GPUS (default 8) processes share the test rows; PORT sets the rendezvous port. See docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
preset="${1:-vace}"; shift || true
accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml \
    --num_processes "${NUM_GPUS:-8}" --main_process_port "${PORT:-29502}" \
    test_wan2_1_vace.py --config "config/dgx.py:${preset}" "$@"
