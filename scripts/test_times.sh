#!/usr/bin/env bash
# Per-test times of a ctest run, slowest first: wall seconds and CPU seconds (user + system, the
# test's own processes: what it costs on a machine that others load too), with their sums and the
# run's wall time: where the suite's minutes go (README.md "Tests", "Time").
#
# Usage: scripts/test_times.sh BUILD_DIR [TOP] [-- CTEST_ARGS...]
#          runs ctest in BUILD_DIR as scripts/test.sh does (-j$(nproc), the CI selection: -LE long,
#          and the sanitizer options and a fresh module cache), each test under /usr/bin/time;
#          saves the table to BUILD_DIR/test_times.txt and prints its TOP (default 25) lines
#        scripts/test_times.sh --log FILE [TOP]
#          the wall times from a saved ctest output (a scripts/test.sh log)
# Example: scripts/test_times.sh build-asan 25 -- -E '^fuzz\.'
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

# table LOG TOP: the slowest TOP tests of a ctest output, their sum and how many ran.
table() {
  local log=$1 top=$2
  grep -E '^ *[0-9]+/[0-9]+ Test +#' "$log" |
    sed -E 's/.* Test +#[0-9]+: ([^ ]+) .* ([0-9.]+) sec$/\2 \1/' | sort -rn >"$log.sorted"
  head -n "$top" "$log.sorted" | awk '{printf "%8.1f s  %s\n", $1, $2}'
  awk '{s += $1; n++} END {printf "%8.1f s  in all, %d tests (the sum: at -j2 the wall time is about half)\n", s, n}' \
    "$log.sorted"
  rm -f "$log.sorted"
}

if [[ $1 == --log ]]; then
  table "$2" "${3:-25}"
  exit 0
fi
dir=$1
shift
top=25
if [[ $# -gt 0 && $1 != -- ]]; then
  top=$1
  shift
fi
[[ ${1:-} == -- ]] && shift
[[ -f "$dir/CTestTestfile.cmake" ]] || {
  echo "scripts/test_times.sh: $dir is not a configured build" >&2
  exit 2
}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:halt_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
cache=$(mktemp -d /tmp/cmaec-times-cache.XXXXXX)
export CMAEC_CACHE_DIR=$cache
log="$dir/test_times.log"
times=$(mktemp -d /tmp/cmaec-times.XXXXXX)
# each test's command under /usr/bin/time (it passes the exit status on); ctest's file restored after
testfile="$dir/CTestTestfile.cmake"
cp "$testfile" "$times/CTestTestfile.cmake"
sed -E -i "s|^add_test\(\[=\[([^]]+)\]=\] |add_test([=[\1]=] \"/usr/bin/time\" \"-f\" \"%e %U %S\" \"-o\" \"$times/\1.time\" |" \
  "$testfile"
trap 'cp "$times/CTestTestfile.cmake" "$testfile"' EXIT
t0=$(date +%s)
(cd "$dir" && ctest -j"$(nproc)" --timeout 900 -LE long "$@") >"$log" 2>&1
rc=$?
wall=$(($(date +%s) - t0))
cp "$times/CTestTestfile.cmake" "$testfile"
rm -rf "$cache"
for f in "$times"/*.time; do
  [[ -e $f ]] || continue
  name=$(basename "$f" .time)
  tail -n 1 "$f" | awk -v n="$name" '{printf "%8.1f %8.1f  %s\n", $1, $2 + $3, n}'
done | sort -k2 -rn >"$dir/test_times.txt"
rm -rf "$times"
echo "ctest in $dir: exit $rc, $wall s wall (output: $log; table: $dir/test_times.txt)"
echo "  wall s    CPU s  test"
head -n "$top" "$dir/test_times.txt"
awk '{w += $1; c += $2; n++} END {printf "%8.1f %8.1f  in all, %d tests (CPU / 2: the wall time on 2 idle cores)\n", w, c, n}' \
  "$dir/test_times.txt"
exit "$rc"
