# tests/cli/cpu_target.sh CMAEC SOURCE_ROOT — CMAEC_CPU through the CLI: a named
# CPU's code (vector registers in `compile`'s assembly), the same results as the
# host's, an unknown name and a CPU this host cannot run both exit 2 naming
# CMAEC_CPU, and `compile` still writes code for the latter.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
export CMAEC_CACHE_DIR="$tmp/cache"
mlp=("$root/examples/mlp.json" --inputs "$root/examples/mlp_inputs.safetensors")

# compile: the assembly uses the named CPU's vector registers (host-independent)
for spec in x86-64:xmm:ymm x86-64-v3:ymm:zmm x86-64-v4:zmm:- znver4:zmm:-; do
  IFS=: read -r cpu want unwanted <<<"$spec"
  CMAEC_CPU=$cpu expect_ok "$cmaec" compile "$root/examples/mlp.json" --target cpu --emit llvm \
    -o "$tmp/$cpu" || continue
  grep -q "for x86_64[^ ]* $cpu " "$tmp/out" || bad "$cpu: compile printed $(cat "$tmp/out")"
  grep -q "%$want" "$tmp/$cpu/kernels.s" || bad "$cpu: no %$want in kernels.s"
  if [ "$unwanted" != - ] && grep -q "%$unwanted" "$tmp/$cpu/kernels.s"; then
    bad "$cpu: %$unwanted in kernels.s"
  fi
done

# run: a CPU every x86-64 host runs gives the host's exact outputs (the MLP is exact in f32)
expect_ok "$cmaec" run "${mlp[@]}" --backend ref && cp "$tmp/out" "$tmp/ref.txt"
for cpu in x86-64 native; do
  CMAEC_CPU=$cpu expect_ok "$cmaec" run "${mlp[@]}" --backend cpu &&
    { cmp -s "$tmp/out" "$tmp/ref.txt" || bad "CMAEC_CPU=$cpu prints differently from ref"; }
done

# errors: exit 2, one line naming CMAEC_CPU
CMAEC_CPU=znver99 expect_fail 2 'CMAEC_CPU=znver99: not an x86-64 CPU' "$cmaec" run "${mlp[@]}" \
  --backend cpu
CMAEC_CPU=znver99 expect_fail 2 'CMAEC_CPU=znver99' "$cmaec" compile "$root/examples/mlp.json" \
  --target cpu -o "$tmp/bad"
if grep -q avx512f /proc/cpuinfo; then
  CMAEC_CPU=x86-64-v4 expect_ok "$cmaec" run "${mlp[@]}" --backend cpu
else
  CMAEC_CPU=x86-64-v4 expect_fail 2 'CMAEC_CPU=x86-64-v4 needs avx512' "$cmaec" run "${mlp[@]}" \
    --backend cpu
  CMAEC_CPU=skylake-avx512 expect_fail 2 'lacks' "$cmaec" step "$root/examples/mlp.json" \
    --loss loss --steps 1 --lr 0.02 --inputs "$root/examples/mlp_inputs.safetensors" --backend cpu
fi
finish
