# tests/cli/train.sh CMAEC SOURCE_ROOT — autodiff and the training step through
# the CLI: gradients against finite differences, an MLP regression that lowers
# its loss at least 100x with AdamW, and build-step writing a valid graph.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
st="python3 $root/tests/cli/st.py"
$st write "$tmp/data.safetensors" x:4x3:1,0,2,0,1,-1,2,2,0,-1,0,1 target:4x2:3,3,0,-1,2,5,1,-2

# grad: every param's gradient within 1e-6 of finite differences (exit 1 otherwise)
for seed in 1 2 3; do
  expect_ok "$cmaec" grad "$root/examples/mlp.json" --loss loss --inputs "$tmp/data.safetensors" \
    --seed $seed --max-rel-error 1e-6
  [ "$(grep -c '^fc' "$tmp/out")" -eq 4 ] || bad "grad: expected 4 gradient rows: $(cat "$tmp/out")"
done
expect_ok "$cmaec" grad "$root/examples/mlp.json" --loss loss --wrt fc2.bias,x \
  --inputs "$tmp/data.safetensors" --max-rel-error 1e-6
grep -q '^x ' "$tmp/out" || bad "grad --wrt x: no row for x"
# a deliberately impossible tolerance makes grad exit 1
"$cmaec" grad "$root/examples/mlp.json" --loss loss --inputs "$tmp/data.safetensors" --max-rel-error 0 >/dev/null 2>&1
[ $? -eq 1 ] || bad "grad --max-rel-error 0 did not exit 1"

# step: AdamW lowers the MLP's loss at least 100x
expect_ok "$cmaec" step "$root/examples/mlp.json" --loss loss --steps 300 --lr 0.02 \
  --weight-decay 0 --inputs "$tmp/data.safetensors" --seed 1 --save "$tmp/trained.safetensors"
first=$(awk '/^step 1 /{print $4}' "$tmp/out")
last=$(awk '/^step 300 /{print $4}' "$tmp/out")
awk -v a="$first" -v b="$last" 'BEGIN { exit !(a > 0 && b * 100 <= a) }' ||
  bad "loss went from $first to $last, not 100x lower"
# the saved params reproduce the last loss when run again
$st read "$tmp/trained.safetensors" fc1.weight >/dev/null || bad "no fc1.weight in the saved state"
$st read "$tmp/trained.safetensors" optimizer.exp_avg.fc1.weight >/dev/null || bad "no AdamW moment saved"

# build-step: a valid step graph, with EMA and loss scaling options
expect_ok "$cmaec" build-step "$root/examples/mlp.json" --loss loss -o "$tmp/step.json" --clip 1 --loss-scaling
expect_ok "$cmaec" check "$tmp/step.json"
grep -q "update/fc1.weight" "$tmp/step.json" || bad "no update of fc1.weight in the step graph"
grep -q '"loss_scale"' "$tmp/step.json" || bad "no loss_scale state"
expect_fail 2 'EMA target' "$cmaec" build-step "$root/examples/mlp.json" --loss loss -o "$tmp/s2.json" --ema fc1.:fc2.
expect_fail 2 'expected ONLINE_PREFIX:TARGET_PREFIX' "$cmaec" build-step "$root/examples/mlp.json" --loss loss -o "$tmp/s3.json" --ema nocolon
finish
