#!/usr/bin/env bash
# Create .venv and install pf2lora_ray into it (idempotent).
#   ./setup.sh        runtime + offline MiniLM model + PEFT export
#   ./setup.sh dev    the same plus pytest and ruff
# torch==2.13.0 goes in first: on CPU-only machines it is a local CPU build, and
# installing it first stops the plain "torch" requirement from pulling a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
extras="models"
if [[ "${1:-}" == "dev" ]]; then extras="dev,models"; fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
