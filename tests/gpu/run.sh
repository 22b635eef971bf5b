#!/usr/bin/env bash
# The GPU checks of issue 15, for a machine with an NVIDIA GPU, the CUDA toolkit, CMake, gcc and
# Python, but no LLVM, no cJSON and no network. Run tests/gpu/prepare.sh first where those are
# (it fills .gpu/: the libraries, Fashion-MNIST, the CPU backend's losses), carry .gpu there,
# then from the repository root: bash tests/gpu/run.sh
#
# Parts, each under its own timeout and all together under 8 minutes (RUN_SECONDS); a failing
# part is FAILED in the table and the script goes on:
#   build     configure with -DCMAEC_LLVM=OFF and the carried libraries, build -j$(nproc)
#   gpu_diff  every variant's training step on the GPU against the oracle (build/tests/gpu_diff)
#   train     50 steps of cmae_vit_tiny_fmnist on CUDA against the CPU backend's losses, which
#             prepare.sh computed with the same seed and data (there is no CPU backend here,
#             and the reference evaluator would take longer than the whole budget for 50 steps)
#   step      the ViT-B training step timed with and without CUDA graphs (bench/step, 10 steps)
#   tune      cmaec tune of the ViT-B bf16 step at batch 128 on this card (issue 17): the
#             TUNE_STAGES most expensive distinct stages (GEMMs, attention) within a 120 s
#             budget, into the default cache's tuning.db, which the bench part's tuned step reads
#   bench     cmaec against PyTorch on this card (bench/gpu/run.sh, issue 16): the step's GEMM
#             shapes vs torch.matmul, attention vs scaled_dot_product_attention, the bf16 ViT-B
#             step untuned (CMAEC_TUNE=off) and tuned vs eager AMP and torch.compile, the
#             fraction of the bf16 peak; its table is in $logs/bench.log, its parts' outputs in
#             $logs/bench/
#   compile   cmaec compile of ViT-B for sm_90, cold (empty cache) then warm
# and one table last. Exit status: 0 when every part passed, 1 otherwise (bench passes when
# every figure was measured; its targets are reported, not asserted).
#
# --dry-run: no GPU needed (this machine): builds for real, compiles for real (NVRTC; a
# smaller model unless CMAEC_GPU_COMPILE_MODEL names one), and feeds the GPU parts' parsing
# with made-up outputs (fake_*), so the parsing and the table are checked here; tune runs the
# real command line (which must parse, then find no CUDA driver); bench runs its PyTorch side
# on the CPU at tiny sizes (bench/gpu/run.sh --dry-run).
# Environment: CMAEC_GPU_CARRY (default .gpu), CMAEC_GPU_BUILD (default build-gpu),
# CMAEC_GPU_LOGS (default $OUT/gpu-logs when $OUT is set, else a temporary folder).
set -uo pipefail
set -a # the parts run in a child bash (under timeout): it sees every variable below
cd "$(dirname "$0")/../.."
root=$PWD
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
carry=${CMAEC_GPU_CARRY:-$root/.gpu}
build=${CMAEC_GPU_BUILD:-$root/build-gpu}
logs=${CMAEC_GPU_LOGS:-${OUT:+$OUT/gpu-logs}}
[ -n "$logs" ] || logs=$(mktemp -d)
mkdir -p "$logs"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
RUN_SECONDS=${RUN_SECONDS:-470}
deadline=$(($(date +%s) + RUN_SECONDS))
rows=()
failed=0

# row PART RESULT FIGURES
row() {
  rows+=("$(printf '%-10s %-8s %s' "$1" "$2" "$3")")
  [ "$2" = ok ] || failed=1
}

# run_part NAME SECONDS CMD...: runs CMD with its output in $logs/NAME.log, under the smaller
# of SECONDS and what is left of the whole budget; prints the seconds it took on fd 3.
# Returns CMD's status (124: timed out).
run_part() {
  local name=$1 secs=$2
  shift 2
  local left=$((deadline - $(date +%s)))
  [ "$left" -lt "$secs" ] && secs=$left
  if [ "$secs" -le 0 ]; then
    echo "no time left in the ${RUN_SECONDS} s budget" >"$logs/$name.log"
    return 124
  fi
  local t0 rc
  t0=$(date +%s.%N)
  echo "== $name: $* (timeout ${secs} s)"
  timeout --kill-after=5 "$secs" bash -c '"$@"' "$name" "$@" >"$logs/$name.log" 2>&1
  rc=$?
  awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }' >"$work/$name.secs"
  tail -n 3 "$logs/$name.log" | sed 's/^/   /'
  return $rc
}
secs_of() { cat "$work/$1.secs" 2>/dev/null || echo "?"; }
why() { # the reason a part failed, for the table
  if [ "$1" = 124 ] || [ "$1" = 137 ]; then echo "timed out"; else echo "exit $1"; fi
}

# ---- made-up GPU outputs for --dry-run (the shapes the real programs print) ---------------
fake_gpu_diff() {
  echo "cmae_vit_tiny_fmnist.json b4             31 kernels (2 fused attention)  worst |gpu - f64| / bound 0.21 (k3_gemm out)  ok  nvrtc 1200 ms  0.512 ms/run"
  echo "gemm+bias+relu 127x65x33                  1 kernels (0 fused attention)  worst |gpu - f64| / bound 0.05 (k0 out)  ok  nvrtc 100 ms"
}
fake_train() { # $1: the CPU run's metrics.jsonl, scaled as a GPU's might be (by default 1.001)
  mkdir -p "$2"
  awk -v scale="${CMAEC_GPU_FAKE_LOSS_SCALE:-1.001}" '{ if (match($0, /"loss":[-0-9.eE+]+/)) { v = substr($0, RSTART + 7, RLENGTH - 7);
         $0 = substr($0, 1, RSTART + 6) sprintf("%.9g", v * scale) substr($0, RSTART + RLENGTH) }
         print }' "$1" >"$2/metrics.jsonl"
}
fake_step() { # $1: on|off
  echo "models/cmae_vit_base.json: batch 64, 3 steps on 1 threads; build 9.10 s (412 kernels, 170 distinct, 0 cached)"
  if [ "$1" = on ]; then echo "step 88.20 ms, 725.6 images/s"; else echo "step 97.45 ms, 656.7 images/s"; fi
}
fake_tune() { # what cmaec tune prints (tools/cli_tune.c)
  echo "tune models/cmae_vit_base.json (batch 128, bf16) on cuda: NVIDIA H100 80GB HBM3 (made up)"
  echo "$TUNE_STAGES tunable stages: $TUNE_STAGES searched, 0 from the database, 0 over budget; 61 candidates measured (2 failed), 9 pruned; 118.4 s"
  echo "searched stages: default 41.250 ms, tuned 36.100 ms (1.14x)"
}

export -f fake_gpu_diff fake_train fake_step fake_tune
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
  echo "(no nvidia-smi)"
[ -d "$carry/deps" ] || echo "run.sh: $carry/deps missing: run tests/gpu/prepare.sh and carry .gpu" >&2

# ---- build ---------------------------------------------------------------------------------
deps=$carry/deps/usr
libdir=$deps/lib/x86_64-linux-gnu
configure() {
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAEC_LLVM=OFF \
    -DCJSON_INCLUDE_DIR="$deps/include" -DCJSON_LIBRARY="$libdir/libcjson.so.1" \
    -DZLIB_INCLUDE_DIR="$deps/include" -DZLIB_LIBRARY="$libdir/libz.a" \
    -DZLIB_LIBRARY_RELEASE="$libdir/libz.a" \
    -DPNG_PNG_INCLUDE_DIR="$deps/include" -DPNG_LIBRARY="$libdir/libpng16.a" \
    -DPNG_LIBRARY_RELEASE="$libdir/libpng16.a" \
    -DJPEG_INCLUDE_DIR="$deps/include" -DJPEG_LIBRARY="$libdir/libjpeg.a" \
    -DJPEG_LIBRARY_RELEASE="$libdir/libjpeg.a" \
    -DSQLite3_INCLUDE_DIR="$deps/include" -DSQLite3_LIBRARY="$libdir/libsqlite3.a" &&
    cmake --build "$build" -j"$(nproc)" --target cmaec gpu_diff bench_step bench_attn bench_gpu_gemm \
      test_comm
}
export -f configure
if run_part build 240 configure; then
  row build ok "LLVM off, $(nproc) jobs, $(secs_of build) s"
else
  rc=$?
  row build FAILED "$(why $rc) after $(secs_of build) s (see $logs/build.log)"
fi

# ---- gpu_diff --------------------------------------------------------------------------------
if [ "$dry" = 1 ]; then run_part gpu_diff 10 fake_gpu_diff; else run_part gpu_diff 150 "$build/tests/gpu_diff"; fi
rc=$?
n_ok=$(grep -cE '  ok  ' "$logs/gpu_diff.log")
n_bad=$(grep -cE "MISMATCH|FAIL" "$logs/gpu_diff.log")
worst=$(grep -oE 'bound [0-9.eE+-]+' "$logs/gpu_diff.log" | awk '$2 > w { w = $2 } END { print w + 0 }')
if [ "$rc" = 0 ] && [ "$n_ok" -gt 0 ] && [ "$n_bad" = 0 ]; then
  row gpu_diff ok "$n_ok programs within bound (worst |gpu - f64| / bound $worst), $(secs_of gpu_diff) s"
elif [ "$rc" = 77 ]; then
  row gpu_diff FAILED "skipped: no CUDA driver or GPU"
else
  row gpu_diff FAILED "$(why $rc), $n_ok ok, $n_bad failing lines (see $logs/gpu_diff.log)"
fi

# ---- nccl: a 1-rank NCCL communicator through the real library (issue 18) ----------------
# test_comm's test_nccl: NCCL's bootstrap (ncclGetUniqueId, ncclCommInitRank), every collective
# on device buffers ordered after a compute stream, the asynchronous request queue and the
# watchdog's polling (NCCL refuses two ranks on one GPU). libnccl.so.2 comes with PyTorch's
# wheels when the toolkit has none.
nccl_lib() {
  python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' \
    2>/dev/null
}
nccl_test() {
  local lib
  lib=$(nccl_lib)
  if [ -n "$lib" ] && [ -f "$lib" ] && ! ldconfig -p 2>/dev/null | grep -q libnccl.so.2; then
    export CMAEC_NCCL_LIBRARY=$lib
  fi
  "$build/tests/test_comm" test_nccl
}
export -f nccl_lib nccl_test
if [ "$dry" = 1 ]; then
  run_part nccl 10 true
  echo "test_nccl: nccl rank 0/1 (dry run)" >"$logs/nccl.log"
else
  run_part nccl 60 nccl_test
fi
rc=$?
if [ "$rc" = 0 ] && grep -q "nccl rank 0/1" "$logs/nccl.log"; then
  row nccl ok "$(grep -o 'nccl rank 0/1.*' "$logs/nccl.log" | head -1), $(secs_of nccl) s"
else
  row nccl FAILED "$(why $rc) (see $logs/nccl.log)"
fi

# ---- train: 50 steps on CUDA against the CPU backend's losses ---------------------------
steps=50 seed=7
[ -f "$carry/train.env" ] && . "$carry/train.env"
cpu_metrics=$carry/cpu/metrics.jsonl
train_cuda() {
  CMAEC_FMNIST_DIR=$carry/fashion-mnist "$build/cmaec" train models/cmae_vit_tiny_fmnist.json \
    --backend cuda --steps "$steps" --seed "$seed" --out "$work/train-cuda"
}
export -f train_cuda
if [ ! -f "$cpu_metrics" ]; then
  row train FAILED "no CPU losses ($cpu_metrics): run prepare.sh without --no-cpu-run"
else
  if [ "$dry" = 1 ]; then
    run_part train 10 fake_train "$cpu_metrics" "$work/train-cuda"
  else
    run_part train 120 train_cuda
  fi
  rc=$?
  # The two runs see the same data, masks and initial parameters; they differ by rounding
  # (reduction order, fast math), which training then amplifies. So step 1's loss must agree
  # closely (rel. 1e-2) and the last 10 steps' mean loosely (rel. 5e-2).
  verdict=$(python3 - "$cpu_metrics" "$work/train-cuda/metrics.jsonl" "$steps" <<'EOF'
import json, sys
def losses(path):
    out = {}
    for line in open(path):
        line = line.strip()
        if line:
            r = json.loads(line)
            out[int(r["step"])] = float(r["loss"])
    return out
try:
    cpu, gpu = losses(sys.argv[1]), losses(sys.argv[2])
except (OSError, ValueError, KeyError) as e:
    print("FAILED cannot read the losses: %s" % e); sys.exit()
n = int(sys.argv[3])
common = sorted(set(cpu) & set(gpu))
if len(common) < n:
    print("FAILED %d of %d steps logged on both" % (len(common), n)); sys.exit()
first = common[0]
rel1 = abs(gpu[first] - cpu[first]) / max(abs(cpu[first]), 1e-12)
tail = common[-10:]
mc, mg = sum(cpu[s] for s in tail) / len(tail), sum(gpu[s] for s in tail) / len(tail)
rel10 = abs(mg - mc) / max(abs(mc), 1e-12)
ok = rel1 <= 1e-2 and rel10 <= 5e-2
print("%s step %d loss cuda %.5f cpu %.5f (rel %.1e <= 1e-2); last 10 mean cuda %.5f cpu %.5f "
      "(rel %.1e <= 5e-2)" % ("ok" if ok else "FAILED", first, gpu[first], cpu[first], rel1, mg,
                              mc, rel10))
EOF
  )
  if [ "$rc" != 0 ]; then
    row train FAILED "$(why $rc) (see $logs/train.log)"
  else
    row train "${verdict%% *}" "${verdict#* }, $(secs_of train) s"
  fi
fi

# ---- the ViT-B step with and without CUDA graphs ---------------------------------------------
step_ms() { grep -oE '^step [0-9.]+ ms' "$logs/$1.log" | awk '{ print $2 }' | tail -1; }
for g in on off; do
  if [ "$dry" = 1 ]; then
    run_part "step_$g" 10 fake_step "$g"
  else
    run_part "step_$g" 60 "$build/bench/step" models/cmae_vit_base.json --backend cuda \
      --cuda-graphs "$g" --steps 10
  fi
  eval "rc_$g=$?"
done
ms_on=$(step_ms step_on) ms_off=$(step_ms step_off)
if [ "$rc_on" = 0 ] && [ "$rc_off" = 0 ] && [ -n "$ms_on" ] && [ -n "$ms_off" ]; then
  row step ok "$(awk -v a="$ms_on" -v b="$ms_off" \
    'BEGIN { printf "ViT-B: graphs on %.2f ms, off %.2f ms (x%.2f)", a, b, b / a }')"
else
  row step FAILED "graphs on: $(why "$rc_on") ${ms_on:-no figure}; off: $(why "$rc_off") ${ms_off:-no figure} (see $logs/step_*.log)"
fi

# ---- tune: the ViT-B step's most expensive stages on this card (issue 17) -------------------
# TUNE_STAGES: by the cost model the GEMMs (forward, dgrad, wgrad) and attention spans of
# ViT-B's encoder and decoder come first; 12 of them leave the 120 s budget ~10 s a stage (a
# few NVRTC builds and timed runs each). The records go to the default cache's tuning.db, which
# bench's tuned step reads; a timeout keeps what was recorded. The budget is 120 s, less when
# the parts before left too little for bench and compile after it (their 150 + 40 s).
TUNE_STAGES=${TUNE_STAGES:-12}
tune_budget=$((deadline - $(date +%s) - 150 - 40 - 20))
[ "$tune_budget" -gt 120 ] && tune_budget=120
[ "$tune_budget" -lt 10 ] && tune_budget=10
tune_gpu() {
  "$build/cmaec" tune models/cmae_vit_base.json --backend cuda --batch 128 \
    --budget "$tune_budget" --max-stages "$TUNE_STAGES"
}
tune_dry() { # the real command line must parse, then find no driver here; then made-up figures
  tune_gpu
  local rc=$?
  [ "$rc" = 2 ] || { echo "tune_dry: cmaec tune exited $rc, expected 2 (no CUDA driver)"; return 1; }
  fake_tune
}
export -f tune_gpu tune_dry
if [ "$dry" = 1 ]; then run_part tune 60 tune_dry; else run_part tune $((tune_budget + 30)) tune_gpu; fi
rc=$?
tune_line=$(grep -E '^[0-9]+ tunable stages: ' "$logs/tune.log" | tail -1)
tune_ms=$(grep -E '^searched stages: ' "$logs/tune.log" | tail -1)
if [ "$dry" = 1 ] && ! grep -q "CUDA driver not found" "$logs/tune.log"; then
  row tune FAILED "the dry run's command line did not reach the driver (see $logs/tune.log)"
elif [ "$rc" = 0 ] && [ -n "$tune_line" ]; then
  row tune ok "budget $tune_budget s: ${tune_line}${tune_ms:+; ${tune_ms#searched stages: }}"
else
  row tune FAILED "$(why $rc)${tune_line:+: $tune_line} (see $logs/tune.log; what was recorded is used)"
fi

# ---- bench/gpu: cmaec against PyTorch on this card ---------------------------------------------
bench_secs=150 # 120 before the untuned step joined
[ "$dry" = 1 ] && bench_secs=600 # PyTorch on 2 shared cores, torch.compile's C++ included
bench_gpu() {
  CMAEC_GPU_BUILD=$build CMAEC_BENCH_OUT=$logs/bench BENCH_SECONDS=$bench_secs \
    bash "$root/bench/gpu/run.sh" "$@"
}
export -f bench_gpu
if [ "$dry" = 1 ]; then run_part bench $((bench_secs + 10)) bench_gpu --dry-run; else run_part bench $((bench_secs + 10)) bench_gpu; fi
rc=$?
summary=$(grep '^summary: ' "$logs/bench.log" | tail -1)
if [ "$rc" = 0 ] && [ -n "$summary" ]; then
  row bench ok "${summary#summary: }, $(secs_of bench) s"
else
  row bench FAILED "$(why $rc): ${summary#summary: } (see $logs/bench.log)"
fi
# the step's rows of bench's table (report.py's lines "step| ..."), printed under the table
step_rows=()
while IFS= read -r line; do step_rows+=("${line#step| }"); done < <(grep '^step| ' "$logs/bench.log")

# ---- compile time, cold then warm ------------------------------------------------------------
model=${CMAEC_GPU_COMPILE_MODEL:-models/cmae_vit_base.json}
[ "$dry" = 1 ] && model=${CMAEC_GPU_COMPILE_MODEL:-models/cmae_vit_tiny_fmnist.json}
cache=$work/cubin-cache
compile() {
  "$build/cmaec" compile "$model" --target cuda --arch sm_90 --cache-dir "$cache" \
    -o "$work/compile-$1"
}
export -f compile
cold_secs=120 warm_secs=30
[ "$dry" = 1 ] && cold_secs=900 warm_secs=120 # 2 shared cores here, not 16
rm -rf "$cache"
run_part compile_cold "$cold_secs" compile cold
rc_cold=$?
run_part compile_warm "$warm_secs" compile warm
rc_warm=$?
if [ "$rc_cold" = 0 ] && [ "$rc_warm" = 0 ]; then
  row compile ok "$(basename "$model" .json) sm_90 on $(nproc) cores: cold $(secs_of compile_cold) s (target 10), warm $(secs_of compile_warm) s (target 0.5)"
else
  row compile FAILED "cold: $(why $rc_cold), warm: $(why $rc_warm) (see $logs/compile_*.log)"
fi

echo
echo "== cmaec on the GPU (tests/gpu/run.sh$([ "$dry" = 1 ] && echo ' --dry-run: made-up GPU outputs'); logs in $logs) =="
printf '%-10s %-8s %s\n' part result figures
printf '%s\n' "${rows[@]}"
if [ "${#step_rows[@]}" -gt 0 ]; then
  echo
  printf '%s\n' "${step_rows[@]}"
fi
exit "$failed"
