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

# The report's browser test (tests/test_report.py) opens report.html in headless Chromium, a
# system package. Installed only where apt-get exists and we are root or have passwordless sudo;
# elsewhere (or if apt fails) the install goes on and that test skips, saying why.
if [ -n "$extra" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
        && command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
    if [ -z "$sudo" ] || sudo -n true 2>/dev/null; then
        { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
            --no-install-recommends chromium >/dev/null; } \
            || echo "install.sh: could not install chromium with apt-get; the report's browser test will skip" >&2
    fi
fi
