# tests/cli/bad_inputs.sh CMAEC SOURCE_ROOT — inputs every reader and backend must
# reject alike (issue 13 item 4): whole-graph rules in text IR, gather/scatter
# indices out of range on every backend, values outside their dtype, and
# initializers that `run` would reject, each with exit 2 and one line.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"

# Text IR is verified as a whole graph: two assigns to one state.
cat >"$tmp/assign2.ir" <<'IR'
s: f32[2] = state {init=zeros}
x: f32[2] = input
a1: f32[2] = assign(s, x)
a2: f32[2] = assign(s, x)
outputs(a1, a2)
IR
for c in check print run; do
  expect_fail 2 'line 4: "a2" (assign): "s" is already assigned by "a1"' "$cmaec" $c "$tmp/assign2.ir"
done
expect_fail 2 "already assigned" "$cmaec" print --json "$tmp/assign2.ir"

# Initializers: `check` applies the rule `run` does (one rule, one message).
for f in init_negative_std:"init normal: std must be >= 0, got -1" \
  init_uniform_backwards:"init uniform: low 1 > high 0" \
  init_sincos_rank1:"init sincos_2d needs a float [..., rows, D], got f32[16]"; do
  for c in check run; do
    expect_fail 2 "${f#*:}" "$cmaec" $c "$root/tests/malformed/${f%%:*}.json"
  done
done

# Values outside their dtype are rejected on load, by every command and backend
# alike (the oracle saturated i32 3e9 to INT_MAX, the CPU wrapped it).
echo '{"format": "cmaec.graph/1", "nodes": [{"name": "c", "op": "const", "dtype": "i32",
  "shape": [2], "data": [1, 3e9]}], "outputs": ["c"]}' >"$tmp/big.json"
for b in ref cpu; do
  expect_fail 2 "nodes[0].data[1]: 3000000000 is outside i32" \
    env CMAEC_CACHE_DIR= "$cmaec" run "$tmp/big.json" --backend $b
done
cat >"$tmp/big.ir" <<'IR'
c: i32[] = const {value=3e9}
outputs(c)
IR
expect_fail 2 'line 1: "c" (const): value 3000000000 is outside i32' "$cmaec" run "$tmp/big.ir"

# A UTF-8 byte-order mark before '{' is graph JSON, and is read as such.
printf '\xef\xbb\xbf{"format": "cmaec.graph/1", "inputs": [{"name": "x", "dtype": "f32", "shape": [2]}], "outputs": ["x"]}\n' >"$tmp/bom.json"
expect_ok "$cmaec" check "$tmp/bom.json"
grep -q "ok: 1 nodes, 1 outputs" "$tmp/out" || bad "check bom.json: $(cat "$tmp/out")"

# gather/scatter_add indices from the user's file outside the axis: exit 2 with
# one message on every backend (the CPU clamped them and printed garbage).
cat >"$tmp/gather.json" <<'JSON'
{"format": "cmaec.graph/1",
 "inputs": [{"name": "x", "dtype": "f32", "shape": [2, 3]}, {"name": "fi", "dtype": "f32", "shape": [2, 2]},
            {"name": "u", "dtype": "f32", "shape": [2, 2]}],
 "nodes": [{"name": "i", "op": "cast", "inputs": ["fi"], "dtype": "i32"},
           {"name": "g", "op": "gather", "inputs": ["x", "i"], "axis": 1},
           {"name": "s", "op": "scatter_add", "inputs": ["x", "i", "u"], "axis": 1}],
 "outputs": ["g", "s"]}
JSON
python3 "$root/tests/cli/st.py" write "$tmp/ok.st" x:2x3:1,2,3,4,5,6 fi:2x2:0,2,1,0 u:2x2:1,1,1,1
python3 "$root/tests/cli/st.py" write "$tmp/past.st" x:2x3:1,2,3,4,5,6 fi:2x2:0,2,1,7 u:2x2:1,1,1,1
python3 "$root/tests/cli/st.py" write "$tmp/neg.st" x:2x3:1,2,3,4,5,6 fi:2x2:0,-1,1,0 u:2x2:1,1,1,1
for b in ref cpu; do
  if expect_ok env CMAEC_CACHE_DIR= "$cmaec" run "$tmp/gather.json" --inputs "$tmp/ok.st" --backend $b; then
    grep -q "^g: f32\[2,2\] = 1 3 5 4$" "$tmp/out" || bad "$b: gather output: $(cat "$tmp/out")"
  fi
  expect_fail 2 'nodes[4] "g" (gather): index 7 at [1,1] outside [0, 3)' \
    env CMAEC_CACHE_DIR= "$cmaec" run "$tmp/gather.json" --inputs "$tmp/past.st" --backend $b
  expect_fail 2 'nodes[4] "g" (gather): index -1 at [0,1] outside [0, 3)' \
    env CMAEC_CACHE_DIR= "$cmaec" run "$tmp/gather.json" --inputs "$tmp/neg.st" --backend $b
done

finish
