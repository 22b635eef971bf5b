# tests/cli/tune.sh CMAEC SOURCE_ROOT [train] — cmaec tune on a tiny variant (the CPU): the
# three most expensive stages searched (two plans each) and recorded, a second tune searches
# nothing, --report lists them; bad options exit 2. With "train" (cli.tune.train, labelled long:
# the step's cold compile takes a while) also: a training run after it uses the tuned plans (and
# CMAEC_TUNE=off does not), and train --tune.
set -u
cmaec=$1
root=$2
mode=${3:-quick}
. "$root/tests/cli/lib.bash"
export CMAEC_CACHE_DIR="$tmp/cache"
unset CMAEC_TUNE

# 8 gray 16x16 PNGs in 2 classes
python3 - "$tmp/folder" <<'PY'
import os, struct, sys, zlib
root = sys.argv[1]
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
for k in range(8):
    d = os.path.join(root, "c%d" % (k % 2))
    os.makedirs(d, exist_ok=True)
    rows = b"".join(b"\0" + bytes((x * 7 + y * 3 + k * 11) % 256 for x in range(16)) for y in range(16))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    open(os.path.join(d, "%02d.png" % k), "wb").write(png)
PY

model="$root/models/cmae_vit_tiny_fmnist.json"
tiny=(--set encoder.width=16 --set encoder.depth=1 --set encoder.heads=2
  --set pixel_decoder.width=16 --set pixel_decoder.depth=1 --set pixel_decoder.heads=2
  --set feature_decoder.width=16 --set feature_decoder.depth=1 --set feature_decoder.heads=2
  --set projector.hidden=32 --set projector.out=16 --set predictor.hidden=32
  --set predictor.out=16 --set data.image_size=16 --set data.master_size=20 --batch 4)
search=(--backend cpu --threads 2 --max-stages 3 --max-candidates 2 --budget 0)

# the first tune searches three stages and shows its progress on stderr
expect_ok "$cmaec" tune "$model" "${tiny[@]}" "${search[@]}" &&
  grep -q "^3 tunable stages: 3 searched, 0 from the database" "$tmp/out" ||
  bad "first tune: $(cat "$tmp/out")"
grep -q "tune \[" "$tmp/err" || bad "first tune: no progress on stderr: $(head -c 300 "$tmp/err")"
[ -f "$CMAEC_CACHE_DIR/tuning.db" ] || bad "no $CMAEC_CACHE_DIR/tuning.db"
# the second finds all three in the database
expect_ok "$cmaec" tune "$model" "${tiny[@]}" "${search[@]}" &&
  grep -q "^3 tunable stages: 0 searched, 3 from the database.*0 candidates measured" "$tmp/out" ||
  bad "second tune: $(cat "$tmp/out")"
expect_ok "$cmaec" tune --report && grep -q "total: 3 tuned stages" "$tmp/out" ||
  bad "report: $(cat "$tmp/out")"
grep -q "^device cpu " "$tmp/out" || bad "report names no CPU device: $(cat "$tmp/out")"

expect_fail 2 "--budget" "$cmaec" tune "$model" --budget -1
expect_fail 2 "--max-stages" "$cmaec" tune "$model" --max-stages 0
expect_fail 2 "--report takes no MODEL" "$cmaec" tune "$model" --report
expect_fail 2 "CMAEC_TUNE" env CMAEC_TUNE=sometimes "$cmaec" tune "$model" "${tiny[@]}" --backend cpu
expect_fail 2 "--tune-budget" "$cmaec" train "$model" --tune-budget 5
if [ "$mode" != train ]; then
  echo "tune: $pass passed, $fail failed"
  [ "$fail" -eq 0 ]
  exit
fi

# a training run (the README's main job) uses them; with CMAEC_TUNE=off it does not
train=(train "$model" "${tiny[@]}" --backend cpu --threads 2 --data "$tmp/folder" --steps 1)
expect_ok "$cmaec" "${train[@]}" --out "$tmp/run1" &&
  grep -q "tuned plans for [3-9] stages" "$tmp/out" || bad "train: $(head -c 600 "$tmp/out")"
expect_ok env CMAEC_TUNE=off "$cmaec" "${train[@]}" --out "$tmp/run2" &&
  ! grep -q "tuned plans" "$tmp/out" || bad "train, CMAEC_TUNE=off: $(head -c 600 "$tmp/out")"
# train --tune searches what the database lacks first (a fourth stage here), then uses it
expect_ok "$cmaec" "${train[@]}" --out "$tmp/run3" --tune --tune-budget 2 &&
  grep -q "^tune: .* stages: .* searched" "$tmp/out" && grep -q "tuned plans for" "$tmp/out" ||
  bad "train --tune: $(head -c 600 "$tmp/out")"

echo "tune: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
