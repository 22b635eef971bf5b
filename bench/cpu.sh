#!/usr/bin/env bash
# The CPU backend's figures (issue 6): the FP32 FMA peak, GEMM at ViT-S sizes as a
# fraction of it, and the small Fashion-MNIST variant's training step.
# Usage: bash bench/cpu.sh [STEP ARGS...]   (e.g. --batch 64 --steps 10)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/cmaec ] || bash scripts/build.sh >/dev/null
cmake --build build -j2 --target bench_gemm bench_step >/dev/null
bash bench/build.sh >/dev/null
peak=$(build/bench/peak --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["peak_fp32_gflops"])')
echo "FP32 FMA peak, all cores: $peak GFLOP/s (build/bench/peak)"
build/bench/gemm --peak "$peak" --backend cpu
build/bench/step --backend cpu "$@" --peak "$peak"
