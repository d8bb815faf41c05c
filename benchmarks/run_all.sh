#!/usr/bin/env bash
# Every benchmark in one go, each script's output to OUT_DIR/<name>.txt (default benchmarks/results).
# On a GPU machine this is the single call to make: the scripts put their models on CUDA, and
# gpu_full_size.py adds the full-size figures. Extra arguments go to every script (e.g. --full).
set -uo pipefail
out="${OUT_DIR:-$(dirname "$0")/results}"
mkdir -p "$out"
scripts=(rollout_overhead nfe reward_in_memory epoch_breakdown policy_reference_batching peak_memory algorithms)
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    scripts+=(gpu_full_size)
fi
status=0
for name in "${scripts[@]}"; do
    echo "== $name"
    start=$SECONDS
    if PYTHONUNBUFFERED=1 python "$(dirname "$0")/$name.py" "$@" >"$out/$name.txt" 2>&1; then
        grep -v -E "it/s|s/it|Warning|warn\(|deprecate" "$out/$name.txt" | tail -n 25
    else
        echo "$name FAILED (see $out/$name.txt)"; tail -n 15 "$out/$name.txt"; status=1
    fi
    echo "   ($((SECONDS - start)) s)"
done
exit $status
