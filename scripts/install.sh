#!/usr/bin/env bash
# Install NMoE and everything it needs on a fresh Debian machine into ./.venv.
# Idempotent: re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v curl > /dev/null || missing+=(curl)  # the tutorial's HTTP examples (docs/tutorial.md, tested)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing from Debian: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "==> not root: skipping ${missing[*]} (sudo apt-get install ${missing[*]}; torchvision can download the data)"
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "==> installing torch and torchvision"
.venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
echo "==> installing nmoe, its dev tools, the timm extractor and Hugging Face datasets (at constraints.txt's versions)"
.venv/bin/pip install -q -c constraints.txt -e ".[dev,timm,hf]"
echo "==> installed: $(.venv/bin/nmoe --help | head -1)"
