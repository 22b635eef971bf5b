#!/usr/bin/env bash
# Kernel counts and the memory plan of the cmae_vit_base training step
# (issue 5's figures). Usage: bash bench/kernels.sh [BATCH]   (default 128)
#
# Kernels per transformer block (forward + backward) are measured as the
# difference between the MAE training step with encoder depth 13 and 12: the
# MAE variant has no target branch, so the difference is exactly one online
# block, forward and backward. The CMAE difference adds the target's forward.
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-128}
cmaec=build/cmaec
[ -x "$cmaec" ] || bash scripts/build.sh >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

kernels() { # MODEL DEPTH -> "kernels update reduce arena unplanned"
  "$cmaec" build "$1" --train --no-opt --batch "$batch" --set encoder.depth="$2" -o "$tmp/step.json" >/dev/null
  "$cmaec" opt "$tmp/step.json" --stats --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
k = s["kernels_by_kind"]
print(s["kernels"], k["update"], k["reduce"], s["arena_bytes"], s["unplanned_bytes"])'
}

read -r mae12 _ _ _ _ < <(kernels models/mae_vit_base.json 12)
read -r mae13 _ _ _ _ < <(kernels models/mae_vit_base.json 13)
read -r cmae12 upd12 _ arena unplanned < <(kernels models/cmae_vit_base.json 12)
read -r cmae13 _ _ _ _ < <(kernels models/cmae_vit_base.json 13)
"$cmaec" build models/cmae_vit_base.json --train --no-opt --batch "$batch" -o "$tmp/step.json" >/dev/null
norm=$("$cmaec" opt "$tmp/step.json" | grep -c '^group .* reduce: .*grad_norm' || true)

echo "cmae_vit_base training step, batch $batch (cmaec opt, default pipeline)"
printf '  %-52s %s\n' "kernels per step" "$cmae12"
printf '  %-52s %s\n' "kernels per transformer block, forward + backward" "$((mae13 - mae12))  (target <= 24)"
printf '  %-52s %s\n' "  ... plus the target encoder's block forward" "$((cmae13 - cmae12))"
printf '  %-52s %s\n' "optimizer + EMA update kernels" "$upd12 update + $norm gradient-norm reduction  (target <= 4)"
python3 -c "a, u = $arena, $unplanned; print(f'  {\"arena peak\":52s} {a / 2**30:.2f} GiB of {u / 2**30:.2f} GiB unplanned = {100 * a / u:.1f} %  (target <= 50 %)')"
