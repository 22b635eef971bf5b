#!/usr/bin/env python3
"""An independent JAX reference for the CMAE losses and their gradients.

Usage: cmae_reference.py CONFIG.json INPUTS.safetensors CMAEC.safetensors

Written from /work/shared/CMAE.md (sections 2-7 for the ViT CMAE, 9 for the
hybrid ConvViT), not from cmaec's C code:
- CONFIG.json is a resolved model variant (cm_model_config_to_json: nested
  objects "encoder", "pixel_decoder", "loss", ...). Hyper-parameters (heads,
  depths, eps, temperature, weights) come from it; widths from the params.
- INPUTS.safetensors holds every param under its official name
  ("backbone.layers.0.attn.qkv.weight") and the batch: img, img_t, ids_keep,
  ids_restore, mask (1 = masked).
- CMAEC.safetensors holds cmaec's loss, loss_rc, loss_ct and "grad/<param>"
  for every trained param (all but the frozen pos embeds and the target branch).

The losses and the gradient of loss with respect to every trained param are
computed in f64 with jax.value_and_grad and compared with cmaec's, norm-wise
per tensor: max|a - b| / max(max|b|, floor) <= 1e-5 (b = this reference), with
floor = 1e-12 for the losses and max(1e-12, 1e-9 x the largest gradient) for
gradients: some gradients are zero in exact arithmetic (biases before a
training-mode BatchNorm) and hold only f64 roundoff on both sides.
Also checked: the fixed sin-cos pos embeds in INPUTS equal CMAE.md section 3's
formula, the mask tensors agree with each other, every param in INPUTS is used
and the set of gradients is exactly the set of trained params.

Exit status: 0 all agree; 1 a mismatch (the worst is printed); 2 bad
arguments or files; 3 a Python package missing (pip install jax safetensors numpy).
"""
import json
import sys

try:
    import numpy as np
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file
except ImportError as e:  # pragma: no cover
    print("cmae_reference.py: missing python package (pip install jax safetensors numpy): %s" % e)
    sys.exit(3)

jax.config.update("jax_enable_x64", True)

TOLERANCE = 1e-5
CONV_LN_EPS = 1e-5  # ConvMAE's conv-stage LayerNorms are plain nn.LayerNorm (CMAE.md 9a)


class Params:
    """The param dict, recording which names the forward reads."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.used = set()

    def __getitem__(self, name):
        if name not in self.tensors:
            raise KeyError("no param named %s" % name)
        self.used.add(name)
        return self.tensors[name]

    def __contains__(self, name):
        return name in self.tensors


# ---- building blocks (CMAE.md section 3) --------------------------------------


def sincos_2d(grid, dim, n_cls):
    """[1, n_cls + grid^2, dim]: PE = [sin(a w), cos(a w), sin(b w), cos(b w)], a = t // grid,
    b = t % grid, w_k = 1 / 10000^(k / (dim/4)); the cls rows are zero."""
    d4 = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(d4, dtype=np.float64) / d4)
    t = np.arange(grid * grid)
    a = np.outer(t // grid, omega)
    b = np.outer(t % grid, omega)
    pe = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1)
    return np.concatenate([np.zeros((n_cls, dim)), pe], axis=0)[None]


def layer_norm(x, p, name, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)  # biased, as torch
    return (x - mean) / jnp.sqrt(var + eps) * p[name + ".weight"] + p[name + ".bias"]


def linear(x, p, name, bias=True):
    y = x @ p[name + ".weight"].T  # torch layout [out, in]
    return y + p[name + ".bias"] if bias else y


def gelu(x):
    return 0.5 * x * (1.0 + jax.scipy.special.erf(x / np.sqrt(2.0)))


def attention(x, p, name, heads):
    n, t, d = x.shape
    hd = d // heads
    qkv = linear(x, p, name + ".qkv").reshape(n, t, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = jnp.einsum("nhqd,nhkd->nhqk", q, k) * hd**-0.5
    y = jnp.einsum("nhqk,nhkd->nhqd", jax.nn.softmax(scores, axis=-1), v)
    return linear(y.transpose(0, 2, 1, 3).reshape(n, t, d), p, name + ".proj")


def block_mmcv(x, p, name, heads, eps):
    """CMAE's pre-norm TransformerEncoderLayer: ln1, attn, ln2, ffn.layers.0.0, ffn.layers.1."""
    x = x + attention(layer_norm(x, p, name + ".ln1", eps), p, name + ".attn", heads)
    h = gelu(linear(layer_norm(x, p, name + ".ln2", eps), p, name + ".ffn.layers.0.0"))
    return x + linear(h, p, name + ".ffn.layers.1")


def block_timm(x, p, name, heads, eps):
    """ConvMAE's Block: norm1, attn, norm2, mlp.fc1, mlp.fc2."""
    x = x + attention(layer_norm(x, p, name + ".norm1", eps), p, name + ".attn", heads)
    h = gelu(linear(layer_norm(x, p, name + ".norm2", eps), p, name + ".mlp.fc1"))
    return x + linear(h, p, name + ".mlp.fc2")


def conv2d(x, p, name, stride, padding=0, groups=1):
    y = jax.lax.conv_general_dilated(
        x, p[name + ".weight"], (stride, stride), [(padding, padding)] * 2,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST)
    return y + p[name + ".bias"][None, :, None, None]


def map_to_tokens(x):
    """[n, D, g, g] -> [n, g*g, D], token t = row * g + col."""
    n, d, h, w = x.shape
    return x.reshape(n, d, h * w).transpose(0, 2, 1)


def take_tokens(x, ids):
    return jnp.take_along_axis(x, ids[:, :, None], axis=1)


def patchify(img, patch):
    """[n, C, H, W] -> [n, L, patch*patch*C], vector index (py*patch + px)*C + c (CMAE.md 5)."""
    n, c, h, w = img.shape
    gh, gw = h // patch, w // patch
    x = img.reshape(n, c, gh, patch, gw, patch).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(n, gh * gw, patch * patch * c)


def batch_norm(x, p, name, eps):
    """BatchNorm1d in training mode over the (whole, one-rank) batch, biased variance."""
    mean = jnp.mean(x, axis=0, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=0, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p[name + ".weight"] + p[name + ".bias"]


def nonlinear_neck(x, p, name, eps):
    """fc0 (bias) -> BN -> ReLU -> fc1 (no bias), CMAE.md 6."""
    h = jax.nn.relu(batch_norm(linear(x, p, name + ".fc0"), p, name + ".bn0", eps))
    return linear(h, p, name + ".fc1", bias=False)


def l2_normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---- encoders and decoder ----------------------------------------------------


def vit_encoder(img, p, cfg, prefix, ids_keep, final_norm):
    """CMAE.md 3: patch conv, + pos embed, keep the visible tokens, prepend cls, blocks, LN."""
    enc = cfg["encoder"]
    patch = enc["patch"]
    x = map_to_tokens(conv2d(img, p, prefix + ".patch_embed.projection", patch))
    grid = img.shape[2] // patch
    pe = sincos_2d(grid, x.shape[2], 1)
    x = x + pe[:, 1:]
    if ids_keep is not None:
        x = take_tokens(x, ids_keep)
    cls = p[prefix + ".cls_token"] + pe[:, :1]
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])), x], axis=1)
    for i in range(enc["depth"]):
        x = block_mmcv(x, p, "%s.layers.%d" % (prefix, i), enc["heads"], enc["ln_eps"])
    if final_norm:
        x = layer_norm(x, p, prefix + ".ln1", enc["ln_eps"])
    return x


def mae_decoder(latent, ids_restore, p, cfg, dec, prefix, has_cls):
    """CMAE.md 5: embed, mask tokens, unshuffle, (cls), + fixed pos embed, blocks, LN, pred."""
    eps = cfg["encoder"]["ln_eps"]
    cls = 1 if has_cls else 0
    x = linear(latent, p, prefix + ".decoder_embed")
    n, _, width = x.shape
    tokens = x[:, cls:]
    length = ids_restore.shape[1]
    if tokens.shape[1] < length:
        mask_tokens = jnp.broadcast_to(p[prefix + ".mask_token"],
                                       (n, length - tokens.shape[1], width))
        tokens = jnp.concatenate([tokens, mask_tokens], axis=1)
    tokens = take_tokens(tokens, ids_restore)
    if has_cls:
        tokens = jnp.concatenate([x[:, :1], tokens], axis=1)
    grid = int(round(length**0.5))
    x = tokens + sincos_2d(grid, width, cls)
    for i in range(dec["depth"]):
        x = block_mmcv(x, p, "%s.decoder_blocks.%d" % (prefix, i), dec["heads"], eps)
    x = linear(layer_norm(x, p, prefix + ".ln1", eps), p, prefix + ".decoder_pred")
    return x[:, cls:]


def convvit_patch_embed(x, p, name, patch, to_nchw=True):
    """ConvMAE PatchEmbed: conv (kernel = stride = patch), LN over channels, GELU."""
    y = conv2d(x, p, name + ".proj", patch).transpose(0, 2, 3, 1)
    y = gelu(layer_norm(y, p, name + ".norm", CONV_LN_EPS))
    return y.transpose(0, 3, 1, 2) if to_nchw else y


def channel_ln(x, p, name):
    return layer_norm(x.transpose(0, 2, 3, 1), p, name, CONV_LN_EPS).transpose(0, 3, 1, 2)


def cblock(x, keep, p, name):
    """CMAE.md 9a: x + conv2(dw5x5(keep * conv1(LN x))); x + fc2(GELU(fc1(LN x)))."""
    c = x.shape[1]
    h = conv2d(channel_ln(x, p, name + ".norm1"), p, name + ".conv1", 1)
    if keep is not None:
        h = h * keep
    h = conv2d(h, p, name + ".attn", 1, padding=2, groups=c)
    x = x + conv2d(h, p, name + ".conv2", 1)
    h = gelu(conv2d(channel_ln(x, p, name + ".norm2"), p, name + ".mlp.fc1", 1))
    return x + conv2d(h, p, name + ".mlp.fc2", 1)


def upsample_keep(keep, grid, repeat):
    """keep [n, L] on the token grid -> [n, 1, grid*repeat, grid*repeat], nearest (CMAE.md 2c)."""
    n = keep.shape[0]
    k = keep.reshape(n, grid, grid)
    k = jnp.repeat(jnp.repeat(k, repeat, axis=1), repeat, axis=2)
    return k[:, None]


def convvit_encoder(img, p, cfg, prefix, ids_keep, mask, fuse):
    """CMAE.md 9b (online: masked, fused, final LN) and 9c (target: no mask, no fusion, no LN)."""
    enc = cfg["encoder"]
    patches, depths = enc["stage_patches"], enc["stage_depths"]
    grid = img.shape[2] // (patches[0] * patches[1] * patches[2])
    repeats = [patches[1] * patches[2], patches[2]]
    keep = None if mask is None else 1.0 - mask
    x, stage_out = img, []
    for s in range(2):
        x = convvit_patch_embed(x, p, "%s.patch_embed%d" % (prefix, s + 1), patches[s])
        k = None if keep is None else upsample_keep(keep, grid, repeats[s])
        for b in range(depths[s]):
            x = cblock(x, k, p, "%s.blocks%d.%d" % (prefix, s + 1, b))
        stage_out.append(x)
    x = convvit_patch_embed(x, p, prefix + ".patch_embed3", patches[2], to_nchw=False)
    n, gh, gw, d = x.shape
    x = linear(x.reshape(n, gh * gw, d), p, prefix + ".patch_embed4")
    x = x + sincos_2d(grid, d, 0)
    if ids_keep is not None:
        x = take_tokens(x, ids_keep)
    for b in range(depths[2]):
        x = block_timm(x, p, "%s.blocks3.%d" % (prefix, b), enc["heads"], enc["ln_eps"])
    if not fuse:
        return x
    for s in range(2):
        side = conv2d(stage_out[s], p, "%s.stage%d_output_decode" % (prefix, s + 1), repeats[s])
        side = map_to_tokens(side)
        x = x + (take_tokens(side, ids_keep) if ids_keep is not None else side)
    return layer_norm(x, p, prefix + ".norm", enc["ln_eps"])


# ---- the whole model (CMAE.md 5-7, 9c, 13) -----------------------------------


def losses(p, batch, cfg):
    vit = cfg["arch"] == "vit"
    loss_cfg = cfg["loss"]
    img, img_t = batch["img"], batch.get("img_t")
    ids_keep, ids_restore, mask = batch["ids_keep"], batch["ids_restore"], batch["mask"]
    if vit:
        latent = vit_encoder(img, p, cfg, "backbone", ids_keep, cfg["encoder"]["final_norm"])
    else:
        latent = convvit_encoder(img, p, cfg, "backbone", ids_keep, mask, fuse=True)
    pixel_name = "pixel_decoder" if cfg["contrastive"] else "neck"
    pred = mae_decoder(latent, ids_restore, p, cfg, cfg["pixel_decoder"], pixel_name, vit)

    target = patchify(img, cfg["encoder"]["patch"])
    if loss_cfg["norm_pix"]:
        mean = jnp.mean(target, axis=-1, keepdims=True)
        var = jnp.var(target, axis=-1, keepdims=True, ddof=1)  # unbiased, as torch.var
        target = (target - mean) / jnp.sqrt(var + loss_cfg["norm_pix_eps"])
    target = jax.lax.stop_gradient(target)
    per_patch = jnp.mean((pred - target) ** 2, axis=-1)
    loss_rc = jnp.sum(per_patch * mask) / jnp.sum(mask)
    out = {"loss_rc": loss_rc}
    loss = loss_cfg["rc_weight"] * loss_rc
    if cfg["contrastive"]:
        if cfg["feature_decoder"]["enabled"]:
            feat = mae_decoder(latent, ids_restore, p, cfg, cfg["feature_decoder"],
                               "feature_decoder", vit)
            z_s = jnp.mean(feat, axis=1)  # all L tokens (CMAE#3)
        else:
            z_s = jnp.mean(latent[:, 1:] if vit else latent, axis=1)
        q = nonlinear_neck(z_s, p, "projector", cfg["projector"]["bn_eps"])
        q = l2_normalize(nonlinear_neck(q, p, "head.predictor", cfg["predictor"]["bn_eps"]))
        if vit:
            latent_t = vit_encoder(img_t, p, cfg, "target_backbone", None, False)
            z_t = jnp.mean(latent_t[:, 1:], axis=1)  # patch tokens only, no LN
        else:
            z_t = jnp.mean(convvit_encoder(img_t, p, cfg, "target_backbone", None, None, False),
                           axis=1)
        k = l2_normalize(nonlinear_neck(z_t, p, "target_projector", cfg["projector"]["bn_eps"]))
        k = jax.lax.stop_gradient(k)
        tau = loss_cfg["temperature"]
        logits = q @ k.T / tau
        n = logits.shape[0]
        ce = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(n), jnp.arange(n)])
        loss_ct = loss_cfg["ct_weight"] * 2.0 * tau * ce
        out["loss_ct"] = loss_ct
        loss = loss + loss_ct
    out["loss"] = loss
    return loss, out


def is_trained(name):
    """Not a fixed pos embed and not an EMA target (CMAE.md 4, 8)."""
    return "pos_embed" not in name and not name.startswith(("target_backbone.", "target_projector."))


def relative_error(a, b, floor=1e-12):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), floor))


def check_masks(batch, report):
    """ids_restore is a permutation, ids_keep its first visible tokens, mask = 1 elsewhere."""
    ids_keep, ids_restore, mask = batch["ids_keep"], batch["ids_restore"], batch["mask"]
    n_keep, length = ids_keep.shape[1], ids_restore.shape[1]
    for i in range(ids_restore.shape[0]):
        shuffle = np.argsort(ids_restore[i])
        ok = sorted(ids_restore[i].tolist()) == list(range(length))
        ok = ok and np.array_equal(shuffle[:n_keep], ids_keep[i])
        expect = (ids_restore[i] >= n_keep).astype(np.float64)
        report("mask/sample%d" % i, 0.0 if ok else float("inf"))
        report("mask/row%d" % i, relative_error(mask[i], expect))


def main(argv):
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[2])
        return 2
    try:
        with open(argv[1]) as f:
            cfg = json.load(f)
        inputs = load_file(argv[2])
        theirs = load_file(argv[3])
    except (OSError, ValueError) as e:
        print("cmae_reference.py: %s" % e)
        return 2
    batch_names = ("img", "img_t", "ids_keep", "ids_restore", "mask", "labels")
    batch = {k: np.asarray(v) for k, v in inputs.items() if k in batch_names}
    params = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in inputs.items()
              if k not in batch_names}
    for k in ("img", "img_t", "mask"):
        if k in batch:
            batch[k] = jnp.asarray(batch[k], dtype=jnp.float64)

    results = []

    def report(name, err):
        results.append((err, name))

    check_masks({k: np.asarray(v) for k, v in batch.items()}, report)

    # The fixed embeddings cmaec initialized must be CMAE.md's formula (this reference uses its own).
    for name, v in params.items():
        if "pos_embed" in name:
            _, rows, dim = v.shape
            length = batch["ids_restore"].shape[1]
            grid = int(round(length**0.5))
            report(name, relative_error(v, sincos_2d(grid, dim, rows - length)))

    trained = sorted(k for k in params if is_trained(k))
    recorder = Params(params)

    def loss_of_trained(tr):
        recorder.tensors = dict(params, **tr)
        return losses(recorder, batch, cfg)

    # jit: one trace (which records the params used), then one compiled run
    (_, values), grads = jax.jit(jax.value_and_grad(loss_of_trained, has_aux=True))(
        {k: params[k] for k in trained})

    # the pos embeds were compared with the formula above, which the forward uses
    unused = sorted(set(params) - recorder.used - {k for k in params if "pos_embed" in k})
    if unused:
        print("cmae_reference.py: params the reference does not use: %s" % ", ".join(unused[:8]))
        return 1
    for name, v in values.items():
        report(name, relative_error(theirs[name], v) if name in theirs else float("inf"))
    their_grads = {k[len("grad/"):] for k in theirs if k.startswith("grad/")}
    # Some gradients are exactly zero in exact arithmetic: a bias feeding a training-mode
    # BatchNorm (projector.fc0.bias, head.predictor.fc0.bias, and the feature decoder's last
    # LN bias and decoder_pred bias, whose shifts reach that BN as per-feature constants)
    # cancels in the batch mean. In f64 both sides then hold roundoff, ~1e-16 of the gradients
    # they were computed from, so a gradient is compared on the scale of the largest one.
    scale = max([float(np.max(np.abs(np.asarray(g)), initial=0.0)) for g in grads.values()] + [0.0])
    floor = max(1e-12, 1e-9 * scale)
    for name in sorted(set(trained) | their_grads):
        if name not in their_grads or name not in grads:
            report("grad/" + name + (" (missing in cmaec)" if name not in their_grads
                                     else " (not a trained param)"), float("inf"))
        else:
            report("grad/" + name, relative_error(theirs["grad/" + name], grads[name], floor))

    worst = max(results)
    bad = [r for r in results if not r[0] <= TOLERANCE]
    print("cmae_reference.py: %s (%s): loss %.12g loss_rc %.12g%s; %d values compared, worst %s "
          "%.3e" % (cfg.get("name", "?"), cfg["arch"], float(values["loss"]),
                    float(values["loss_rc"]),
                    " loss_ct %.12g" % float(values["loss_ct"]) if "loss_ct" in values else "",
                    len(results), worst[1], worst[0]))
    if bad:
        for err, name in sorted(bad, reverse=True)[:10]:
            print("  MISMATCH %s: relative error %.3e > %g" % (name, err, TOLERANCE))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
