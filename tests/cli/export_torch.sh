# tests/cli/export_torch.sh — the encoder export in real PyTorch: timm's VisionTransformer.
# Usage: bash export_torch.sh CMAEC_BINARY SOURCE_ROOT
# Two ViT checkpoints (the default variant's encoder, and one with every encoder option changed:
# patch, width, heads, mlp_ratio, qkv_bias off, no final norm, ln_eps, 3 channels), every
# encoder param made random and distinct, exported with `cmaec export --encoder`, loaded
# strictly into timm and compared with `cmaec eval --features-of` for both poolings
# (tests/reference/export_torch.py). Corrupted exports must be rejected. torch and timm are
# required: without them this test fails (scripts/install-deps.sh installs them).
cmaec=$1
root=$2
source "$root/tests/cli/lib.bash"
models=$root/models

if ! python3 -c 'import torch, timm' 2>"$tmp/import"; then
  bad "torch and timm are required (scripts/install-deps.sh): $(tail -1 "$tmp/import")"
  finish
  exit 1
fi

# a: the default variant cmae_vit_tiny_fmnist as shipped (32 px, 1 channel, patch 4, width 128,
# depth 4, heads 4, mlp_ratio 4, qkv bias, final norm, ln_eps 1e-6).
expect_ok "$cmaec" export "$models/cmae_vit_tiny_fmnist.json" --init-checkpoint -o "$tmp/a"
# b: everything the timm constructor takes, changed.
expect_ok "$cmaec" export "$models/cmae_vit_tiny_fmnist.json" --init-checkpoint -o "$tmp/b" --seed 7 \
  --set data.in_chans=3 --set encoder.patch=8 --set encoder.width=48 \
  --set encoder.depth=2 --set encoder.heads=3 --set encoder.mlp_ratio=2 --set encoder.qkv_bias=false \
  --set encoder.final_norm=false --set encoder.ln_eps=1e-5

# A fresh init has LayerNorm weights 1, biases 0 and a zero cls slot in pos_embed, so a swapped
# or dropped one would go unnoticed: give every encoder param random, distinct values (as
# trained weights have), and rewrite the checkpoint's data CRC.
for r in a b; do
  if python3 - "$tmp/$r/ckpt-0.safetensors" <<'EOF'; then ok; else bad "randomize $r"; fi
import sys, zlib
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
path = sys.argv[1]
with safe_open(path, framework="np") as f:
    meta = dict(f.metadata())
t = load_file(path)
rng = np.random.default_rng(3)
n = 0
for k, v in sorted(t.items()):
    if k.startswith("backbone.") and v.dtype == np.float32:
        s = 0.2 if v.ndim == 1 or k.endswith(("cls_token", "pos_embed")) else 0.5 * float(v.std())
        t[k] = (v + s * rng.standard_normal(v.shape)).astype(np.float32)
        n += 1
assert n > 10, n
for crc in ("00000000", None):
    if crc is None:
        raw = open(path, "rb").read()
        crc = "%08x" % (zlib.crc32(raw[8 + int.from_bytes(raw[:8], "little"):]) & 0xffffffff)
    meta["data_crc32"] = crc
    save_file(t, path, metadata=meta)
EOF
done

python3 - "$tmp" <<'EOF'
import sys
import numpy as np
from safetensors.numpy import save_file
rng = np.random.default_rng(11)
for c in (1, 3):
    save_file({"img": rng.standard_normal((6, c, 32, 32)).astype(np.float32)}, f"{sys.argv[1]}/img{c}.safetensors")
EOF

cases=()
for r in a b; do
  chans=1
  [ "$r" = b ] && chans=3
  expect_ok "$cmaec" export "$tmp/$r" --encoder -o "$tmp/$r.safetensors" || continue
  # a: 4 (patch embed, cls, pos) + 4 blocks x 12 + 2 (norm); b: 4 + 2 x 11 (no qkv bias)
  want=54
  [ "$r" = b ] && want=26
  if grep -qF "$want tensors" "$tmp/out"; then ok; else bad "export $r: not $want tensors: $(cat "$tmp/out")"; fi
  for pool in mean cls; do
    if expect_ok "$cmaec" eval "$tmp/$r" --features-of "$tmp/img$chans.safetensors" \
      -o "$tmp/$r-$pool.safetensors" --pool "$pool" --batch 4; then
      cases+=("$tmp/$r.safetensors,$tmp/img$chans.safetensors,$tmp/$r-$pool.safetensors,$pool")
    fi
  done
done

# Corrupted copies of a's export, each of which must be rejected.
python3 - "$tmp/a.safetensors" "$tmp" <<'EOF'
import sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
src, out = sys.argv[1:3]
with safe_open(src, framework="np") as f:
    meta = f.metadata()
t = load_file(src)
def bad(name, edit):
    u = dict(t)
    edit(u)
    save_file({k: np.ascontiguousarray(v) for k, v in u.items()}, f"{out}/bad-{name}.safetensors", metadata=meta)
def rename(u, a, b):
    u[b] = u.pop(a)
def put(k, f):
    return lambda u: u.__setitem__(k, f(u[k]))
def swap_norms(u):  # norm1 and norm2 weights of one block
    rename(u, "blocks.0.norm1.weight", "x")
    rename(u, "blocks.0.norm2.weight", "blocks.0.norm1.weight")
    rename(u, "x", "blocks.0.norm2.weight")
d = t["cls_token"].shape[-1]
h = d // 4  # one head's width in a
bad("renamed", lambda u: rename(u, "blocks.2.mlp.fc1.weight", "blocks.2.mlp.fc_1.weight"))
bad("missing", lambda u: u.pop("norm.bias"))
bad("extra", lambda u: u.__setitem__("head.weight", np.zeros((10, d), np.float32)))
bad("transposed", put("blocks.3.attn.proj.weight", lambda w: w.T))
# the q and k rows of one qkv weight; two heads' columns of one output projection
bad("qk-swapped", put("blocks.1.attn.qkv.weight", lambda w: np.concatenate([w[d:2 * d], w[:d], w[2 * d:]])))
bad("heads-swapped", put("blocks.0.attn.proj.weight", lambda w: np.concatenate([w[:, h:2 * h], w[:, :h], w[:, 2 * h:]], 1)))
bad("norms-swapped", swap_norms)
bad("pos-shifted", put("pos_embed", lambda p: np.roll(p, 1, axis=1)))
bad("f64", put("cls_token", lambda c: c.astype(np.float64)))
EOF
img=$tmp/img1.safetensors
for c in renamed missing extra transposed qk-swapped heads-swapped norms-swapped pos-shifted f64; do
  cases+=("!$tmp/bad-$c.safetensors,$img,$tmp/a-mean.safetensors,mean")
done
# b's features against a's export (other weights, other config).
cases+=("!$tmp/b.safetensors,$tmp/img3.safetensors,$tmp/a-mean.safetensors,mean")

if python3 "$root/tests/reference/export_torch.py" "${cases[@]}" >"$tmp/ref" 2>&1; then ok; else
  bad "export_torch.py"
fi
if [ "$(grep -c "strict load" "$tmp/ref")" = 4 ] && [ "$(grep -c "rejected as it must be" "$tmp/ref")" = 10 ]; then ok; else
  bad "export_torch.py: not 4 matches and 10 rejections"
fi
sed "s|$tmp/||g" "$tmp/ref"
finish
