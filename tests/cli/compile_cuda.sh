# tests/cli/compile_cuda.sh CMAEC SOURCE_ROOT — `cmaec compile --target cuda` through the CUDA
# module cache (NVRTC, no GPU): a first compile into an empty --cache-dir compiles every module,
# a second loads every one and writes the same CUBINs; CMAEC_CACHE_DIR is the default root;
# --cache-dir "" turns the cache off.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"

# the cuda line: "D distinct kernels in N modules ...: H from the cache, M compiled on T threads"
counts() { sed -n 's/.* [0-9]* distinct kernels in \([0-9]*\) modules.*: \([0-9]*\) from the cache, \([0-9]*\) compiled on \([0-9]*\) thread.*/\1 \2 \3 \4/p' "$tmp/out"; }

expect_ok "$cmaec" compile "$root/examples/mlp.json" --target cuda -o "$tmp/cold" --cache-dir "$tmp/c"
read -r n hits compiled threads <<<"$(counts)"
[ "${n:-0}" -ge 2 ] && [ "$hits" = 0 ] && [ "$compiled" = "$n" ] && [ "$threads" -ge 1 ] ||
  bad "cold: $(cat "$tmp/out")"
grep -q "^  cache: $tmp/c/cuda\($\|;\)" "$tmp/out" || bad "cold: no cache line: $(cat "$tmp/out")"
[ "$(ls "$tmp/c/cuda" | grep -c '^[0-9a-f]\{32\}\.cubin$')" = "${n:-x}" ] || bad "cache holds $(ls "$tmp/c/cuda")"

expect_ok "$cmaec" compile "$root/examples/mlp.json" --target cuda -o "$tmp/warm" --cache-dir "$tmp/c"
read -r n2 hits compiled threads <<<"$(counts)"
[ "$n2" = "${n:-x}" ] && [ "$hits" = "$n2" ] && [ "$compiled" = 0 ] || bad "warm: $(cat "$tmp/out")"
diff -r "$tmp/cold/cubin.sm_90" "$tmp/warm/cubin.sm_90" >/dev/null || bad "warm CUBINs differ"
diff "$tmp/cold/stats.tsv" "$tmp/warm/stats.tsv" >/dev/null || bad "warm stats (ptxas figures) differ"

# the environment's root, and no cache at all
CMAEC_CACHE_DIR="$tmp/c" expect_ok "$cmaec" compile "$root/examples/mlp.json" --target cuda -o "$tmp/env"
read -r n3 hits compiled threads <<<"$(counts)"
[ "$hits" = "${n:-x}" ] && [ "$compiled" = 0 ] || bad "CMAEC_CACHE_DIR: $(cat "$tmp/out")"
expect_ok "$cmaec" compile "$root/examples/mlp.json" --target cuda -o "$tmp/off" --cache-dir ""
read -r n4 hits compiled threads <<<"$(counts)"
[ "$hits" = 0 ] && [ "$compiled" = "${n:-x}" ] || bad "--cache-dir \"\": $(cat "$tmp/out")"
grep -q "^  cache: off\($\|;\)" "$tmp/out" || bad "--cache-dir \"\": $(cat "$tmp/out")"

# kernels split into one module per stage (CMAEC_CUDA_PART_BYTES): more modules, a CUBIN per
# part, the same ptxas figures per stage
CMAEC_CUDA_PART_BYTES=1 expect_ok "$cmaec" compile "$root/examples/mlp.json" --target cuda \
  -o "$tmp/split" --cache-dir "$tmp/c"
read -r n5 hits compiled threads <<<"$(counts)"
[ "${n5:-0}" -gt "${n:-0}" ] && [ "$compiled" -ge 1 ] || bad "split: $(cat "$tmp/out")"
[ "$(ls "$tmp/split/cubin.sm_90" | wc -l)" = "${n5:-x}" ] || bad "split: $(ls "$tmp/split/cubin.sm_90")"
diff "$tmp/cold/stats.tsv" "$tmp/split/stats.tsv" >/dev/null || bad "split: stats differ"
# a graph file whose "nodes" key comes after 4 KiB (as `cmaec build` writes ViT steps: "inputs"
# first) is still read as a graph, not as a variant
{ printf '{%*s' 5000 ''; tail -c +2 "$root/examples/mlp.json"; } >"$tmp/late_nodes.json"
expect_ok "$cmaec" compile "$tmp/late_nodes.json" --target cuda -o "$tmp/late" --cache-dir "$tmp/c"
diff "$tmp/cold/stats.tsv" "$tmp/late/stats.tsv" >/dev/null || bad "late nodes: stats differ"
finish
