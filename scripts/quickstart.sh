#!/usr/bin/env bash
# Set up and run GRPO on the embedded tiny models (CPU, about a minute). Prints the eval reward
# before and after training; the run lands in outputs/identity_grpo/tiny_<timestamp>/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python train_wan2_1_vace.py --config config/dgx.py:tiny "$@"
