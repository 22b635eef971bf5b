# tests/cli/train_inputs.sh CMAEC SOURCE_ROOT — cmaec train's options and the
# inputs it must refuse early: each option lands where it should, progress
# lines, resume below the checkpoint, the output directory, image sizes and
# the worker count (a tiny CMAE variant on the ref backend, a small folder).
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"

# pngs DIR N SIDE: N gray SIDE x SIDE PNGs in 3 classes (a bright box on noise)
pngs() {
  python3 - "$1" "$2" "$3" <<'PY'
import os, random, struct, sys, zlib
random.seed(5)
root, n, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
for k in range(n):
    d = os.path.join(root, "c%d" % (k % 3))
    os.makedirs(d, exist_ok=True)
    y0, x0 = random.randrange(side // 2), random.randrange(side // 2)
    rows = b""
    for y in range(side):
        rows += b"\0" + bytes((160 if y0 <= y < y0 + side // 2 and x0 <= x < x0 + side // 2 else 0)
                              + random.randrange(90) for x in range(side))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    open(os.path.join(d, "%02d.png" % k), "wb").write(png)
PY
}
pngs "$tmp/folder" 21 28

model="$root/models/cmae_vit_tiny_fmnist.json"
tiny=(--set encoder.width=16 --set encoder.depth=1 --set encoder.heads=2
  --set pixel_decoder.width=16 --set pixel_decoder.depth=1 --set pixel_decoder.heads=2
  --set feature_decoder.width=16 --set feature_decoder.depth=1 --set feature_decoder.heads=2
  --set projector.hidden=32 --set projector.out=16 --set predictor.hidden=32
  --set predictor.out=16 --set data.image_size=16 --set data.master_size=20
  --set schedule.warmup_epochs=0 --set optimizer.base_lr=0.1
  --batch 8 --backend ref --data "$tmp/folder" --seed 11)

# checkpoints RUN: the steps of the checkpoints kept in RUN, ascending
checkpoints() {
  ls "$1" | sed -n 's/^ckpt-\([0-9]*\)\.safetensors$/\1/p' | sort -n | tr '\n' ' '
}

# --- each option lands where it should: --ckpt-every N and --workers N used to set --keep N
expect_ok "$cmaec" train "$model" "${tiny[@]}" --steps 4 --ckpt-every 1 --out "$tmp/ce"
[ "$(checkpoints "$tmp/ce")" = "2 3 4 " ] ||
  bad "--ckpt-every 1: kept checkpoints $(checkpoints "$tmp/ce"), expected the default --keep 3"
expect_ok "$cmaec" train "$model" "${tiny[@]}" --steps 4 --workers 1 --set train.ckpt_every=1 \
  --out "$tmp/wk"
[ "$(checkpoints "$tmp/wk")" = "2 3 4 " ] ||
  bad "--workers 1: kept checkpoints $(checkpoints "$tmp/wk"), expected the default --keep 3"
grep -q "1 data worker" "$tmp/out" || bad "--workers 1: not reported: $(head -c 400 "$tmp/out")"
expect_ok "$cmaec" train "$model" "${tiny[@]}" --steps 4 --ckpt-every 2 --keep 1 --workers 3 \
  --out "$tmp/kp"
[ "$(checkpoints "$tmp/kp")" = "4 " ] || bad "--keep 1: kept checkpoints $(checkpoints "$tmp/kp")"
grep -q "3 data workers" "$tmp/out" || bad "--workers 3: not reported: $(head -c 400 "$tmp/out")"
python3 - "$tmp/kp/ckpt-4.safetensors" <<'PY' || bad "--ckpt-every 2 --workers 3: not in the checkpoint's config"
import json, struct, sys
f = open(sys.argv[1], "rb")
n = struct.unpack("<Q", f.read(8))[0]
cfg = json.loads(json.loads(f.read(n))["__metadata__"]["config"])
sys.exit(not (cfg["train"]["ckpt_every"] == 2 and cfg["train"]["workers"] == 3))
PY
# --- progress: "step k/N" with the loss of step k (as metrics.jsonl has it), one line per step
if expect_ok "$cmaec" train "$model" "${tiny[@]}" --steps 3 --log-every 1 --out "$tmp/pr"; then
  python3 - "$tmp/out" "$tmp/pr/metrics.jsonl" <<'PY' || bad "progress lines: $(grep '^step' "$tmp/out")"
import json, re, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("step ")]
rows = [json.loads(l) for l in open(sys.argv[2])]
got = [(int(m.group(1)), int(m.group(2)), float(m.group(3)))
       for m in (re.match(r"step (\d+)/(\d+)  loss (\S+)", l) for l in lines)]
want = [(r["step"], 3, round(r["loss"], 4)) for r in rows]
sys.exit(not (len(rows) == 3 and got == want))
PY
fi
# --- resume with --steps below the checkpoint's step: exit 2 saying so; at it: nothing to run
expect_fail 2 "--steps 2 is below step 4 of the checkpoint" "$cmaec" train "$model" "${tiny[@]}" \
  --steps 2 --resume "$tmp/ce"
[ "$(checkpoints "$tmp/ce")" = "2 3 4 " ] || bad "resume below: checkpoints changed"
if expect_ok "$cmaec" train "$model" "${tiny[@]}" --steps 4 --resume "$tmp/ce"; then
  grep -q "nothing to run" "$tmp/out" || bad "resume at the step: $(cat "$tmp/out")"
fi
# --- an unusable --out is found first: before the data (a missing folder) and before the
# compile (CMAEC_THREADS=x fails there), exit 2 naming the path
touch "$tmp/file"
expect_fail 2 "$tmp/file/run" env CMAEC_THREADS=x "$cmaec" train "$model" "${tiny[@]}" --steps 1 \
  --backend cpu --data "$tmp/no_such_folder" --out "$tmp/file/run"
expect_fail 2 "output directory $tmp/file: not a directory" env CMAEC_THREADS=x "$cmaec" train "$model" \
  "${tiny[@]}" --steps 1 --backend cpu --data "$tmp/no_such_folder" --out "$tmp/file"
expect_fail 2 "/proc/cmaec-run" env CMAEC_THREADS=x "$cmaec" train "$model" "${tiny[@]}" \
  --steps 1 --backend cpu --out /proc/cmaec-run
expect_fail 2 "/proc/self: cannot write there" env CMAEC_THREADS=x "$cmaec" train "$model" "${tiny[@]}" \
  --steps 1 --backend cpu --out /proc/self
# --- train.limit above the dataset is an error, not a silent cap
expect_fail 2 "train.limit: 22 is more than the 21 images of $tmp/folder" "$cmaec" train "$model" \
  "${tiny[@]}" --steps 1 --set train.limit=22 --out "$tmp/lim"
expect_ok "$cmaec" train "$model" "${tiny[@]}" --steps 1 --set train.limit=21 --out "$tmp/lim"
# --- image size: data.max_pixels, checked from the header before decoding (exit 2 naming the
# file, its size and the limit); the files are small, the limit is made smaller
pngs "$tmp/big" 6 28
pngs "$tmp/big_one" 1 40
mv "$tmp/big_one/c0/00.png" "$tmp/big/c1/zz.png"
expect_fail 2 "$tmp/big/c1/zz.png: 40x40 = 1600 pixels, more than data.max_pixels 1000" \
  "$cmaec" train "$model" "${tiny[@]}" --data "$tmp/big" --batch 4 --steps 3 \
  --set data.max_pixels=1000 --out "$tmp/mp"
expect_ok "$cmaec" train "$model" "${tiny[@]}" --data "$tmp/big" --batch 4 --steps 3 \
  --set data.max_pixels=1600 --out "$tmp/mp2"
# a PNG whose header says 10000x10000 and whose data is missing: refused from the header, under
# the default limit (it would be a corrupt file, found only while decoding, otherwise)
python3 - "$tmp/big/c2/huge.png" <<'PY'
import struct, sys, zlib
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
hdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0))
idat = chunk(b"IDAT", zlib.compress(b"\0" * 100))
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + hdr + idat + chunk(b"IEND", b""))
PY
expect_fail 2 "$tmp/big/c2/huge.png: 10000x10000 = 100000000 pixels, more than data.max_pixels 33554432" \
  "$cmaec" train "$model" "${tiny[@]}" --data "$tmp/big" --batch 4 --steps 3 --out "$tmp/mp3"
rm "$tmp/big/c2/huge.png"

# --- workers: at most 64, at most 4 per CPU core, and their decode memory at most half the machine's
expect_fail 2 "--workers 65: not an integer in [1, 64]" "$cmaec" train "$model" "${tiny[@]}" \
  --workers 65 --steps 1 --out "$tmp/w"
expect_fail 2 "train.workers: 65 is outside [1, 64]" "$cmaec" train "$model" "${tiny[@]}" \
  --set train.workers=65 --steps 1 --out "$tmp/w"
cores=$(getconf _NPROCESSORS_ONLN)
if [ $((4 * cores + 1)) -le 64 ]; then
  expect_fail 2 "train.workers: $((4 * cores + 1)) is more than 4 per CPU core" "$cmaec" train \
    "$model" "${tiny[@]}" --workers $((4 * cores + 1)) --set data.max_pixels=1000 --steps 1 \
    --out "$tmp/w"
fi
expect_fail 2 "of decode memory at data.max_pixels 2147483647, more than half of this machine's" \
  "$cmaec" train "$model" "${tiny[@]}" --workers 64 --set data.max_pixels=2147483647 --steps 1 \
  --out "$tmp/w"
# --- a step gone non-finite names the first non-finite tensor in execution order with its
# producing op (a computed value, not the params the update has spoilt by then): from the
# reference evaluator's values, and on the CPU backend by replaying the step from the last
# checkpoint with every kernel's outputs checked
nan_re='first non-finite tensor in execution order: [^ ]+ = [a-z_0-9]+\([^)]*\), element [0-9]+ = -?(nan|inf)'
expect_fail 2 "step 2: non-finite" "$cmaec" train "$model" "${tiny[@]}" --steps 20 \
  --set optimizer.base_lr=1e30 --out "$tmp/nan_ref"
grep -qE "$nan_re" "$tmp/err" || bad "non-finite, ref: $(cat "$tmp/err")"
expect_fail 2 "step 2: non-finite" "$cmaec" train "$model" "${tiny[@]}" --steps 20 \
  --set optimizer.base_lr=1e30 --backend cpu --ckpt-every 1 --out "$tmp/nan_cpu"
grep -qE "$nan_re, in kernel k[0-9]+_[a-z]+$" "$tmp/err" || bad "non-finite, cpu: $(cat "$tmp/err")"
grep -q "replaying steps 2..2 from $tmp/nan_cpu/ckpt-1.safetensors" "$tmp/out" ||
  bad "non-finite, cpu: no replay from the checkpoint: $(tail -c 300 "$tmp/out")"
finish
