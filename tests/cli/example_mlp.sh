# tests/cli/example_mlp.sh CMAEC SOURCE_ROOT — the example graph end to end:
# check, print (text and JSON round trips), dot, and run against outputs worked
# out by hand (see examples/make_mlp_inputs.py).
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
st="python3 $root/tests/cli/st.py"

expect_ok "$cmaec" check "$root/examples/mlp.json"
grep -q "ok: 18 nodes, 2 outputs" "$tmp/out" || bad "check summary: $(cat "$tmp/out")"

# text IR and JSON round trips through the CLI
expect_ok "$cmaec" print "$root/examples/mlp.json" && cp "$tmp/out" "$tmp/mlp.txt"
expect_ok "$cmaec" print "$tmp/mlp.txt" && cmp -s "$tmp/out" "$tmp/mlp.txt" || bad "text IR round trip differs"
expect_ok "$cmaec" print --json "$tmp/mlp.txt" && cp "$tmp/out" "$tmp/mlp2.json"
expect_ok "$cmaec" print --json "$tmp/mlp2.json" && cmp -s "$tmp/out" "$tmp/mlp2.json" || bad "JSON round trip differs"
expect_ok "$cmaec" dot "$root/examples/mlp.json"
grep -q '^digraph' "$tmp/out" || bad "dot output does not start a digraph"

# run: outputs equal the hand-computed values exactly (all are exact in f32)
expect_ok "$cmaec" run "$root/examples/mlp.json" --inputs "$root/examples/mlp_inputs.safetensors" \
  --outputs "$tmp/out.safetensors"
[ "$($st read "$tmp/out.safetensors" loss)" = "0.0625" ] || bad "loss is $($st read "$tmp/out.safetensors" loss)"
y=$($st read "$tmp/out.safetensors" y | tr '\n' ' ')
[ "$y" = "2.75 3.25 0.25 -0.75 2.25 5.25 0.75 -1.75 " ] || bad "y is $y"
# the same in f64 precision
expect_ok "$cmaec" run "$root/examples/mlp.json" --inputs "$root/examples/mlp_inputs.safetensors" \
  --outputs "$tmp/out64.safetensors" --precision f64 --quiet
[ "$($st read "$tmp/out64.safetensors" loss)" = "0.0625" ] || bad "f64 loss differs"

# params from their initializers: same seed, same bits; another seed, other bits
$st write "$tmp/data.safetensors" x:4x3:1,0,2,0,1,-1,2,2,0,-1,0,1 target:4x2:3,3,0,-1,2,5,1,-2
expect_ok "$cmaec" run "$root/examples/mlp.json" --inputs "$tmp/data.safetensors" --seed 7 --outputs "$tmp/a.safetensors"
expect_ok "$cmaec" run "$root/examples/mlp.json" --inputs "$tmp/data.safetensors" --seed 7 --outputs "$tmp/b.safetensors"
expect_ok "$cmaec" run "$root/examples/mlp.json" --inputs "$tmp/data.safetensors" --seed 8 --outputs "$tmp/c.safetensors"
cmp -s "$tmp/a.safetensors" "$tmp/b.safetensors" || bad "same seed gave different outputs"
cmp -s "$tmp/a.safetensors" "$tmp/c.safetensors" && bad "different seeds gave the same outputs"
finish
