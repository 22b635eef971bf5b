"""tests/reference/export_torch.py — the encoder export loads into a plain PyTorch ViT.

Usage: python3 export_torch.py ENCODER.safetensors IMAGES.safetensors FEATURES.safetensors POOL

ENCODER is `cmaec export CKPT --encoder`'s file; IMAGES holds "img" [n, C, S, S]
(f32) and FEATURES cmaec's features of them ("features" [n, d], from
`cmaec eval CKPT --features-of IMAGES -o FEATURES --pool POOL`). A minimal
timm-style ViT (patch embed conv, cls token, fixed pos embed, pre-norm blocks,
final norm) is built from the shapes and the config in the metadata, loaded
with load_state_dict(strict=True), run on the images and pooled like cmaec;
the features must agree to 1e-4 relative (max abs difference over max abs
value). Without torch (a machine where scripts/install-deps.sh could not
install it) the same model runs in numpy, keeping the strict key check,
unless CMAEC_REQUIRE_TORCH=1.
"""

import json
import os
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file


def read(path):
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
    return load_file(path), meta


def expected_keys(depth, final_norm):
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
    if final_norm:
        keys |= {"norm.weight", "norm.bias"}
    return keys


def torch_features(sd, cfg, img, pool):
    import torch
    from torch import nn

    D = sd["cls_token"].shape[-1]
    C = cfg["data"]["in_chans"] if "data" in cfg else cfg["data.in_chans"]
    enc = cfg["encoder"] if "encoder" in cfg else {k[8:]: v for k, v in cfg.items() if k.startswith("encoder.")}
    p, depth, heads, eps = enc["patch"], enc["depth"], enc["heads"], enc["ln_eps"]
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(D, 3 * D, bias=True)
            self.proj = nn.Linear(D, D)

        def forward(self, x):
            B, T, _ = x.shape
            qkv = self.qkv(x).reshape(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            a = (q @ k.transpose(-2, -1)) * (D // heads) ** -0.5
            x = (a.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, D)
            return self.proj(x)

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(D, hidden)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(hidden, D)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(D, eps=eps)
            self.attn = Attention()
            self.norm2 = nn.LayerNorm(D, eps=eps)
            self.mlp = Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(C, D, kernel_size=p, stride=p)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
            self.pos_embed = nn.Parameter(torch.zeros(sd["pos_embed"].shape), requires_grad=False)
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(D, eps=eps) if "norm.weight" in sd else nn.Identity()

        def forward(self, x):
            x = self.patch_embed(x) + self.pos_embed[:, 1:]
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
            for b in self.blocks:
                x = b(x)
            return self.norm(x)

    model = ViT().double()
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        x = model(torch.from_numpy(img.astype(np.float64)))
    x = x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)
    return x.numpy()


def numpy_features(sd, cfg, img, pool):
    from math import erf, sqrt

    enc = cfg["encoder"] if "encoder" in cfg else {k[8:]: v for k, v in cfg.items() if k.startswith("encoder.")}
    p, depth, heads, eps = enc["patch"], enc["depth"], enc["heads"], enc["ln_eps"]
    w = {k: v.astype(np.float64) for k, v in sd.items()}
    D = w["cls_token"].shape[-1]
    n, C, S, _ = img.shape
    g = S // p
    x = img.astype(np.float64).reshape(n, C, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, C * p * p)
    x = x @ w["patch_embed.proj.weight"].reshape(D, -1).T + w["patch_embed.proj.bias"]
    x = x + w["pos_embed"][:, 1:]
    cls = np.broadcast_to(w["cls_token"] + w["pos_embed"][:, :1], (n, 1, D))
    x = np.concatenate([cls, x], axis=1)

    def ln(x, name):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + eps) * w[name + ".weight"] + w[name + ".bias"]

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))
    T, hd = x.shape[1], D // heads
    for i in range(depth):
        b = f"blocks.{i}."
        qkv = lin(ln(x, b + "norm1"), b + "attn.qkv").reshape(n, T, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        a = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * hd**-0.5
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + lin((a @ qkv[2]).transpose(0, 2, 1, 3).reshape(n, T, D), b + "attn.proj")
        x = x + lin(gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    if "norm.weight" in w:
        x = ln(x, "norm")
    return x[:, 0] if pool == "cls" else x[:, 1:].mean(axis=1)


def main():
    enc_path, img_path, feat_path, pool = sys.argv[1:5]
    sd, meta = read(enc_path)
    cfg = json.loads(meta["config"])
    enc = cfg["encoder"] if "encoder" in cfg else {k[8:]: v for k, v in cfg.items() if k.startswith("encoder.")}
    for k, v in sd.items():
        assert v.dtype == np.float32, f"{k}: dtype {v.dtype}, expected float32"
    want = expected_keys(enc["depth"], enc["final_norm"])
    if set(sd) != want:
        sys.exit(f"export_torch: keys differ: missing {sorted(want - set(sd))}, unexpected {sorted(set(sd) - want)}")
    img = load_file(img_path)["img"]
    ref = load_file(feat_path)["features"].astype(np.float64)
    try:
        import torch  # noqa: F401

        got, how = torch_features(sd, cfg, img, pool), "torch"
    except ImportError:
        if os.environ.get("CMAEC_REQUIRE_TORCH") == "1":
            sys.exit("export_torch: torch is not installed and CMAEC_REQUIRE_TORCH=1")
        got, how = numpy_features(sd, cfg, img, pool), "numpy (torch is not installed)"
    assert got.shape == ref.shape, f"features shape {got.shape} vs cmaec's {ref.shape}"
    err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
    print(f"export_torch: {how}: {len(sd)} tensors, features {ref.shape}, pool {pool}, max rel error {err:.3g}")
    if not err <= 1e-4:
        sys.exit(f"export_torch: max relative error {err:.3g} > 1e-4")


if __name__ == "__main__":
    main()
