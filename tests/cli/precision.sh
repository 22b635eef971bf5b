# tests/cli/precision.sh CMAEC SOURCE_ROOT — --precision on step and train
# (docs/training.md "Precision"): the autocast MLP step still trains (the loss at least
# 100x lower in 300 AdamW steps, as train.sh asks of f32), bf16 on the oracle and f16 with
# dynamic loss scaling on the CPU backend; bad values exit 2 naming the option or key.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
st="python3 $root/tests/cli/st.py"
$st write "$tmp/data.safetensors" x:4x3:1,0,2,0,1,-1,2,2,0,-1,0,1 target:4x2:3,3,0,-1,2,5,1,-2

for run in "bf16 ref" "f16 cpu --loss-scaling"; do
  set -- $run
  precision=$1 backend=$2
  shift 2
  expect_ok "$cmaec" step "$root/examples/mlp.json" --loss loss --steps 300 --lr 0.02 \
    --weight-decay 0 --inputs "$tmp/data.safetensors" --seed 1 --precision "$precision" \
    --backend "$backend" "$@" || continue
  grep -q "precision $precision\$" "$tmp/out" || bad "$precision: the header does not say so"
  first=$(awk '/^step 1 /{print $4}' "$tmp/out")
  last=$(awk '/^step 300 /{print $4}' "$tmp/out")
  awk -v a="$first" -v b="$last" 'BEGIN { exit !(a > 0 && b * 100 <= a) }' ||
    bad "$precision on $backend: loss went from $first to $last, not 100x lower"
done
expect_fail 2 "--precision f64: expected f32, bf16 or f16" "$cmaec" step "$root/examples/mlp.json" \
  --loss loss --steps 1 --lr 0.02 --precision f64
expect_fail 2 'train.precision: "fp8" is not one of auto, f32, bf16, f16' "$cmaec" train \
  "$root/models/cmae_vit_tiny_fmnist.json" --precision fp8 --out "$tmp/run"
expect_fail 2 "train.loss_scale" "$cmaec" train "$root/models/cmae_vit_tiny_fmnist.json" \
  --set train.loss_scale=-1 --out "$tmp/run"
finish
