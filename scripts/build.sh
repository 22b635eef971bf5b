#!/usr/bin/env bash
# Builds cmaec into build/ (Release, warnings as errors).
# Usage: scripts/build.sh [--only TARGET] [cmake args...]   (--only cmaec: just the CLI)
set -euo pipefail
cd "$(dirname "$0")/.."
target=()
if [ "${1:-}" = "--only" ]; then
  target=(--target "$2")
  shift 2
fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAEC_WERROR=ON "$@" >/dev/null
cmake --build build -j"$(nproc)" "${target[@]}"
