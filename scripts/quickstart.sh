#!/usr/bin/env bash
# Set up and run GRPO on the tiny world (CPU, 5-10 minutes on 2 cores): a generator trained on
# a synthetic world of 24 cartoon people learns to keep its references' identities. Prints the
# eval rewards before and after training (held-out test rows) and the paths of the run's report
# and of before_after.png (references | before | after, for the first 16 test rows). docs/tiny_world.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python train_wan2_1_vace.py --config config/dgx.py:tiny_world "$@"
