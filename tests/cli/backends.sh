# tests/cli/backends.sh CMAEC SOURCE_ROOT — choosing a backend on a machine
# without a CUDA driver (forced by $CMAEC_CUDA_DRIVER_LIBRARY, so that it holds
# on GPU machines too): --backend cuda exits 2 naming the driver on run, step,
# train and eval, before anything slow; --backend auto (the default) runs on the
# CPU and says why in the header (train's: tests/unit/test_trainer.c); bad
# --backend/--device/--cuda-graphs values exit 2; info says why it lists no
# CUDA device.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
st="python3 $root/tests/cli/st.py"
export CMAEC_CACHE_DIR="$tmp/cache"
export CMAEC_CUDA_DRIVER_LIBRARY="$tmp/no-driver/libcuda.so.1"
mlp=("$root/examples/mlp.json" --inputs "$root/examples/mlp_inputs.safetensors")
step=("$root/examples/mlp.json" --loss loss --steps 2 --lr 0.01 --inputs "$root/examples/mlp_inputs.safetensors")

model="$root/models/cmae_vit_tiny_fmnist.json"
tiny=(--set encoder.width=16 --set encoder.depth=1 --set encoder.heads=2
  --set pixel_decoder.width=16 --set pixel_decoder.depth=1 --set pixel_decoder.heads=2
  --set feature_decoder.width=16 --set feature_decoder.depth=1 --set feature_decoder.heads=2
  --set projector.hidden=32 --set projector.out=16 --set predictor.hidden=32
  --set predictor.out=16 --set data.image_size=16 --set data.master_size=20
  --batch 8 --workers 1 --seed 2)

# --backend cuda without a driver: exit 2, one line with the loader's message, on every command
driver_msg="CUDA driver not found: $CMAEC_CUDA_DRIVER_LIBRARY"
expect_fail 2 "cmaec run: $driver_msg" "$cmaec" run "${mlp[@]}" --backend cuda
expect_fail 2 "cmaec step: $driver_msg" "$cmaec" step "${step[@]}" --backend cuda
expect_fail 2 "cmaec train: $driver_msg" "$cmaec" train "$model" "${tiny[@]}" --steps 1 \
  --out "$tmp/cuda_run" --backend cuda --device 0 --cuda-graphs off
[ -e "$tmp/cuda_run" ] && bad "train --backend cuda without a driver created its output directory"
expect_fail 2 "cmaec eval: $driver_msg" "$cmaec" eval "$tmp/no_such_run" --backend cuda

# auto (the default) runs on the CPU and says why
expect_ok "$cmaec" run "${mlp[@]}" --backend auto && cp "$tmp/out" "$tmp/auto.txt"
expect_ok "$cmaec" run "${mlp[@]}" --backend ref
cmp -s "$tmp/out" "$tmp/auto.txt" || bad "run --backend auto prints differently from ref"
expect_ok "$cmaec" step "${step[@]}"
auto_kind=cpu # the oracle in a build without LLVM (tests/cli/without_llvm.sh)
"$cmaec" info | grep -q "LLVM .*(-DCMAEC_LLVM=OFF)" && auto_kind=ref
grep -q "backend $auto_kind (auto: no CUDA driver)$" "$tmp/out" || bad "step header: $(head -1 "$tmp/out")"
grep -q "^step 2 loss" "$tmp/out" || bad "step auto: no step 2"
# bad values: exit 2, one line naming the option
expect_fail 2 "--backend gpu: unknown backend (available: auto, cpu, cuda, ref)" \
  "$cmaec" run "${mlp[@]}" --backend gpu
expect_fail 2 "--backend tpu: unknown backend" "$cmaec" train "$model" --backend tpu
expect_fail 2 "--backend tpu: unknown backend" "$cmaec" eval "$tmp/no_such_run" --backend tpu
expect_fail 2 "--device x: expected a GPU ordinal" "$cmaec" step "${step[@]}" --device x
expect_fail 2 "--device -1: expected a GPU ordinal" "$cmaec" run "${mlp[@]}" --device -1
expect_fail 2 "--device applies to --backend cuda (or auto), not cpu" \
  "$cmaec" run "${mlp[@]}" --backend cpu --device 1
expect_fail 2 "--cuda-graphs applies to --backend cuda (or auto), not ref" \
  "$cmaec" train "$model" --backend ref --cuda-graphs off
expect_fail 2 "--cuda-graphs maybe: expected on or off" "$cmaec" eval "$tmp/no_such_run" --cuda-graphs maybe
expect_fail 2 "--precision f64 needs --backend ref" "$cmaec" run "${mlp[@]}" --precision f64 \
  --backend cpu

# --help documents the options
for c in run step train eval; do
  expect_ok "$cmaec" $c --help
  grep -q -- "--cuda-graphs on|off" "$tmp/out" || bad "$c --help lacks --cuda-graphs"
  grep -q -- "--backend auto" "$tmp/out" || bad "$c --help lacks --backend auto"
done

# info: no device, and why
expect_ok "$cmaec" info
grep -q "^CUDA devices: none (CUDA driver not found: $CMAEC_CUDA_DRIVER_LIBRARY" "$tmp/out" ||
  bad "info: $(grep -i cuda "$tmp/out")"
finish
