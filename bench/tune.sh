#!/usr/bin/env bash
# The autotuner's figures (issue 17, item 5), in one run on this machine's CPU:
#   - the default variant's training step (bench/step), untuned (CMAEC_TUNE=off) and after
#     `cmaec tune` of the same step, and the ratio;
#   - the tuning time, and a second `cmaec tune` that searches nothing;
#   - the GEMMs at ViT-S shapes (bench/gemm), untuned and tuned (--tune), as % of the FP32 peak
#     measured in the same run (bench/peak).
# A fresh cache directory (objects and tuning.db) unless CMAEC_CACHE_DIR is set, so the tuning
# time is a cold one.
#   --peer f32|bf16|both: also the independent PyTorch step (bench/gpu/cmae_torch.py, eager and
#   torch.compile of the whole model, on the same threads) in that precision, next to cmaec's
#   tuned step in the same precision (bf16: the step tuned with train.precision=bf16 too);
#   --gemm-budget 0 skips the GEMM rows.
# Usage: bash bench/tune.sh [--batch N] [--steps N] [--budget S] [--gemm-budget S] [--peer P]
#   (defaults: 64, 10, 180 s for the step, 120 s for the six GEMMs, no peer)
set -euo pipefail
cd "$(dirname "$0")/.."
batch=64 steps=10 budget=180 gemm_budget=120 peer=none
while [ $# -gt 0 ]; do
  case "$1" in
  --batch) batch=$2 ;;
  --steps) steps=$2 ;;
  --budget) budget=$2 ;;
  --gemm-budget) gemm_budget=$2 ;;
  --peer) peer=$2 ;;
  *) echo "usage: bash bench/tune.sh [--batch N] [--steps N] [--budget S] [--gemm-budget S] [--peer f32|bf16|both]" >&2
     exit 2 ;;
  esac
  shift 2
done
[ -x build/cmaec ] || bash scripts/build.sh >/dev/null
cmake --build build -j2 --target cmaec bench_gemm bench_step >/dev/null
bash bench/build.sh >/dev/null
if [ -z "${CMAEC_CACHE_DIR:-}" ]; then
  CMAEC_CACHE_DIR=$(mktemp -d /tmp/cmaec_tune_bench_XXXXXX)
  trap 'rm -rf "$CMAEC_CACHE_DIR"' EXIT
fi
export CMAEC_CACHE_DIR
unset CMAEC_TUNE
model=models/cmae_vit_tiny_fmnist.json
out=$(mktemp -d /tmp/cmaec_tune_out_XXXXXX)
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); cache $CMAEC_CACHE_DIR"
peak=$(build/bench/peak --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["peak_fp32_gflops"])')
echo "FP32 FMA peak, all cores: $peak GFLOP/s (build/bench/peak)"

step_ms() { sed -n 's/^step \([0-9.]*\) ms.*/\1/p' "$1"; }

echo "== the step, untuned (CMAEC_TUNE=off)"
CMAEC_TUNE=off build/bench/step "$model" --backend cpu --batch "$batch" --steps "$steps" \
  --peak "$peak" --top 0 --stages 8 | tee "$out/untuned.txt"

echo "== cmaec tune $model --batch $batch --budget $budget"
t0=$(date +%s.%N)
build/cmaec tune "$model" --backend cpu --batch "$batch" --budget "$budget" | tee "$out/tune1.txt"
t1=$(date +%s.%N)
echo "== the second cmaec tune"
build/cmaec tune "$model" --backend cpu --batch "$batch" --budget "$budget" 2>/dev/null |
  tee "$out/tune2.txt"
t2=$(date +%s.%N)

echo "== the step, tuned"
build/bench/step "$model" --backend cpu --batch "$batch" --steps "$steps" --peak "$peak" \
  --top 0 --stages 8 | tee "$out/tuned.txt"

if [ "$gemm_budget" != 0 ]; then
  echo "== GEMMs at ViT-S shapes, untuned (CMAEC_TUNE=off)"
  CMAEC_TUNE=off build/bench/gemm --peak "$peak" --backend cpu | tee "$out/gemm0.txt"
  echo "== GEMMs at ViT-S shapes, tuned (--tune $gemm_budget)"
  build/bench/gemm --peak "$peak" --backend cpu --tune "$gemm_budget" | tee "$out/gemm1.txt"
fi

# The peer: cmaec's step (tuned as above; bf16 tuned now) and PyTorch's, back to back.
threads=$(sed -n 's/.* on cpu, \([0-9]*\) threads.*/\1/p' "$out/untuned.txt")
: >"$out/peer.txt"
for p in f32 bf16; do
  [ "$peer" = "$p" ] || [ "$peer" = both ] || continue
  if [ "$p" = bf16 ]; then
    echo "== cmaec tune $model --set train.precision=bf16 --budget $budget"
    build/cmaec tune "$model" --backend cpu --batch "$batch" --budget "$budget" \
      --set train.precision=bf16 | tee "$out/tune_bf16.txt"
  fi
  echo "== the step, $p, tuned, then PyTorch eager and torch.compile on $threads threads"
  build/bench/step "$model" --backend cpu --batch "$batch" --steps "$steps" --peak "$peak" \
    --top 0 --stages 0 --precision "$p" | tee "$out/cmaec_$p.txt"
  echo "cmaec $p: $(step_ms "$out/cmaec_$p.txt")" >>"$out/peer.txt"
  python3 bench/gpu/cmae_torch.py --model "$model" --batch "$batch" --steps "$steps" \
    --warmup 2 --modes eager,compile --compile full --precision "$p" --threads "$threads" \
    --device cpu 2>&1 | grep -v "^W1\|UserWarning\|warnings.warn" | tee "$out/torch_$p.txt"
  sed -n "s/^torch \([a-z]*\): \([0-9.]*\) ms.*/torch_\1 $p: \2/p" "$out/torch_$p.txt" |
    sed 's/^torch_/torch /' >>"$out/peer.txt"
done

echo
echo "== summary ($(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
u=$(step_ms "$out/untuned.txt") t=$(step_ms "$out/tuned.txt")
python3 - "$u" "$t" "$t0" "$t1" "$t2" "$out" <<'PY'
import re, sys
u, t, t0, t1, t2, out = float(sys.argv[1]), float(sys.argv[2]), *map(float, sys.argv[3:6]), sys.argv[6]
print(f"step: untuned {u:.1f} ms, tuned {t:.1f} ms: {u / t:.2f}x (goal 1.25x)")
print(f"tuning: {t1 - t0:.0f} s (goal <= 180 s); second tune {t2 - t1:.1f} s:",
      [l for l in open(f"{out}/tune2.txt") if "tunable stages" in l][0].split(";")[0])
def rows(path):
    r = {}
    for line in open(path):
        m = re.match(r"^(\S+\s+\S+\s+.*?)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)%", line)
        if m: r[m.group(1).strip()] = float(m.group(6))
    return r
import os
if os.path.exists(f"{out}/gemm0.txt"):
    a, b = rows(f"{out}/gemm0.txt"), rows(f"{out}/gemm1.txt")
    for k in a:
        print(f"gemm {k:<20} untuned {a[k]:5.1f}% of peak, tuned {b.get(k, 0):5.1f}% (goal >= 85%)")
ours, theirs = {}, []
for line in open(f"{out}/peer.txt"):
    f = line.split()
    if f[0] == "cmaec": ours[f[1].rstrip(":")] = float(f[2])
    else: theirs.append((f[1], f[2].rstrip(":"), float(f[3])))
goal = {"eager": 1.5, "compile": 1.3}
for mode, prec, ms in theirs:
    if prec in ours:
        print(f"peer {prec}: cmaec tuned {ours[prec]:.1f} ms, torch {mode} {ms:.1f} ms: "
              f"cmaec {ms / ours[prec]:.2f}x as fast (goal {goal.get(mode, 0)}x)")
PY
rm -rf "$out"
