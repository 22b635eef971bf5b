"""tests/reference/export_torch.py — cmaec's encoder export runs in timm's VisionTransformer.

Usage: python3 export_torch.py CASE [CASE ...]
  CASE = ENCODER.safetensors,IMAGES.safetensors,FEATURES.safetensors,POOL
         (prefix "!" for a case that must be rejected: a corrupted export)

ENCODER is `cmaec export CKPT --encoder`'s file; IMAGES holds "img" [n, C, S, S]
(f32) and FEATURES cmaec's features of them ("features" [n, D], from
`cmaec eval CKPT --features-of IMAGES -o FEATURES --pool POOL`).

For each case a timm.models.vision_transformer.VisionTransformer is built from
the config in the export's metadata alone (image size, in_chans, patch, width,
depth, heads, mlp_ratio, qkv_bias, ln_eps, final_norm; class token, learned
pos_embed slot for the cls token, exact GELU, global_pool "avg" for
POOL=mean (patch tokens only) and "token" for POOL=cls, no fc_norm, no head),
the export is loaded with load_state_dict(strict=True), and
forward_head(forward_features(img), pre_logits=True) is compared with cmaec's
features. timm runs in float64 (the reference) and in float32 (what a user
runs); both must agree with cmaec's float32 features to

    max |cmaec - timm| <= 1e-5   (absolute, over every image and feature)

on features of magnitude O(1) (the test's are up to about 5; the script prints
the largest |feature| beside the difference).

torch and timm are required: without them this exits 1 (scripts/install-deps.sh
installs them). A "!" case passes only when strict loading or the comparison
rejects it; the script exits non-zero if any case is not as expected.
"""

import json
import sys
from functools import partial

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

TOL = 1e-5


def encoder_config(meta):
    cfg = json.loads(meta["config"])
    data = cfg["data"] if "data" in cfg else {k[5:]: v for k, v in cfg.items() if k.startswith("data.")}
    enc = cfg["encoder"] if "encoder" in cfg else {k[8:]: v for k, v in cfg.items() if k.startswith("encoder.")}
    return data, enc


def timm_vit(data, enc, pool):
    """timm's ViT from cmaec's config (nothing read from the tensors' shapes)."""
    return VisionTransformer(
        img_size=data["image_size"],
        patch_size=enc["patch"],
        in_chans=data["in_chans"],
        num_classes=0,
        global_pool={"mean": "avg", "cls": "token"}[pool],
        embed_dim=enc["width"],
        depth=enc["depth"],
        num_heads=enc["heads"],
        mlp_ratio=enc["mlp_ratio"],
        qkv_bias=enc["qkv_bias"],
        class_token=True,
        pos_embed="learn",
        no_embed_class=False,
        final_norm=enc["final_norm"],
        fc_norm=False,
        norm_layer=partial(nn.LayerNorm, eps=enc["ln_eps"]),
        act_layer=nn.GELU,
    )


def run_case(enc_path, img_path, feat_path, pool):
    """Returns (max error, feature scale, what) or raises with why the case fails."""
    with safe_open(enc_path, framework="np") as f:
        meta = f.metadata() or {}
    sd = load_file(enc_path)
    for k, v in sd.items():
        if v.dtype != np.float32:
            raise ValueError(f"{k}: dtype {v.dtype}, expected float32")
    data, enc = encoder_config(meta)
    img = load_file(img_path)["img"]
    ref = load_file(feat_path)["features"].astype(np.float64)
    errs = {}
    for dtype in (torch.float64, torch.float32):
        model = timm_vit(data, enc, pool).to(dtype).eval()
        # strict: a missing, renamed, extra or reshaped key raises here
        model.load_state_dict({k: torch.from_numpy(v).to(dtype) for k, v in sd.items()}, strict=True)
        with torch.no_grad():
            x = model.forward_head(model.forward_features(torch.from_numpy(img).to(dtype)), pre_logits=True)
        got = x.double().numpy()
        if got.shape != ref.shape:
            raise ValueError(f"timm features {got.shape}, cmaec's {ref.shape}")
        errs[str(dtype)[6:]] = (float(np.abs(got - ref).max()), float(np.abs(got).max()))
    return errs, len(sd)


def main():
    cases = sys.argv[1:]
    if not cases:
        sys.exit(__doc__)
    wrong = 0
    for case in cases:
        expect_fail = case.startswith("!")
        enc_path, img_path, feat_path, pool = case.lstrip("!").split(",")
        name = f"{enc_path.rsplit('/', 1)[-1]} pool {pool}"
        try:
            errs, n = run_case(enc_path, img_path, feat_path, pool)
            over = [f"{d} max |diff| {e:.3g} > {TOL:g}" for d, (e, s) in errs.items() if not e <= TOL]
            detail = ", ".join(f"{d} max |diff| {e:.3g} (max |feature| {s:.3g})" for d, (e, s) in errs.items())
            why = "features differ: " + "; ".join(over) if over else None
        except (RuntimeError, ValueError, KeyError) as e:
            n, detail, why = 0, "", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
        if expect_fail and why:
            print(f"export_torch: {name}: rejected as it must be: {why}")
        elif expect_fail:
            print(f"export_torch: FAIL: {name}: a corrupted export was accepted ({detail})")
            wrong += 1
        elif why:
            print(f"export_torch: FAIL: {name}: {why}")
            wrong += 1
        else:
            print(f"export_torch: {name}: timm {timm_version()} strict load of {n} tensors, {detail}")
    sys.exit(1 if wrong else 0)


def timm_version():
    import timm

    return timm.__version__


if __name__ == "__main__":
    main()
