# tests/cli/commands.sh CMAEC SOURCE_ROOT — help, exit codes and one-line errors
# of every command, and cmaec info.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"

for c in check print dot run info grad step build-step; do
  if expect_ok "$cmaec" "$c" --help && ! grep -q "usage: cmaec $c" "$tmp/out"; then
    bad "cmaec $c --help does not print its usage"
  fi
done
expect_ok "$cmaec" --help
expect_fail 2 'unknown command "frobnicate"' "$cmaec" frobnicate
expect_fail 2 "unknown option --bogus" "$cmaec" check --bogus x.json
expect_fail 2 "option --inputs needs a value" "$cmaec" run "$root/examples/mlp.json" --inputs
expect_fail 2 "no-such-file.json" "$cmaec" check "$tmp/no-such-file.json"
expect_fail 2 "--seed -3: not a non-negative integer" "$cmaec" run "$root/examples/mlp.json" --seed -3
expect_fail 2 "unknown backend" "$cmaec" run "$root/examples/mlp.json" --backend tpu
expect_fail 2 'input "x" (f32[4,3]) has no value' "$cmaec" run "$root/examples/mlp.json"
expect_fail 2 'no node named "nope"' "$cmaec" grad "$root/examples/mlp.json" --loss nope

# info: LLVM is linked, so it is always found; every component has a line.
if expect_ok "$cmaec" info; then
  for comp in LLVM NVRTC "CUDA driver" NCCL MPI; do
    grep -q "^  $comp " "$tmp/out" || bad "cmaec info has no line for $comp"
  done
  grep -q "^  LLVM  *found  *19\." "$tmp/out" || bad "cmaec info: LLVM 19 not found: $(cat "$tmp/out")"
fi

# Malformed safetensors: each gives exit 2 and one line naming the file.
python3 "$root/tests/malformed/make_safetensors.py" "$tmp/st" >/dev/null
n=0
while IFS=$'\t' read -r file expect; do
  case "$file" in '' | '#'*) continue ;; esac
  n=$((n + 1))
  expect_fail 2 "$expect" "$cmaec" run "$root/examples/mlp.json" --inputs "$tmp/st/$file"
  grep -q "^$tmp/st/$file: " "$tmp/err" || bad "$file: the message does not start with the path"
done <"$root/tests/malformed/expected_safetensors.tsv"
[ "$n" -ge 10 ] || bad "only $n malformed safetensors files"
# A tensor of the wrong type for an input
python3 "$root/tests/cli/st.py" write "$tmp/wrong.safetensors" x:4x2:1,2,3,4,5,6,7,8
expect_fail 2 'tensor "x" is f32[4,2] but input "x" is f32[4,3]' \
  "$cmaec" run "$root/examples/mlp.json" --inputs "$tmp/wrong.safetensors"
finish
