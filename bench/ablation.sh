#!/usr/bin/env bash
# Issue 7's ablation: CMAE vs MAE-only (loss.ct_weight=0) vs CMAE with random resized
# crops instead of pixel shifting, on Fashion-MNIST at an equal budget (same steps,
# batch, images, lr schedule and seed), each evaluated by kNN and a linear probe on
# the frozen encoder. Prints a table last; runs land in OUT/<arm>/.
# Usage: bash bench/ablation.sh [--steps N] [--batch B] [--out DIR] [--eval-train N]
#                               [--eval-test N] [--threads N]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=200 batch=128 out=runs/ablation eval_train=10000 eval_test=2000 threads=0
while [ $# -gt 0 ]; do
  case "$1" in
  --steps) steps=$2; shift 2 ;;
  --batch) batch=$2; shift 2 ;;
  --out) out=$2; shift 2 ;;
  --eval-train) eval_train=$2; shift 2 ;;
  --eval-test) eval_test=$2; shift 2 ;;
  --threads) threads=$2; shift 2 ;;
  *) echo "bench/ablation.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x build/cmaec ] || bash scripts/build.sh --only cmaec >/dev/null
model=models/cmae_vit_tiny_fmnist.json
# one epoch over steps*batch images: the whole cosine schedule fits the budget
common=(--batch "$batch" --epochs 1 --set "train.limit=$((steps * batch))"
  --set schedule.warmup_epochs=0 --set optimizer.base_lr=1.5e-3)
[ "$threads" -gt 0 ] && common+=(--threads "$threads")
arms=(cmae mae rrc)
declare -A extra=([cmae]="" [mae]="--set loss.ct_weight=0" [rrc]="--set train.views=rrc")
declare -A label=([cmae]="CMAE (pixel shift)" [mae]="MAE only (ct_weight 0)"
  [rrc]="CMAE, random resized crops")
mkdir -p "$out"
for a in "${arms[@]}"; do
  rm -rf "${out:?}/$a"
  echo "== $a: ${label[$a]}"
  # shellcheck disable=SC2086
  build/cmaec train "$model" --out "$out/$a" "${common[@]}" ${extra[$a]} --log-every 50
  build/cmaec eval "$out/$a" --train-limit "$eval_train" --test-limit "$eval_test" --json \
    >"$out/$a/eval.json"
done
build/cmaec eval "$out/cmae" --baselines --train-limit "$eval_train" --test-limit "$eval_test" \
  --json >"$out/baselines.json"
python3 - "$out" "$steps" "$batch" "$eval_train" "$eval_test" <<'PY'
import json, sys
out, steps, batch, ntr, nte = sys.argv[1:]
def tail_mean(arm, key, n=20):
    rows = [json.loads(l) for l in open(f"{out}/{arm}/metrics.jsonl") if l.strip()]
    vals = [r[key] for r in rows if key in r][-n:]
    return sum(vals) / len(vals) if vals else float("nan")
print(f"\nablation: cmae_vit_tiny_fmnist, {steps} steps x batch {batch} "
      f"({int(steps) * int(batch)} images, one cosine epoch, base lr 1.5e-3, seed 0); "
      f"frozen encoder on {ntr} train / {nte} test images")
print("| arm | kNN top-1 | linear top-1 | loss_rc (last 20 steps) | loss_ct (last 20 steps) |")
print("|---|---|---|---|---|")
names = {"cmae": "CMAE (pixel shift)", "mae": "MAE only (loss.ct_weight=0)",
         "rrc": "CMAE, random resized crop views"}
for arm in ("cmae", "mae", "rrc"):
    r = json.load(open(f"{out}/{arm}/eval.json"))["pretrained"]
    print(f"| {names[arm]} | {100*r['knn_top1']:.2f} % | {100*r['linear_top1']:.2f} % | "
          f"{tail_mean(arm, 'loss_rc'):.4f} | {tail_mean(arm, 'loss_ct'):.4f} |")
b = json.load(open(f"{out}/baselines.json"))
for key, name in (("random_init", "random init encoder"), ("raw_pixels", "raw pixels")):
    r = b[key]
    print(f"| {name} | {100*r['knn_top1']:.2f} % | {100*r['linear_top1']:.2f} % | | |")
PY
