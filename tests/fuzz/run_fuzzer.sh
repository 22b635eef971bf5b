# tests/fuzz/run_fuzzer.sh BINARY SEEDDIR SECONDS
# Runs a libFuzzer target for SECONDS on a scratch copy of the committed seeds
# (new finds never touch the source tree) and exits with the fuzzer's status:
# nonzero on a crash, leak, timeout or out-of-memory.
set -u
if [ $# -ne 3 ]; then
  echo "usage: bash run_fuzzer.sh BINARY SEEDDIR SECONDS" >&2
  exit 2
fi
binary=$1
seeds=$2
seconds=$3
if [ ! -x "$binary" ]; then
  echo "run_fuzzer.sh: $binary is not an executable" >&2
  exit 2
fi
corpus=$(mktemp -d)
artifacts=$(mktemp -d)
trap 'rm -rf "$corpus" "$artifacts"' EXIT
if [ -d "$seeds" ]; then
  find "$seeds" -maxdepth 1 -type f -exec cp {} "$corpus"/ \;
fi
"$binary" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
  -artifact_prefix="$artifacts/" -print_final_stats=1 "$corpus"
status=$?
if [ "$status" -ne 0 ]; then
  # Keep the crashing inputs where a person can find them.
  keep=${TMPDIR:-/tmp}/cmaec-fuzz-$(basename "$binary")-$$
  mkdir -p "$keep" && cp "$artifacts"/* "$keep"/ 2>/dev/null
  echo "run_fuzzer.sh: $(basename "$binary") failed with status $status; artifacts in $keep" >&2
fi
exit "$status"
