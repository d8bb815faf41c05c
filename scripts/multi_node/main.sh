#!/usr/bin/env bash
# GRPO on several nodes. Run the same command on every node, with its own NODE_RANK:
#   MASTER_ADDR=10.0.0.1 NUM_NODES=2 NODE_RANK=0 bash scripts/multi_node/main.sh vace
#   MASTER_ADDR=10.0.0.1 NUM_NODES=2 NODE_RANK=1 bash scripts/multi_node/main.sh vace
# GPUS_PER_NODE defaults to 8; extra arguments are config overrides (--config.train.beta=0.01).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
: "${NODE_RANK:?set NODE_RANK (0 .. NUM_NODES-1)}"
NUM_NODES="${NUM_NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
preset="${1:-vace}"; shift || true
accelerate launch --config_file scripts/accelerate_configs/multi_node.yaml \
    --num_machines "$NUM_NODES" --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
    --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "${MASTER_PORT:-29500}" \
    train_wan2_1_vace.py --config "config/dgx.py:${preset}" "$@"
