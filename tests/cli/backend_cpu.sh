# tests/cli/backend_cpu.sh CMAEC SOURCE_ROOT — the CPU executor through the CLI:
# `run --backend cpu` gives the reference's exact MLP outputs, `step --backend
# cpu` lowers the loss like the reference, and bad backends/threads exit 2.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
st="python3 $root/tests/cli/st.py"
export CMAEC_CACHE_DIR="$tmp/cache"

# run: the same outputs as the reference backend (all exact in f32)
for threads in 1 2; do
  CMAEC_THREADS=$threads expect_ok "$cmaec" run "$root/examples/mlp.json" \
    --inputs "$root/examples/mlp_inputs.safetensors" --backend cpu --outputs "$tmp/cpu.safetensors"
  grep -q '^loss: f32\[\] = 0.0625$' "$tmp/out" || bad "threads $threads: printed $(cat "$tmp/out")"
  [ "$($st read "$tmp/cpu.safetensors" loss)" = "0.0625" ] || bad "cpu loss is $($st read "$tmp/cpu.safetensors" loss)"
  y=$($st read "$tmp/cpu.safetensors" y | tr '\n' ' ')
  [ "$y" = "2.75 3.25 0.25 -0.75 2.25 5.25 0.75 -1.75 " ] || bad "cpu y is $y"
done
expect_ok "$cmaec" run "$root/examples/mlp.json" --inputs "$root/examples/mlp_inputs.safetensors" --backend ref
cp "$tmp/out" "$tmp/ref.txt"
expect_ok "$cmaec" run "$root/examples/mlp.json" --inputs "$root/examples/mlp_inputs.safetensors" --backend cpu
cmp -s "$tmp/out" "$tmp/ref.txt" || bad "run --backend cpu prints differently from ref"
ls "$tmp/cache" | grep -q . || bad "nothing written to CMAEC_CACHE_DIR"

# step: AdamW on the executor lowers the MLP's loss at least 100x (as tests/cli/train.sh on ref)
$st write "$tmp/data.safetensors" x:4x3:1,0,2,0,1,-1,2,2,0,-1,0,1 target:4x2:3,3,0,-1,2,5,1,-2
expect_ok "$cmaec" step "$root/examples/mlp.json" --loss loss --steps 300 --lr 0.02 \
  --weight-decay 0 --inputs "$tmp/data.safetensors" --seed 1 --backend cpu --save "$tmp/trained.safetensors"
first=$(awk '/^step 1 /{print $4}' "$tmp/out")
last=$(awk '/^step 300 /{print $4}' "$tmp/out")
awk -v a="$first" -v b="$last" 'BEGIN { exit !(a > 0 && b * 100 <= a) }' ||
  bad "cpu: loss went from $first to $last, not 100x lower"
$st read "$tmp/trained.safetensors" optimizer.exp_avg.fc1.weight >/dev/null || bad "no AdamW moment saved"

# errors: exit 2 with one line naming the problem
CMAEC_THREADS=abc expect_fail 2 'CMAEC_THREADS' "$cmaec" run "$root/examples/mlp.json" \
  --inputs "$root/examples/mlp_inputs.safetensors" --backend cpu
CMAEC_THREADS=0 expect_fail 2 'CMAEC_THREADS' "$cmaec" step "$root/examples/mlp.json" --loss loss \
  --steps 1 --lr 0.02 --inputs "$tmp/data.safetensors" --backend cpu
expect_fail 2 'available: auto, cpu, cuda, ref' "$cmaec" run "$root/examples/mlp.json" --backend gpu
expect_fail 2 'available: auto, cpu, cuda, ref' "$cmaec" step "$root/examples/mlp.json" --loss loss --steps 1 \
  --lr 0.1 --backend tpu
finish
