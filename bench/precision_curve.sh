#!/usr/bin/env bash
# The bf16 loss curve against the f32 one (issue 16; docs/training.md "Precision").
# Trains the default variant (models/cmae_vit_tiny_fmnist.json, Fashion-MNIST) for STEPS
# steps three times, one after the other on the same machine: f32 with seed 0, bf16 with
# seed 0, f32 with seed 1. Then it compares, over the last quarter of the steps:
#   gap    = bf16 - f32 (seed 0), per step   (what bf16 changes)
#   spread = f32 seed 1 - f32 seed 0, per step (what a different seed changes: data order,
#            views, masks, init; the resolution at which two curves can be told apart)
# The band: the bf16 curve follows the f32 one when rms(gap) < rms(spread), and the mean
# gap is within 3 standard errors of the spread's per-step noise (3 sd(spread)/sqrt(n)).
# Prints the losses at the quarter points and the mean step times; exits 1 outside the band.
#
# Usage: bench/precision_curve.sh CMAEC OUT_DIR [STEPS] [BATCH] [extra cmaec train args...]
#   defaults: 200 steps at batch 64, no warmup and base lr 1.5e-3 (the README's quick run), so
#   that the loss moves within 200 steps.
set -euo pipefail
cmaec=$1
out=$2
steps=${3:-200}
batch=${4:-64}
shift $(($# < 4 ? $# : 4))
mkdir -p "$out"
common=(--steps "$steps" --batch "$batch" --backend cpu --log-every 50
  --set schedule.warmup_epochs=0 --set optimizer.base_lr=1.5e-3 "$@")
for run in f32:0 bf16:0 f32:1; do
  precision=${run%:*} seed=${run#*:}
  dir="$out/$precision-seed$seed"
  rm -rf "$dir"
  echo "== $precision, seed $seed"
  "$cmaec" train models/cmae_vit_tiny_fmnist.json --out "$dir" --precision "$precision" \
    --seed "$seed" "${common[@]}" | grep -E "^(training|lr peak|done)"
done
python3 - "$out" "$steps" <<'EOF'
import json, math, sys
out, steps = sys.argv[1], int(sys.argv[2])
def load(name):
    rows = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
    return [r["loss"] for r in rows], [r["step_ms"] for r in rows], rows[0].get("precision")
f32, f32_ms, p0 = load("f32-seed0")
bf16, bf16_ms, p1 = load("bf16-seed0")
other, other_ms, _ = load("f32-seed1")
assert p0 == "f32" and p1 == "bf16", (p0, p1)
assert len(f32) == len(bf16) == len(other) == steps
marks = sorted({max(1, steps * k // 4) for k in (1, 2, 3, 4)})
print("step  " + "  ".join(f"{s:>8d}" for s in marks))
for name, l in (("f32 s0", f32), ("bf16 s0", bf16), ("f32 s1", other)):
    print(f"{name:8s}" + "  ".join(f"{l[s - 1]:8.4f}" for s in marks))
lo = steps - steps // 4
gap = [b - a for a, b in zip(f32[lo:], bf16[lo:])]
spread = [b - a for a, b in zip(f32[lo:], other[lo:])]
n = len(gap)
rms = lambda v: math.sqrt(sum(x * x for x in v) / len(v))
mean = lambda v: sum(v) / len(v)
sd = math.sqrt(sum((x - mean(spread)) ** 2 for x in spread) / (n - 1))
print(f"steps {lo + 1}..{steps}: mean loss f32 {mean(f32[lo:]):.4f}, bf16 {mean(bf16[lo:]):.4f}, "
      f"f32 seed 1 {mean(other[lo:]):.4f}")
print(f"gap bf16 - f32: rms {rms(gap):.4f}, mean {mean(gap):+.4f}; "
      f"spread seed 1 - seed 0: rms {rms(spread):.4f}, sd {sd:.4f}; "
      f"band on the mean gap: 3 sd / sqrt({n}) = {3 * sd / math.sqrt(n):.4f}")
# step 1 compiles nothing (cmaec compiles before the first step) but warms the caches: skip it
ms = lambda v: mean(v[1:])
print(f"step time: f32 {ms(f32_ms):.0f} ms, bf16 {ms(bf16_ms):.0f} ms (f32 seed 1 {ms(other_ms):.0f} ms)")
ok = rms(gap) < rms(spread) and abs(mean(gap)) <= 3 * sd / math.sqrt(n)
print("within the band" if ok else "OUTSIDE the band")
sys.exit(0 if ok else 1)
EOF
