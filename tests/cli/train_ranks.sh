# tests/cli/train_ranks.sh CMAEC SOURCE_ROOT — data-parallel cmaec train (issue 18) on a tiny
# CMAE variant, 2 CPU ranks at batch 4 each (global batch 8): `--nproc 2` (the TCP rendezvous)
# and `mpirun -np 2` (Open MPI) end bitwise equal (a 2-rank sum is a + b whatever the
# transport); a 2-rank run resumed at 2 ranks ends bitwise equal to a straight one; a
# checkpoint resumes from 2 ranks to 1 and from 1 to 2; rank 0 alone prints and writes; a rank
# killed at step 2 (or hung: stopped) makes the other exit non-zero with the collective's
# message within the timeout. What the 2 ranks compute against one process, within the
# oracle's bounds: tests/unit/test_train_ranks.c.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
export CMAEC_TUNE=off OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

box_pngs "$tmp/folder"

model="$root/models/cmae_vit_tiny_fmnist.json"
tiny=("${tiny_cmae_sets[@]}"
  --batch 8 --workers 1 --backend cpu --threads 1 --data "$tmp/folder" --seed 11 --ckpt-every 2)

# 2 ranks over the TCP rendezvous: rank 0's header and lines only, nothing on stderr
if expect_ok "$cmaec" train "$model" "${tiny[@]}" --nproc 2 --steps 4 \
  --out "$tmp/tcp"; then
  [ "$(grep -c '^training ' "$tmp/out")" -eq 1 ] || bad "--nproc 2: not one header: $(cat "$tmp/out")"
  grep -q "2 ranks at batch 4 each (tcp rank 0/2" "$tmp/out" || bad "--nproc 2: no ranks in the header"
  [ "$(grep -c '^done: step 4' "$tmp/out")" -eq 1 ] || bad "--nproc 2: not one done line"
  [ -s "$tmp/err" ] && bad "--nproc 2: stderr: $(head -c 300 "$tmp/err")"
  [ "$(wc -l <"$tmp/tcp/metrics.jsonl")" -eq 4 ] || bad "--nproc 2: metrics.jsonl rows"
  [ "$(cat "$tmp/tcp/latest")" = ckpt-4.safetensors ] || bad "--nproc 2: latest"
fi

# Open MPI: the same run, bitwise (in the sanitizer build without leak checks: Open MPI's
# plugins keep what they allocate, as in test_comm)
if ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0" expect_ok mpirun -np 2 --oversubscribe \
  "$cmaec" train "$model" "${tiny[@]}" --steps 4 --out "$tmp/mpi"; then
  grep -q "2 ranks at batch 4 each (mpi rank 0/2" "$tmp/out" || bad "mpirun: no ranks in the header"
  cmp -s "$tmp/mpi/ckpt-4.safetensors" "$tmp/tcp/ckpt-4.safetensors" ||
    bad "mpirun -np 2 and --nproc 2: the checkpoints of step 4 differ"
fi

# resumed at 2 ranks: bitwise a straight run; from 2 ranks to 1 and from 1 to 2
mkdir -p "$tmp/r22" "$tmp/r21" "$tmp/r12"
cp "$tmp/tcp/ckpt-2.safetensors" "$tmp/r22/" && echo ckpt-2.safetensors >"$tmp/r22/latest"
head -n 2 "$tmp/tcp/metrics.jsonl" >"$tmp/r22/metrics.jsonl"
cp "$tmp/r22/"* "$tmp/r21/"
expect_ok "$cmaec" train "$model" "${tiny[@]}" --nproc 2 --steps 4 --resume "$tmp/r22"
cmp -s "$tmp/r22/ckpt-4.safetensors" "$tmp/tcp/ckpt-4.safetensors" ||
  bad "2 ranks resumed at 2: the checkpoint of step 4 differs from the straight run's"
if expect_ok "$cmaec" train "$model" "${tiny[@]}" --steps 4 --resume "$tmp/r21"; then
  grep -q "steps 3..4 of" "$tmp/out" || bad "2 -> 1: did not resume at step 3: $(head -c 300 "$tmp/out")"
  [ "$(wc -l <"$tmp/r21/metrics.jsonl")" -eq 4 ] || bad "2 -> 1: metrics.jsonl rows"
  [ "$(cat "$tmp/r21/latest")" = ckpt-4.safetensors ] || bad "2 -> 1: latest"
fi
expect_ok "$cmaec" train "$model" "${tiny[@]}" --steps 2 --out "$tmp/r12"
if expect_ok "$cmaec" train "$model" "${tiny[@]}" --nproc 2 --steps 4 --resume "$tmp/r12"; then
  grep -q "steps 3..4 of" "$tmp/out" || bad "1 -> 2: did not resume at step 3"
  [ "$(wc -l <"$tmp/r12/metrics.jsonl")" -eq 4 ] || bad "1 -> 2: metrics.jsonl rows"
fi

# a rank killed as step 2 starts: the other fails that step's first collective at once (its
# connection closed), the launcher exits non-zero within the timeout
start=$(date +%s)
CMAEC_TEST_KILL_RANK=1:2 "$cmaec" train "$model" "${tiny[@]}" --nproc 2 --steps 4 \
  --comm-timeout 20 --out "$tmp/killed" >"$tmp/out" 2>"$tmp/err"
rc=$?
[ "$rc" -ne 0 ] || bad "killed rank: exit 0"
grep -q "step 2: comm: rank 0: .*a rank died or left" "$tmp/err" ||
  bad "killed rank: no message from rank 0: $(head -c 400 "$tmp/err")"
[ $(($(date +%s) - start)) -lt 20 ] || bad "killed rank: the run took the whole timeout"
# a rank that hangs (stopped) as step 2 starts: the other's watchdog fires after 2 s, the
# launcher kills the hung rank a second later
start=$(date +%s)
CMAEC_TEST_KILL_RANK=1:2:stop "$cmaec" train "$model" "${tiny[@]}" --nproc 2 --steps 4 \
  --comm-timeout 2 --out "$tmp/hung" >"$tmp/out" 2>"$tmp/err"
rc=$?
[ "$rc" -eq 1 ] || bad "hung rank: exit $rc, expected 1"
grep -q "step 2: comm: rank 0: .* did not finish within 2 s: a rank died or ranks disagree" \
  "$tmp/err" || bad "hung rank: no watchdog message: $(head -c 400 "$tmp/err")"
grep -q "rank 1 killed: still running after rank 0 failed" "$tmp/err" ||
  bad "hung rank: the launcher did not kill it: $(head -c 400 "$tmp/err")"
[ $(($(date +%s) - start)) -lt 60 ] || bad "hung rank: the run did not end"

# option errors
expect_fail 2 "--nproc 0: not an integer in [1, 1024]" "$cmaec" train "$model" --nproc 0
expect_fail 2 "--comm-timeout -1: seconds in (0, 1e6]" "$cmaec" train "$model" --comm-timeout -1
# every rank refuses a global batch it cannot split; the launcher exits with that status
"$cmaec" train "$model" "${tiny[@]}" --batch 7 --nproc 2 --steps 1 --out "$tmp/odd" \
  >"$tmp/out" 2>"$tmp/err"
rc=$?
[ "$rc" -eq 2 ] || bad "--batch 7 --nproc 2: exit $rc, expected 2"
[ "$(grep -c "rank [01]: optimizer.batch: the global batch 7 is not a multiple of the 2 ranks" \
  "$tmp/err")" -eq 2 ] || bad "--batch 7 --nproc 2: $(head -c 400 "$tmp/err")"
finish
