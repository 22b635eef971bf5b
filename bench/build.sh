#!/usr/bin/env bash
# Builds the standalone bench programs (bench/peak.c) into build/bench/<name>; the ones that
# use the library (attn.c, gemm.c, gpu_gemm.c, step.c) are CMake targets bench_attn, bench_gemm,
# bench_gpu_gemm, bench_step; bench/gpu/ holds the GPU comparison with PyTorch (bench/README.md).
# Usage: bash bench/build.sh
# CC (default gcc) and CFLAGS (default -O2) may be overridden. Multi-threaded rows use OpenMP
# (libgomp with gcc; clang needs libomp's development link, libomp-dev): without a working
# OpenMP the programs are built single-threaded, with a warning. Benchmarks are not tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cc=${CC:-gcc}
cflags=${CFLAGS:--O2}
warn="-std=c11 -Wall -Wextra -Wshadow -Wstrict-prototypes -Werror"
if "$cc" --version 2>/dev/null | grep -qi clang; then
  # clang-19's -march=native on this KVM host reports avx10.1-256 and warns about it.
  warn="$warn -Wno-invalid-feature-combination"
fi
mkdir -p build/bench

omp="-fopenmp"
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf 'int main(void) {\n#pragma omp parallel\n  { }\n  return 0;\n}\n' >"$probe/omp.c"
if ! "$cc" -fopenmp "$probe/omp.c" -o "$probe/omp" 2>/dev/null; then
  echo "bench/build.sh: warning: '$cc -fopenmp' does not link; building without OpenMP" \
    "(multi-threaded rows will run on one thread)" >&2
  omp=""
fi

flags_for() { # NAME -> extra compile and link flags of that program
  case "$1" in
    peak) echo "$omp -pthread" ;; # kernels carry their own target attributes
    *) echo "-march=native $omp -pthread -lm" ;;
  esac
}

for src in bench/peak.c; do
  [ -e "$src" ] || continue
  name=$(basename "$src" .c)
  # shellcheck disable=SC2046,SC2086 # word splitting of the flag lists is intended
  "$cc" $cflags $warn "$src" -o "build/bench/$name" $(flags_for "$name")
  echo "built build/bench/$name"
done
