# tests/cli/data_parallel.sh CMAEC SOURCE_ROOT — `cmaec build --train --ranks 2` reduces the
# parameter gradients in buckets (data_parallel pass): the printed count matches the all_reduce
# nodes grad_bucket_<i> of the written step, --bucket-mb changes it, one rank has none, and the
# pass by name (`cmaec opt -p data_parallel`) on a step built without it finds the ranks itself.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
model="$root/models/cmae_vit_tiny_fmnist.json"
buckets_in() { grep -cE '^grad_bucket_[0-9]+: f32\[[0-9]+\] = all_reduce\(' "$1"; }
for mb in 0.5 25; do
  if expect_ok "$cmaec" build "$model" --train --ranks 2 --batch 2 --bucket-mb $mb --no-opt --text \
    -o "$tmp/step$mb.ir"; then
    n=$(sed -nE 's/^  data parallel: ([0-9]+) gradient buckets.*/\1/p' "$tmp/out")
    [ -n "$n" ] && [ "$n" = "$(buckets_in "$tmp/step$mb.ir")" ] && ok ||
      bad "--bucket-mb $mb: printed \"$n\" buckets, the step has $(buckets_in "$tmp/step$mb.ir")"
    eval "n_$(echo $mb | tr . _)=\${n:-0}"
  fi
done
[ "${n_0_5:-0}" -gt "${n_25:-0}" ] && [ "${n_25:-0}" -ge 1 ] && ok ||
  bad "0.5 MB buckets: ${n_0_5:-?}, 25 MB: ${n_25:-?}"
if expect_ok "$cmaec" build "$model" --train --batch 2 --no-opt --text -o "$tmp/one.ir"; then
  ! grep -q "data parallel" "$tmp/out" && [ "$(buckets_in "$tmp/one.ir")" -eq 0 ] && ok ||
    bad "one rank: gradient buckets"
fi
expect_fail 2 "--bucket-mb 0: not a number in (0, 1000000]" \
  "$cmaec" build "$model" --train --ranks 2 --bucket-mb 0 -o "$tmp/x.json"
# the pass by name on a step built without it (build-step with clipping and loss scaling, from
# the forward graph for 2 ranks): the graph's own ranks, 25 MB buckets; a second run refused
if expect_ok "$cmaec" build "$model" --ranks 2 --batch 2 -o "$tmp/fwd.json" &&
  expect_ok "$cmaec" build-step "$tmp/fwd.json" --loss loss --clip 1 --loss-scaling \
    --ema backbone.:target_backbone. -o "$tmp/plain.json"; then
  if expect_ok "$cmaec" opt "$tmp/plain.json" -p data_parallel --verify-each --stats; then
    grep -qE "^data_parallel .*2 ranks: 1 gradient buckets" "$tmp/out" && ok ||
      bad "data_parallel stats: $(grep '^data_parallel' "$tmp/out")"
  fi
  if expect_ok "$cmaec" opt "$tmp/plain.json" -p data_parallel; then
    [ "$(buckets_in "$tmp/out")" -eq 1 ] && ok || bad "no grad_bucket_0 in the result"
  fi
  expect_fail 2 "already has \"grad_bucket_0\"" "$cmaec" opt "$tmp/step25.ir" -p data_parallel
fi
finish
