#!/usr/bin/env bash
# bench/gpu/run.sh [--dry-run] — issue 16's GPU comparison, cmaec against PyTorch on the same
# card in one run (about 2 minutes; tests/gpu/run.sh runs it as its part "bench"):
#   gemm   every GEMM shape of the ViT-B training step at batch 128 (build/bench/gpu_gemm --list:
#          forward, dgrad, wgrad) in bf16, cmaec (gpu_gemm --backend cuda) vs torch.matmul
#          (bench/gpu/torch_peer.py gemm); target >= 90 % of torch's throughput
#   attn   attention forward + backward, 128 x 12 heads x 197 tokens x 64, bf16: bench/attn
#          --dtype bf16 vs F.scaled_dot_product_attention; target >= 80 %
#   step   the cmae_vit_base training step at batch 128 in bf16: bench/step --precision bf16,
#          untuned (CMAEC_TUNE=off) and tuned (CMAEC_TUNE=cached: the plans `cmaec tune` left in
#          the cache's tuning.db; tests/gpu/run.sh tunes first), vs bench/gpu/cmae_torch.py
#          (eager AMP and torch.compile); targets >= 1.3x eager, >= 1.1x compile, >= 45 % of the
#          card's dense bf16 peak (H100/H200 989 TFLOP/s)
# then one table (bench/gpu/report.py), whose last line starts "summary:".
# Each part runs under its own timeout, all under BENCH_SECONDS (default 150); a part that
# fails or times out leaves its figures missing (exit status 1), the others still run.
# --dry-run (no GPU, this machine): the shapes listed for real at batch 2; the cmaec GPU
# figures made up (fake_*); PyTorch's parts run for real on the CPU at tiny sizes (the GEMM
# shapes and a 2 x 2 x 17 x 8 attention in f32, cmae_vit_tiny_fmnist at batch 4 for 2 steps, eager and
# regional torch.compile with the aot_eager backend: Dynamo's capture and the forward/backward
# split, not inductor's CPU code, which is not what a GPU runs) to prove they run.
# Environment: CMAEC_GPU_BUILD (the build dir with bench/: default build-gpu, else build),
# CMAEC_BENCH_OUT (the parts' outputs; default a temporary dir), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/../.."
dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu/run.sh [--dry-run]" >&2; exit 2 ;;
esac
build=${CMAEC_GPU_BUILD:-build-gpu}
[ -x "$build/bench/gpu_gemm" ] || build=build
out=${CMAEC_BENCH_OUT:-$(mktemp -d)}
mkdir -p "$out"
py=${PYTHON:-python3}
deadline=$(($(date +%s) + ${BENCH_SECONDS:-150}))
model=models/cmae_vit_base.json
batch=128

# part NAME SECONDS CMD...: CMD's output in $out/NAME.txt (stderr in NAME.err), under the
# smaller of SECONDS and what is left of BENCH_SECONDS.
part() {
  local name=$1 secs=$2 left t0
  shift 2
  left=$((deadline - $(date +%s)))
  [ "$left" -lt "$secs" ] && secs=$left
  if [ "$secs" -le 0 ]; then
    echo "bench/gpu: $name: no time left" >&2
    return 124
  fi
  t0=$(date +%s)
  timeout --kill-after=5 "$secs" "$@" >"$out/$name.txt" 2>"$out/$name.err"
  local rc=$?
  echo "bench/gpu: $name: exit $rc after $(($(date +%s) - t0)) s (limit $secs s)" >&2
  [ "$rc" = 0 ] || tail -n 3 "$out/$name.err" | sed 's/^/  /' >&2
  return $rc
}

# ---- made-up cmaec GPU outputs for --dry-run (the lines the real programs print) ----------
fake_cm_gemm() { # the listed shapes at a made-up 400 TFLOP/s, 2 us at least (a launch)
  awk '$1 ~ /^[0-9]+$/ { ms = 2 * $3 * $4 * $5 / 400e12 * 1e3; if (ms < 0.002) ms = 0.002;
       printf "%-3s %-5s %6s %6s %6s %2s %2s %5s %10.6f %8.2f\n", $1, $2, $3, $4, $5, $6, $7, $8, ms, 400 }
       !/^[0-9]/ { print }' "$1"
}
fake_cm_attn() { echo "n 128 heads 12 tokens 197 dim 64 bf16: 3.210 ms/step on cuda (made up)"; }
fake_cm_step() { # $1: untuned|tuned
  if [ "$1" = untuned ]; then
    echo "cmae_vit_base: batch 128, bf16, 10 steps on cuda (made up); build 9.10 s (1212 kernels, 301 distinct, 3300 stages, 0 tuned, cache 0 hits 301 misses)"
    echo "step 101.30 ms, 1263.6 images/s, 0.000 GFLOP per step, 0.0 GFLOP/s"
  else
    echo "cmae_vit_base: batch 128, bf16, 10 steps on cuda (made up); build 2.10 s (1212 kernels, 301 distinct, 3300 stages, 58 tuned, cache 280 hits 21 misses)"
    echo "step 95.10 ms, 1345.9 images/s, 0.000 GFLOP per step, 0.0 GFLOP/s"
  fi
}

if [ "$dry" = 1 ]; then
  echo "NVIDIA H100 80GB HBM3 (dry run: cmaec's figures made up, PyTorch's on the CPU)" >"$out/card.txt"
  part shapes 30 "$build/bench/gpu_gemm" "$model" --batch 2 --list
  fake_cm_gemm "$out/shapes.txt" >"$out/cm_gemm.txt"
  part torch_gemm 180 "$py" bench/gpu/torch_peer.py gemm "$out/shapes.txt" --device cpu \
    --dtype f32 --seconds 0
  fake_cm_attn >"$out/cm_attn.txt"
  part torch_attn 120 "$py" bench/gpu/torch_peer.py attn --n 2 --heads 2 --tokens 17 --dim 8 \
    --device cpu --dtype f32 --seconds 0
  fake_cm_step untuned >"$out/cm_step_untuned.txt"
  fake_cm_step tuned >"$out/cm_step.txt"
  part torch_step 600 "$py" bench/gpu/cmae_torch.py --model models/cmae_vit_tiny_fmnist.json \
    --batch 4 --steps 2 --warmup 1 --device cpu --compile-backend aot_eager
else
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 >"$out/card.txt"
  if [ ! -s "$out/card.txt" ]; then
    echo "bench/gpu: no GPU (nvidia-smi names none); --dry-run checks the scripts without one" >&2
    exit 1
  fi
  part shapes 30 "$build/bench/gpu_gemm" "$model" --batch "$batch" --list
  part cm_gemm 40 "$build/bench/gpu_gemm" "$model" --batch "$batch" --backend cuda --seconds 0.05
  part torch_gemm 25 "$py" bench/gpu/torch_peer.py gemm "$out/shapes.txt" --seconds 0.05
  part cm_attn 25 "$build/bench/attn" --backend cuda --dtype bf16 --n 128 --heads 12 \
    --tokens 197 --dim 64 --steps 20
  part torch_attn 20 "$py" bench/gpu/torch_peer.py attn --n 128 --heads 12 --tokens 197 --dim 64
  part cm_step_untuned 40 env CMAEC_TUNE=off "$build/bench/step" "$model" --backend cuda \
    --precision bf16 --batch "$batch" --steps 10
  part cm_step 40 env CMAEC_TUNE=cached "$build/bench/step" "$model" --backend cuda \
    --precision bf16 --batch "$batch" --steps 10
  part torch_step 80 "$py" bench/gpu/cmae_torch.py --model "$model" --batch "$batch" --steps 10
fi
echo "bench/gpu: outputs in $out" >&2
"$py" bench/gpu/report.py "$out"
