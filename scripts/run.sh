#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, builds, and runs.
# Until the trainer exists: reports the machine (cmaec info), verifies the
# example MLP graph and evaluates it end to end on its example inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
mkdir -p out
build/cmaec info
build/cmaec check examples/mlp.json
build/cmaec run examples/mlp.json --inputs examples/mlp_inputs.safetensors \
  --outputs out/mlp_outputs.safetensors
echo "outputs written to out/mlp_outputs.safetensors"
