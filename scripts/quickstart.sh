#!/usr/bin/env bash
# Set up and run GRPO on the tiny world (CPU, 5-10 minutes on 2 cores): a generator trained on
# a synthetic world of 24 cartoon people learns to keep its references' identities, trained on
# the mean of the world's four learned identity reward models alone, as in the paper. Prints the
# eval rewards before and after training (32 held-out test rows) and the paths of the run's report and
# of before_after.png (references | before | after, for the first 16 test rows); then the world's
# identity check on 96 + 96 held-out scenes before and after (about a minute): the 32 rows are
# too few to tell identity changes of this size apart from noise; with it, the share of videos
# that draw an extra person (it rises: docs/tiny_world.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Extra arguments go to the training; the many-scene check scores the world's VACE generator.
logdir=outputs/quickstart
mkdir -p "$logdir"
marker=$(mktemp "$logdir/.started.XXXXXX")
trap 'rm -f "$marker"' EXIT
python train_wan2_1_vace.py --config config/dgx.py:tiny_world --config.logdir="$logdir" "$@"
# The run folder this invocation wrote (newer than the marker), not an older one.
run=$(find "$logdir" -mindepth 1 -maxdepth 1 -type d -newer "$marker" | sort | tail -n 1)
if [ -n "$run" ] && [ -f "$run/lora/adapter_config.json" ]; then
    python -m identity_grpo.world.following --lora "$run/lora" --compare
else
    echo "quickstart.sh: this run wrote no lora/ under $logdir (was --config.logdir changed?); score a run with:" \
         "python -m identity_grpo.world.following --lora RUN/lora --compare"
fi
