# tests/cli/eval_cmds.sh — cmaec eval, recon, plot and export on a tiny variant.
# Usage: bash eval_cmds.sh CMAEC_BINARY SOURCE_ROOT
# The checkpoints are freshly initialized params (cmaec export --init-checkpoint).
cmaec=$1
root=$2
source "$root/tests/cli/lib.bash"
models=$root/models

tiny=(--set encoder.width=32 --set encoder.depth=2 --set encoder.heads=2
  --set pixel_decoder.width=32 --set pixel_decoder.depth=1 --set pixel_decoder.heads=2
  --set feature_decoder.width=32 --set feature_decoder.heads=2
  --set projector.hidden=64 --set projector.out=32 --set predictor.hidden=64 --set predictor.out=32)

# PNG width x height from the IHDR chunk.
png_size() { python3 -c 'import struct,sys; d=open(sys.argv[1],"rb").read(24); assert d[:8]==b"\x89PNG\r\n\x1a\n"; print("%dx%d" % struct.unpack(">II", d[16:24]))' "$1"; }
check_png() {
  local size
  size=$(png_size "$1" 2>/dev/null)
  if [ "$size" = "$2" ]; then ok; else bad "$1: size '$size', expected $2"; fi
}

# ---- checkpoints -----------------------------------------------------------------
expect_ok "$cmaec" export "$models/cmae_vit_tiny_fmnist.json" --init-checkpoint -o "$tmp/run" "${tiny[@]}"
expect_ok "$cmaec" export "$models/cmae_vit_tiny_fmnist.json" --init-checkpoint -o "$tmp/run2" \
  --seed 7 "${tiny[@]}" --set encoder.final_norm=false
if [ -f "$tmp/run/latest" ] && [ -f "$tmp/run/ckpt-0.safetensors" ]; then ok; else bad "no checkpoint in $tmp/run"; fi

# ---- eval ----------------------------------------------------------------------------
have_fmnist=0
if [ -r "${CMAEC_FMNIST_DIR:-/usr/share/datasets/fashion-mnist}/t10k-images-idx3-ubyte.gz" ]; then have_fmnist=1; fi
if [ "$have_fmnist" = 1 ]; then
  if expect_ok "$cmaec" eval "$tmp/run" --train-limit 120 --test-limit 40 --batch 40 --baselines --json; then
    if python3 - "$tmp/out" <<'EOF'; then ok; else bad "eval --json: $(cat "$tmp/out")"; fi
import json, sys
r = json.load(open(sys.argv[1]))
assert r["n_train"] == 120 and r["n_test"] == 40 and r["pool"] == "mean", r
for row in ("pretrained", "random_init", "raw_pixels"):
    for k in ("knn_top1", "linear_top1"):
        v = r[row][k]
        assert 0 <= v <= 1 and v * 40 == round(v * 40), (row, k, v)
# the same seed-0 init: the checkpoint is the random-init baseline
assert r["pretrained"] == r["random_init"], r
# raw pixels beat chance on Fashion-MNIST
assert r["raw_pixels"]["knn_top1"] > 0.3, r
EOF
  fi
  if expect_ok "$cmaec" eval "$tmp/run2/ckpt-0.safetensors" --train-limit 60 --test-limit 20 --batch 20 \
    --pool cls --backend ref --baselines; then
    for row in "kNN" "pretrained" "random init" "raw pixels" "pool cls"; do
      if grep -qF -- "$row" "$tmp/out"; then ok; else bad "eval table has no \"$row\": $(cat "$tmp/out")"; fi
    done
  fi

  # ---- recon: 3 rows x 3 columns of 32x32 tiles, 2 pixels apart ----------------------
  if expect_ok "$cmaec" recon "$tmp/run" -o "$tmp/recon.png" --n 3 --scale 1; then check_png "$tmp/recon.png" 100x100; fi
  # the default scale draws 32 px views 4x: 3 tiles of 128 px
  if expect_ok "$cmaec" recon "$tmp/run2" -o "$tmp/recon1.png" --n 1 --seed 5; then check_png "$tmp/recon1.png" 388x128; fi
  expect_fail 2 "--scale" "$cmaec" recon "$tmp/run2" -o "$tmp/x.png" --scale 0
else
  bad "eval and recon: dataset-fashion-mnist is not installed (scripts/install-deps.sh)"
fi

# ---- eval on an image folder (DIR/train, DIR/test), no Fashion-MNIST needed ------------
python3 - "$tmp/folder" <<'EOF'
import os, random, struct, sys, zlib
def png(path, w, h, pixels):
    raw = b"".join(b"\0" + bytes(pixels[y * w:(y + 1) * w]) for y in range(h))
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
rng = random.Random(5)
for split, count in (("train", 5), ("test", 3)):
    for k, cls in enumerate(("shirt", "shoe")):
        d = os.path.join(sys.argv[1], split, cls)
        os.makedirs(d)
        for i in range(count):
            px = [min(255, (200 if (y < 6) == (k == 0) else 20) + rng.randrange(40)) for y in range(12) for x in range(10)]
            png(os.path.join(d, "%d.png" % i), 10, 12, px)
EOF
if expect_ok "$cmaec" eval "$tmp/run" --data "$tmp/folder" --batch 4 --baselines --json; then
  if python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); assert r["n_train"]==10 and r["n_test"]==6 and r["raw_pixels"]["knn_top1"]==1.0, r' "$tmp/out"; then ok; else
    bad "eval --data folder: $(cat "$tmp/out")"; fi
fi
expect_fail 2 "$tmp/folder/missing/train" "$cmaec" eval "$tmp/run" --data "$tmp/folder/missing"

# ---- plot ------------------------------------------------------------------------------
python3 - "$tmp/run/metrics.jsonl" <<'EOF'
import math, sys
with open(sys.argv[1], "w") as f:
    for s in range(40):
        rc = 2 * math.exp(-s / 5) + 0.01
        f.write('{"step": %d, "epoch": 0, "loss_rc": %r, "loss_ct": 0.5, "loss": %r, "lr": %r}\n'
                % (s, rc, rc + 0.5, 1e-3 * min(1, s / 10)))
EOF
if expect_ok "$cmaec" plot "$tmp/run" -o "$tmp/curves.png"; then
  check_png "$tmp/curves.png" 640x800
  if grep -qF "log-scale loss" "$tmp/out"; then ok; else bad "plot: a wide loss range is not log-scale: $(cat "$tmp/out")"; fi
fi
if expect_ok "$cmaec" plot "$tmp/run/metrics.jsonl" -o "$tmp/curves2.png"; then check_png "$tmp/curves2.png" 640x800; fi

# ---- export (features and the timm interop: tests/cli/export_torch.sh) ----------------------
if expect_ok "$cmaec" export "$tmp/run" --encoder -o "$tmp/encoder.safetensors"; then
  if grep -qF "30 tensors" "$tmp/out"; then ok; else bad "export: $(cat "$tmp/out")"; fi
fi
python3 - "$tmp/img.safetensors" <<'EOF'
import numpy as np
import sys
from safetensors.numpy import save_file
rng = np.random.default_rng(11)
save_file({"img": rng.standard_normal((5, 1, 32, 32)).astype(np.float32)}, sys.argv[1])
EOF

# ---- errors -----------------------------------------------------------------------------------
expect_fail 2 "$tmp/nope" "$cmaec" eval "$tmp/nope"
expect_fail 2 "$tmp/nope.safetensors" "$cmaec" recon "$tmp/nope.safetensors" -o "$tmp/x.png"
expect_fail 2 "$tmp/nope" "$cmaec" export "$tmp/nope" --encoder -o "$tmp/x.safetensors"
expect_fail 2 "--pool max" "$cmaec" eval "$tmp/run" --pool max
expect_fail 2 "--backend" "$cmaec" eval "$tmp/run" --backend gpu
expect_fail 2 "metrics.jsonl" "$cmaec" plot "$tmp/run2" -o "$tmp/x.png"
printf 'not a checkpoint' >"$tmp/bad.safetensors"
expect_fail 2 "$tmp/bad.safetensors" "$cmaec" export "$tmp/bad.safetensors" --encoder -o "$tmp/x.safetensors"
expect_ok "$cmaec" export "$models/cmae_convvit_tiny_fmnist.json" --init-checkpoint -o "$tmp/conv" \
  --set encoder.stage_widths=[16,24,32] --set encoder.width=32 --set encoder.depth=1 --set encoder.heads=2 \
  --set encoder.stage_depths=[1,1,1] --set pixel_decoder.width=32 --set pixel_decoder.depth=1 \
  --set pixel_decoder.heads=2 --set feature_decoder.width=32 --set feature_decoder.heads=2 \
  --set projector.hidden=64 --set projector.out=32 --set predictor.hidden=64 --set predictor.out=32
if [ "$have_fmnist" = 1 ] && expect_ok "$cmaec" recon "$tmp/conv" -o "$tmp/conv.png" --n 1 --scale 1; then
  check_png "$tmp/conv.png" 100x32
fi
expect_fail 2 "ViT variants only" "$cmaec" export "$tmp/conv" --encoder -o "$tmp/x.safetensors"
expect_fail 2 "cls token" "$cmaec" eval "$tmp/conv" --pool cls --features-of "$tmp/img.safetensors" -o "$tmp/x.safetensors"
finish
