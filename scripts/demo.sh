#!/usr/bin/env bash
# The main job: batch generation with SmolLM2-135M-Instruct (embedded, converted once into
# ~/.cache/hf_paged) on built-in real prompts, printing outputs and the KV memory report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m hf_paged generate "$@"
