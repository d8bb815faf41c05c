#!/usr/bin/env bash
# Install the project and its dependencies into the current Python environment.
#   bash scripts/install.sh          # runtime only
#   bash scripts/install.sh dev      # + test tools
# On a CPU-only machine scripts/constraints.txt pins a torch/torchvision pair that loads
# together; on GPU nodes install your CUDA build of torch first and set IGP_NO_CONSTRAINTS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
constraints=(-c scripts/constraints.txt)
[ -n "${IGP_NO_CONSTRAINTS:-}" ] && constraints=()
python -m pip install --disable-pip-version-check -q "${constraints[@]}" -e ".${extra}"
