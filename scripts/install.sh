#!/usr/bin/env bash
# Install NMoE and everything it needs on a fresh Debian machine into ./.venv.
# Idempotent: re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing Debian's dataset-fashion-mnist"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    echo "==> not root: skipping dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist, or let torchvision download)"
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "==> installing torch and torchvision"
.venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
echo "==> installing nmoe, its dev tools, the timm extractor and Hugging Face datasets (at constraints.txt's versions)"
.venv/bin/pip install -q -c constraints.txt -e ".[dev,timm,hf]"
echo "==> installed: $(.venv/bin/nmoe --help | head -1)"
