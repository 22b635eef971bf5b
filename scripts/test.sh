#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing, builds the
# release build (gcc) and the sanitizer build (clang-19, ASan+UBSan, libFuzzer),
# runs every test in both, runs each fuzz target for a fixed time, and checks formatting
# and source lengths.
#
# Every phase runs even when an earlier one failed (a phase that needs a failed
# build is reported as not run, and counts as a failure); each prints its wall
# time, and the run ends with one summary of what failed. Exit status: 0 when
# every phase passed, 1 otherwise.
#
# The time rule (README "Tests", "Time"): CI aims at 20 minutes on a quiet
# 2-core machine. A test too slow for that runs in CI at a smaller size that
# takes every code path, its full size a ctest entry labelled "long"; the
# sanitizer build leaves out only entries whose code another sanitizer entry
# runs; every check runs in at least one of the two builds. Each ctest run
# gets a fresh module cache (CMAEC_CACHE_DIR), shared by its tests.
# scripts/test_times.sh prints the per-test times.
#
# Usage: scripts/test.sh [--long]
#   --long   also the tests labelled "long": the rest of the sweeps that CI
#            samples (README "Tests" says which)
# Environment: CMAEC_FUZZ_SECONDS (per fuzz target, default 30).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
long=0
for arg in "$@"; do
  case "$arg" in
  --long) long=1 ;;
  -h | --help)
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "scripts/test.sh: unknown argument $arg (--long)" >&2
    exit 2
    ;;
  esac
done
start=$(date +%s)
jobs=$(nproc)
phases=()   # "name<TAB>status<TAB>seconds<TAB>detail"
failed=0
phase_detail=""
log_dir=$(mktemp -d /tmp/cmaec-test.XXXXXX)

# phase NAME CMD...: runs CMD, records its status and wall time.
phase() {
  local name=$1
  shift
  echo
  echo "== $name"
  local t0 rc
  t0=$(date +%s)
  "$@"
  rc=$?
  local secs=$(($(date +%s) - t0)) status=passed detail=""
  if ((rc != 0)); then
    status=FAILED
    failed=1
    detail=${phase_detail:-"exit $rc"}
  fi
  phase_detail=""
  phases+=("$name"$'\t'"$status"$'\t'"$secs"$'\t'"$detail")
  echo "== $name: $status in ${secs} s"
  return $rc
}

skip() { # a phase that cannot run because one it needs failed
  phases+=("$1"$'\t'"NOT RUN"$'\t'"0"$'\t'"$2")
  failed=1
  echo
  echo "== $1: NOT RUN ($2)"
}

# run_ctest DIR LOGNAME ARGS...: ctest with every test's output on failure; afterwards the
# failed tests go into phase_detail and the five slowest are printed.
run_ctest() {
  local dir=$1 name=$2
  shift 2
  local log="$log_dir/$name.log" rc
  local labels=(-LE long)
  ((long)) && labels=()
  # one module cache for the run: a fresh machine's, not ~/.cache's
  mkdir -p "$log_dir/cache-$name"
  (cd "$dir" && CMAEC_CACHE_DIR="$log_dir/cache-$name" ctest --output-on-failure -j"$jobs" \
    --timeout 900 "${labels[@]}" "$@") 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  echo "-- slowest:"
  grep -E '^ *[0-9]+/[0-9]+ Test +#' "$log" | sed -E 's/.* Test +#[0-9]+: ([^ ]+) .* ([0-9.]+) sec$/\2 \1/' |
    sort -rn | head -5 | awk '{printf "   %7.1f s  %s\n", $1, $2}'
  if ((rc != 0)); then
    phase_detail=$(sed -n '/The following tests FAILED:/,$p' "$log" | grep -E '^\s+[0-9]+ - ' |
      sed -E 's/^\s+[0-9]+ - //' | paste -sd' ')
    [[ -n "$phase_detail" ]] || phase_detail="ctest exit $rc"
  fi
  return "$rc"
}

release_build() { bash scripts/build.sh; }
asan_configure_build() {
  # -O2 with debug info: sanitizers work as well, and the oracle-heavy tests run 5x faster than at -O0.
  CC=clang-19 cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAEC_WERROR=ON \
    -DCMAEC_SANITIZE=ON -DCMAEC_FUZZ=ON -DCMAEC_FUZZ_SECONDS="${CMAEC_FUZZ_SECONDS:-30}" >/dev/null &&
    cmake --build build-asan -j"$jobs"
}
format_check() {
  local files
  files=$(git ls-files '*.c' '*.h')
  [[ -z "$files" ]] && return 0
  # shellcheck disable=SC2086
  clang-format --dry-run -Werror $files
}
# no function over 150 lines, no file over 1500 (scripts/check_lengths.allow lists the debts)
length_check() {
  python3 scripts/check_lengths.py --self-test && python3 scripts/check_lengths.py
}

phase "install (scripts/install-deps.sh)" bash scripts/install-deps.sh

if phase "release build (gcc, -Werror)" release_build; then
  phase "release tests" run_ctest build release
else
  skip "release tests" "the release build failed"
fi

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if phase "sanitizer build (clang-19, ASan + UBSan, fuzzers)" asan_configure_build; then
  phase "sanitizer tests" run_ctest build-asan asan -E '^fuzz\.'
  phase "fuzzers (${CMAEC_FUZZ_SECONDS:-30} s each)" run_ctest build-asan fuzz -R '^fuzz\.'
else
  skip "sanitizer tests" "the sanitizer build failed"
  skip "fuzzers" "the sanitizer build failed"
fi

phase "formatting (clang-format)" format_check
phase "source lengths (scripts/check_lengths.py)" length_check

total=$(($(date +%s) - start))
echo
echo "== summary$( ((long)) && echo " (--long)"): $(printf '%d min %02d s' $((total / 60)) $((total % 60))) in all"
for p in "${phases[@]}"; do
  IFS=$'\t' read -r name status secs detail <<<"$p"
  printf '   %-8s %5d s  %s%s\n' "$status" "$secs" "$name" "${detail:+: $detail}"
done
rm -rf "$log_dir"
if ((failed)); then
  echo "== FAILED (see the phases above)"
  exit 1
fi
echo "== all tests passed"
