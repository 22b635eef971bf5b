#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing, builds the
# release build (gcc) and the sanitizer build (clang-19, ASan+UBSan, libFuzzer),
# runs every test in both, runs each fuzz target for a fixed time, and checks formatting.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
jobs=$(nproc)

bash scripts/install-deps.sh

echo "== release build (gcc, -Werror)"
bash scripts/build.sh
(cd build && ctest --output-on-failure -j"$jobs" --timeout 900)

echo "== sanitizer build (clang-19, ASan + UBSan, fuzzers)"
# -O2 with debug info: sanitizers work as well, and the oracle-heavy tests run 5x faster than at -O0.
CC=clang-19 cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAEC_WERROR=ON \
  -DCMAEC_SANITIZE=ON -DCMAEC_FUZZ=ON -DCMAEC_FUZZ_SECONDS="${CMAEC_FUZZ_SECONDS:-30}" >/dev/null
cmake --build build-asan -j"$jobs"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd build-asan && ctest --output-on-failure -j"$jobs" --timeout 900)

echo "== formatting (clang-format)"
files=$(git ls-files '*.c' '*.h')
if [[ -n "$files" ]]; then
  # shellcheck disable=SC2086
  clang-format --dry-run -Werror $files
fi

echo "== all tests passed in $(($(date +%s) - start)) s"
