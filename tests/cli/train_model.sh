# tests/cli/train_model.sh CMAEC SOURCE_ROOT — cmaec train on a tiny CMAE
# variant (ref backend) over a small image folder: a run and its outputs, a
# trainer SIGKILLed while checkpointing every step resumes and ends bitwise
# equal to a straight run, Ctrl-C (SIGINT) saves and exits 130, a huge lr stops
# with exit 2 naming the step and tensor, bad options exit 2.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"

box_pngs "$tmp/folder"

model="$root/models/cmae_vit_tiny_fmnist.json"
tiny=("${tiny_cmae_sets[@]}"
  --batch 8 --workers 2 --backend ref --data "$tmp/folder" --seed 11)

# a short run: the report, one metrics row per step, a checkpoint named by latest
if expect_ok "$cmaec" train "$model" "${tiny[@]}" --steps 6 --out "$tmp/run"; then
  grep -q "^training cmae_vit_tiny_fmnist: .* 21 images (2 steps/epoch at batch 8)" "$tmp/out" ||
    bad "train: no start line: $(head -c 300 "$tmp/out")"
  grep -q "backend ref" "$tmp/out" || bad "train: backend not reported"
  grep -q "^done: step 6, loss " "$tmp/out" || bad "train: no final line: $(tail -c 300 "$tmp/out")"
  [ "$(wc -l <"$tmp/run/metrics.jsonl")" -eq 6 ] || bad "train: metrics.jsonl rows"
  [ "$(cat "$tmp/run/latest")" = ckpt-6.safetensors ] || bad "train: latest"
fi
expect_ok "$cmaec" train --help
grep -q -- "--resume" "$tmp/out" || bad "train --help: no --resume"

# SIGKILL while writing a checkpoint every step, then resume: bitwise equal to
# a straight run of the same length
"$cmaec" train "$model" "${tiny[@]}" --steps 100000 --ckpt-every 1 --out "$tmp/killed" \
  >/dev/null 2>&1 &
pid=$!
for _ in $(seq 200); do
  [ -f "$tmp/killed/latest" ] && [ "$(wc -l <"$tmp/killed/metrics.jsonl")" -ge 4 ] && break
  sleep 0.05
done
kill -9 $pid
wait $pid 2>/dev/null
last=$(sed -n 's/^ckpt-\([0-9]*\)\.safetensors$/\1/p' "$tmp/killed/latest")
if [ -z "$last" ]; then
  bad "SIGKILL: no checkpoint before the kill"
else
  n=$((last + 3))
  expect_ok "$cmaec" train "$model" "${tiny[@]}" --steps $n --ckpt-every 1 --resume "$tmp/killed"
  expect_ok "$cmaec" train "$model" "${tiny[@]}" --steps $n --ckpt-every 1 --out "$tmp/straight"
  cmp -s "$tmp/killed/ckpt-$n.safetensors" "$tmp/straight/ckpt-$n.safetensors" ||
    bad "SIGKILL + resume: checkpoint of step $n differs from a straight run"
  [ "$(wc -l <"$tmp/killed/metrics.jsonl")" -eq $n ] || bad "SIGKILL + resume: metrics rows"
fi

# resuming with another config is refused, naming the key
expect_fail 2 "different optimizer.base_lr" "$cmaec" train "$model" "${tiny[@]}" \
  --set optimizer.base_lr=0.2 --steps 20 --resume "$tmp/run"

# Ctrl-C: finishes the step, saves, exits 130
"$cmaec" train "$model" "${tiny[@]}" --steps 100000 --out "$tmp/int" >"$tmp/int.out" 2>&1 &
pid=$!
for _ in $(seq 200); do
  [ -f "$tmp/int/metrics.jsonl" ] && [ "$(wc -l <"$tmp/int/metrics.jsonl")" -ge 2 ] && break
  sleep 0.05
done
kill -INT $pid
wait $pid
rc=$?
if [ $rc -ne 130 ]; then
  bad "SIGINT: exit $rc, expected 130: $(tail -c 300 "$tmp/int.out")"
elif ! grep -q "^interrupted at step [0-9]*; continue with --resume" "$tmp/int.out"; then
  bad "SIGINT: no message: $(tail -c 300 "$tmp/int.out")"
elif [ ! -f "$tmp/int/$(cat "$tmp/int/latest")" ]; then
  bad "SIGINT: no checkpoint"
else
  ok
fi

# a huge lr: exit 2, one line naming the step and the first non-finite tensor
expect_fail 2 "first non-finite tensor in execution order: " "$cmaec" train "$model" "${tiny[@]}" --steps 20 \
  --set optimizer.base_lr=1e30 --out "$tmp/nan"
grep -q "step [0-9]*: non-finite loss" "$tmp/err" || bad "non-finite: $(cat "$tmp/err")"

# bad options
expect_fail 2 "unknown" "$cmaec" train "$model" --bogus
expect_fail 2 "--backend gpu" "$cmaec" train "$model" --backend gpu
expect_fail 2 "--steps 0" "$cmaec" train "$model" --steps 0
expect_fail 2 "--batch x" "$cmaec" train "$model" --batch x
expect_fail 2 "not both" "$cmaec" train "$model" --steps 3 --epochs 1
expect_fail 2 "--views" "$cmaec" train "$model" --views crop
expect_fail 2 "expected one MODEL" "$cmaec" train
expect_fail 2 "encoder.heads" "$cmaec" train "$model" "${tiny[@]}" --set encoder.heads=3 \
  --out "$tmp/bad"
expect_fail 2 "differ" "$cmaec" train "$model" --out "$tmp/a" --resume "$tmp/b"
expect_fail 2 "cannot resume" "$cmaec" train "$model" "${tiny[@]}" --resume "$tmp/empty"
mkdir "$tmp/empty"
expect_fail 2 "cannot resume" "$cmaec" train "$model" "${tiny[@]}" --resume "$tmp/empty"
finish
