#!/usr/bin/env bash
# Refresh constraints.txt: the exact versions of everything ./.venv holds (the set CI installed and tested), which
# scripts/install.sh then installs. torch, torchvision and their CUDA wheels are pinned by install.sh itself.
# Run after `bash scripts/install.sh` with new versions and a green test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Versions CI installed and tested (scripts/constraints.sh writes this file; scripts/install.sh reads it)."
  .venv/bin/pip freeze --exclude-editable | grep -vE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+)=='
} > constraints.txt
echo "==> constraints.txt: $(grep -vc '^#' constraints.txt) packages"
