#!/usr/bin/env bash
# Job lines for an array job: every model x every config line (a config file plus overrides).
#   launch/make_grid.sh models.txt configs.txt > launch/jobs.txt
# models.txt: one local model path (GGUF or HF dir) per line; configs.txt: e.g.
#   experiments/configs/lvs.py --config.layers='(4,8,12,16)'
#   experiments/configs/audit.py
set -euo pipefail
MODELS=${1:?file of model paths}; CONFIGS=${2:?file of config lines}
while read -r model; do
  [ -z "$model" ] && continue
  while read -r cfg; do
    [ -z "$cfg" ] && continue
    echo "$cfg --config.model=$model"
  done < "$CONFIGS"
done < "$MODELS"
