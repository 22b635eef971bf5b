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

finish
