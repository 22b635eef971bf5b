# tests/cli/without_llvm.sh CMAEC SOURCE_ROOT — the build option CMAEC_LLVM as the binary shows
# it: with LLVM, info finds it linked; without (-DCMAEC_LLVM=OFF), info says so and every way
# to the CPU backend exits 2 with one line naming the build (never a stub that runs).
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
export CMAEC_CACHE_DIR="$tmp/cache"
mlp=("$root/examples/mlp.json" --inputs "$root/examples/mlp_inputs.safetensors")
model="$root/models/cmae_vit_tiny_fmnist.json"
no_cpu="this cmaec was built without LLVM (-DCMAEC_LLVM=OFF): the cpu backend is unavailable"

expect_ok "$cmaec" info
if grep -q "^  LLVM .*found .*(linked" "$tmp/out"; then
  # with LLVM: the CPU backend runs
  expect_ok "$cmaec" run "${mlp[@]}" --backend cpu
  grep -q "built without LLVM" "$tmp/out" "$tmp/err" && bad "an LLVM build says it has none"
else
  grep -q "^  LLVM .*left out of this build (-DCMAEC_LLVM=OFF)" "$tmp/out" ||
    bad "info: no LLVM line saying the build left it out: $(grep LLVM "$tmp/out")"
  expect_fail 2 "$no_cpu" "$cmaec" run "${mlp[@]}" --backend cpu
  expect_fail 2 "$no_cpu" "$cmaec" compile "$model" --target cpu -o "$tmp/cpu"
  expect_fail 2 "$no_cpu" "$cmaec" train "$model" --backend cpu --steps 1 --out "$tmp/train"
  expect_fail 2 "built without LLVM (-DCMAEC_LLVM=OFF)" env CMAEC_CPU=znver4 \
    "$cmaec" compile "$model" --target cpu -o "$tmp/cpu"
  # the reference evaluator and lowering for CUDA need no LLVM
  expect_ok "$cmaec" run "${mlp[@]}" --backend ref
  expect_ok "$cmaec" compile "$model" --target cuda --emit kir -o "$tmp/cuda"
  [ -s "$tmp/cuda/kernels.kir" ] || bad "compile --target cuda wrote no kernels.kir"
fi
finish
