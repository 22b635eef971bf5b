# tests/cli/lib.bash — helpers for the command-line tests (sourced, not run).
# expect_fail CODE SUBSTRING CMD...: the command exits with CODE, prints exactly
# one line on stderr containing SUBSTRING, and no sanitizer report.
pass=0
fail=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ok() { pass=$((pass + 1)); }
bad() {
  echo "FAIL: $*"
  fail=$((fail + 1))
}

expect_fail() {
  local code=$1 substring=$2
  shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$? lines
  lines=$(wc -l <"$tmp/err")
  if [ "$rc" -ne "$code" ]; then
    bad "$* -> exit $rc, expected $code: $(head -c 300 "$tmp/err")"
  elif [ "$lines" -ne 1 ]; then
    bad "$* -> $lines lines on stderr, expected 1: $(head -c 300 "$tmp/err")"
  elif ! grep -qF -- "$substring" "$tmp/err"; then
    bad "$* -> \"$(cat "$tmp/err")\" does not contain \"$substring\""
  elif grep -q -e "Sanitizer" -e "runtime error" "$tmp/err"; then
    bad "$* -> sanitizer report"
  else
    ok
  fi
}

expect_ok() {
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    bad "$* -> exit $rc: $(head -c 300 "$tmp/err")"
    return 1
  fi
  ok
}

# box_pngs DIR: 21 gray 28x28 PNGs in 3 classes DIR/c<k % 3>/<k>.png, a bright box on noise
# (a fixed seed: the same pictures every run).
box_pngs() {
  python3 - "$1" <<'EOF'
import os, random, struct, sys, zlib
random.seed(5)
root = sys.argv[1]
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
for k in range(21):
    d = os.path.join(root, "c%d" % (k % 3))
    os.makedirs(d, exist_ok=True)
    y0, x0 = random.randrange(14), random.randrange(14)
    rows = b""
    for y in range(28):
        rows += b"\0" + bytes((160 if y0 <= y < y0 + 12 and x0 <= x < x0 + 12 else 0)
                              + random.randrange(90) for x in range(28))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    open(os.path.join(d, "%02d.png" % k), "wb").write(png)
EOF
}

# A CMAE variant small enough for a few CLI training steps in seconds (cmae_vit_tiny_fmnist's
# keys, 16 px views); callers add the batch, backend and data.
tiny_cmae_sets=(--set encoder.width=16 --set encoder.depth=1 --set encoder.heads=2
  --set pixel_decoder.width=16 --set pixel_decoder.depth=1 --set pixel_decoder.heads=2
  --set feature_decoder.width=16 --set feature_decoder.depth=1 --set feature_decoder.heads=2
  --set projector.hidden=32 --set projector.out=16 --set predictor.hidden=32
  --set predictor.out=16 --set data.image_size=16 --set data.master_size=20
  --set schedule.warmup_epochs=0 --set optimizer.base_lr=0.1)

finish() {
  echo "$pass passed, $fail failed"
  [ "$fail" -eq 0 ]
}
