# tests/cli/grad_ops.sh CMAEC SOURCE_ROOT — `cmaec grad` on every differentiable
# op and on the composite layers (LayerNorm, softmax, log-softmax + CE, GELU,
# BatchNorm, L2-normalize, masked mean): the graphs of test_autodiff, dumped, each
# within 1e-6 relative error of central finite differences.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
unit=$(dirname "$cmaec")/tests/test_autodiff
mkdir -p "$tmp/cases"
# every test of test_autodiff except the random graphs (they have their own check)
for t in test_unary_ops test_binary_ops_broadcasting test_select_and_ties test_reductions \
  test_movement test_gather_scatter test_matmul test_conv test_collectives_one_rank test_composites; do
  CMAEC_GRAD_DUMP=$tmp/cases "$unit" "$t" >/dev/null 2>&1 || bad "test_autodiff $t failed"
done
n=0
while IFS=$'\t' read -r file loss what; do
  n=$((n + 1))
  expect_ok "$cmaec" grad "$tmp/cases/$file.json" --loss "$loss" --inputs "$tmp/cases/$file.safetensors" \
    --max-rel-error 1e-6 || echo "  ($what)"
  seen="${seen:-} $what"
done <"$tmp/cases/index.tsv"
[ "$n" -ge 60 ] || bad "only $n graphs were checked"
for what in neg abs exp log sqrt rsqrt recip tanh erf relu cast add sub mul div max min pow select \
  reduce_sum reduce_max movement "slice with steps" gather scatter_add matmul conv2d "conv2d adjoints" \
  collectives layer_norm softmax "log_softmax + cross-entropy" "gelu (erf)" "batch_norm (training)" \
  l2_normalize "masked mean"; do
  case " $seen " in *" $what"*) ;; *) bad "no graph for $what" ;; esac
done
echo "cmaec grad checked $n graphs"
finish
