#!/usr/bin/env bash
# Builds cmaec into build/ (Release, warnings as errors). Usage: scripts/build.sh [cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAEC_WERROR=ON "$@" >/dev/null
cmake --build build -j"$(nproc)"
