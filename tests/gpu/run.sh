#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU (run it there; see README):
# builds (Release), compiles every kernel of every variant for the device's
# architecture with NVRTC, runs the GPU differential test (tests/gpu/gpu_diff.c:
# every variant's training step and odd-shaped GEMMs against the oracle, then
# timings), and prints a short table last. Exit status: the test's.
set -uo pipefail
cd "$(dirname "$0")/../.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
if [ ! -x build/tests/gpu_diff ]; then
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j"$(nproc)" >/dev/null || exit 1
fi
build/cmaec info
build/tests/gpu_diff | tee "$log"
rc=${PIPESTATUS[0]}
echo
echo "== summary =="
grep -E "kernels|gpu_diff" "$log" | awk '{ print }'
exit "$rc"
