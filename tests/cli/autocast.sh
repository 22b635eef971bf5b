# tests/cli/autocast.sh CMAEC SOURCE_ROOT — `cmaec opt STEP -p autocast,simplify,cse,dce` on a
# shipped variant's training step: the statistics count every f32 contraction of the step as
# rewritten, the result verifies after every pass, and no f32 contraction is left (the clean-up
# undoes no rounding; cse may merge duplicated contractions, so at most as many remain).
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
contraction='= (matmul|conv2d|conv2d_grad_input|conv2d_grad_weight)\('
count() { grep -cE "^[^ ]+: $1\[[0-9,]*\] $contraction" "$2"; }
if expect_ok "$cmaec" build "$root/models/cmae_vit_tiny_fmnist.json" --train --no-opt --text \
  -o "$tmp/step.ir"; then
  n=$(count f32 "$tmp/step.ir")
  [ "$n" -gt 0 ] && ok || bad "no f32 contraction in the step"
  if expect_ok "$cmaec" opt "$tmp/step.ir" -p autocast,simplify,cse,dce --verify-each --stats; then
    if grep -qE "^autocast .* $n contractions to bf16, [0-9]+ casts" "$tmp/out"; then
      ok
    else
      bad "the statistics do not count $n contractions: $(grep '^autocast' "$tmp/out")"
    fi
  fi
  if expect_ok "$cmaec" opt "$tmp/step.ir" -p autocast,simplify,cse,dce --verify-each; then
    f32=$(count f32 "$tmp/out")
    bf16=$(count bf16 "$tmp/out")
    [ "$f32" -eq 0 ] && ok || bad "$f32 f32 contractions left"
    [ "$bf16" -gt 0 ] && [ "$bf16" -le "$n" ] && ok || bad "$bf16 bf16 contractions of $n"
  fi
fi
finish
