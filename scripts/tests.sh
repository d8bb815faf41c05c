#!/usr/bin/env bash
# Set up and run the whole test suite (CPU, offline; 20-22 minutes on 2 cores, after the install).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
python -m pytest tests "$@"
