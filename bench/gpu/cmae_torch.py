#!/usr/bin/env python3
"""The CMAE training step in PyTorch, the peer that bench/gpu/run.sh times cmaec against.

Written from ../shared/CMAE.md (sections 1-8, 13) with the sizes of a cmaec model config
(models/*.json, "extends" resolved), so both sides run the same step:
  online encoder (patch conv, fixed 2-D sin-cos positions, the visible tokens of a 2x2-block
  mask, cls, pre-norm blocks, final LN) -> pixel decoder (mask tokens, unshuffle, blocks, LN,
  linear to the patch pixels) -> masked norm-pix MSE on the online view;
  the same latent -> feature decoder (2 blocks, out = encoder width) -> mean over all tokens
  -> projector (fc, BN, ReLU, fc without bias) -> predictor -> L2-normalised q;
  the EMA target encoder (no final LN) on the full target view -> mean over the patch tokens
  -> target projector -> k (no gradient);
  loss = rc_weight * L_rc + ct_weight * 2 tau * CE(q k^T / tau, arange(n));
  AdamW (betas, weight decay off for LayerNorms, biases, pos_embed, mask/cls tokens; BN
  weights decayed), then the EMA update of target backbone and projector (m constant).
Precision as a PyTorch user runs it (--precision bf16, the default; f32: no autocast): bf16 autocast (no loss scaler: bf16 needs none), fused
AdamW on CUDA, attention through F.scaled_dot_product_attention, the EMA as one foreach lerp.
Modes: eager, and torch.compile; "regional" compiles each transformer block (PyTorch's advice
for repeated blocks: one compile per distinct shape, a fraction of the whole model's compile
time), "full" the whole forward (and its backward); --compile-backend inductor by default.
The step's FLOPs are counted by torch.utils.flop_counter on one eager step (every matmul,
convolution and attention, forward and backward).

Prints one line per mode, "torch <mode>: <ms> ms/step ...", and "flops: <TFLOP> TFLOP per
step ...", which bench/gpu/run.sh parses.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_config(path):
    """A cmaec model config with its "extends" chain merged (objects key by key)."""
    with open(path) as f:
        cfg = json.load(f)
    base = cfg.pop("extends", None)
    if base is None:
        return cfg
    merged = load_config(os.path.join(os.path.dirname(path), base))

    def merge(a, b):
        for key, value in b.items():
            if isinstance(value, dict) and isinstance(a.get(key), dict):
                merge(a[key], value)
            else:
                a[key] = value

    merge(merged, cfg)
    return merged


def sincos_2d(grid, dim, cls):
    """[1, cls + grid^2, dim]: [sin(a w), cos(a w), sin(b w), cos(b w)] for token t = a grid + b,
    w_k = 1 / 10000^(k / (dim / 4)); the cls slot is zero (CMAE.md section 3)."""
    d4 = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(d4, dtype=torch.float64) / d4))
    t = torch.arange(grid * grid, dtype=torch.float64)
    a, b = (t // grid)[:, None] * omega, (t % grid)[:, None] * omega
    pe = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)
    if cls:
        pe = torch.cat([torch.zeros(1, dim, dtype=torch.float64), pe], dim=0)
    return pe[None].float()


class Block(nn.Module):
    """Pre-norm transformer block: x + proj(attn(ln1 x)), then x + fc2(gelu(fc1(ln2 x)))."""

    def __init__(self, dim, heads, hidden, eps):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(n, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def blocks(n, dim, heads, mlp_ratio, eps):
    return nn.ModuleList(Block(dim, heads, int(mlp_ratio * dim), eps) for _ in range(n))


class Encoder(nn.Module):
    def __init__(self, cfg, final_norm):
        super().__init__()
        e, data = cfg["encoder"], cfg["data"]
        self.dim, self.patch = e["width"], e["patch"]
        grid = data["image_size"] // self.patch
        self.patch_embed = nn.Conv2d(data["in_chans"], self.dim, self.patch, self.patch)
        self.register_buffer("pos_embed", sincos_2d(grid, self.dim, True))
        self.cls_token = nn.Parameter(torch.randn(1, 1, self.dim) * 0.02)
        self.layers = blocks(e["depth"], self.dim, e["heads"], e["mlp_ratio"], e["ln_eps"])
        self.ln1 = nn.LayerNorm(self.dim, eps=e["ln_eps"]) if final_norm else None

    def forward(self, img, ids_keep=None):
        x = self.patch_embed(img).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, self.dim))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.ln1(x) if self.ln1 is not None else x


class Decoder(nn.Module):
    """MAEPretrainDecoder: embed, mask tokens, unshuffle, cls back, blocks, LN, pred, drop cls."""

    def __init__(self, cfg, dec, out_dim):
        super().__init__()
        e, grid = cfg["encoder"], cfg["data"]["image_size"] // cfg["encoder"]["patch"]
        self.width = dec["width"]
        self.decoder_embed = nn.Linear(e["width"], self.width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, self.width) * 0.02)
        self.register_buffer("decoder_pos_embed", sincos_2d(grid, self.width, True))
        self.decoder_blocks = blocks(dec["depth"], self.width, dec["heads"],
                                     dec.get("mlp_ratio", e["mlp_ratio"]), e["ln_eps"])
        self.ln1 = nn.LayerNorm(self.width, eps=e["ln_eps"])
        self.decoder_pred = nn.Linear(self.width, out_dim)

    def forward(self, latent, ids_restore):
        x = self.decoder_embed(latent)
        n, tokens = ids_restore.shape
        visible = x[:, 1:]
        masked = self.mask_token.expand(n, tokens - visible.shape[1], -1)
        seq = torch.gather(torch.cat([visible, masked], dim=1), 1,
                           ids_restore[..., None].expand(-1, -1, self.width))
        x = torch.cat([x[:, :1], seq], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.ln1(x))[:, 1:]


class Neck(nn.Module):
    """NonLinearNeck: fc0 (bias) -> BN (batch statistics) -> ReLU -> fc1 (no bias)."""

    def __init__(self, d_in, hidden, d_out, eps):
        super().__init__()
        self.fc0, self.bn0 = nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden, eps=eps)
        self.fc1 = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x):
        return self.fc1(F.relu(self.bn0(self.fc0(x))))


class CMAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        e, p, loss = cfg["encoder"], cfg["projector"], cfg["loss"]
        self.cfg, self.patch = cfg, e["patch"]
        pixels = e["patch"] * e["patch"] * cfg["data"]["in_chans"]
        self.backbone = Encoder(cfg, e.get("final_norm", True))
        self.pixel_decoder = Decoder(cfg, cfg["pixel_decoder"], pixels)
        self.feature_decoder = Decoder(cfg, cfg["feature_decoder"], e["width"])
        self.projector = Neck(e["width"], p["hidden"], p["out"], p["bn_eps"])
        q = cfg["predictor"]
        self.predictor = Neck(p["out"], q["hidden"], q["out"], q["bn_eps"])
        self.target_backbone = Encoder(cfg, False)
        self.target_projector = Neck(e["width"], p["hidden"], p["out"], p["bn_eps"])
        for name, t in self.ema_pairs():
            t.data.copy_(dict(self.named_parameters())[name].data)
            t.requires_grad_(False)
        self.tau, self.rc_weight, self.ct_weight = (loss["temperature"], loss["rc_weight"],
                                                    loss["ct_weight"])
        self.norm_pix, self.norm_pix_eps = loss["norm_pix"], loss["norm_pix_eps"]

    def ema_pairs(self):
        """(online name, target param): target_backbone <- backbone (no final LN),
        target_projector <- projector."""
        own = dict(self.named_parameters())
        for name, t in own.items():
            for prefix in ("target_backbone.", "target_projector."):
                if name.startswith(prefix):
                    yield name.replace("target_", "", 1), t

    def patchify(self, img):
        n, c, h, w = img.shape
        g, p = h // self.patch, self.patch
        x = img.reshape(n, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, g * g, p * p * c)

    def forward(self, img, img_t, ids_keep, ids_restore, mask):
        latent = self.backbone(img, ids_keep)
        pred = self.pixel_decoder(latent, ids_restore)
        with torch.no_grad():
            target = self.patchify(img)
            if self.norm_pix:
                mean = target.mean(dim=-1, keepdim=True)
                var = target.var(dim=-1, keepdim=True)  # unbiased, as torch's default
                target = (target - mean) / (var + self.norm_pix_eps).sqrt()
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        loss_rc = (per_patch * mask).sum() / mask.sum()
        pooled = self.feature_decoder(latent, ids_restore).mean(dim=1)
        q = F.normalize(self.predictor(self.projector(pooled)).float(), dim=1)
        with torch.no_grad():
            feats = self.target_backbone(img_t)[:, 1:].mean(dim=1)
            k = F.normalize(self.target_projector(feats).float(), dim=1)
        logits = (q @ k.t()).float() / self.tau
        labels = torch.arange(q.shape[0], device=q.device)
        loss_ct = self.ct_weight * 2 * self.tau * F.cross_entropy(logits, labels)
        return self.rc_weight * loss_rc + loss_ct


def block_masks(cfg, n, device, gen):
    """ids_keep, ids_restore, mask (1 = masked) of CMAE's block masking (CMAE.md section 2a)."""
    grid = cfg["data"]["image_size"] // cfg["encoder"]["patch"]
    block, ratio = cfg["mask"]["block"], cfg["mask"]["ratio"]
    cells = (grid // block) ** 2
    keep_cells = int(cells * (1 - ratio))
    noise = torch.rand(n, cells, generator=gen)
    keep = torch.zeros(n, cells)
    keep.scatter_(1, noise.argsort(dim=1)[:, :keep_cells], 1.0)
    side = grid // block
    keep = keep.reshape(n, side, 1, side, 1).expand(n, side, block, side, block)
    keep = keep.reshape(n, grid * grid)
    order = keep.argsort(dim=1, descending=True, stable=True)
    n_keep = keep_cells * block * block
    ids_keep, ids_restore = order[:, :n_keep], order.argsort(dim=1)
    return ids_keep.to(device), ids_restore.to(device), (1 - keep).to(device)


def make_optimizer(model, cfg, device):
    no_decay = ("ln", "bias", "pos_embed", "mask_token", "cls_token")
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if any(s in name for s in no_decay) else decay).append(p)
    o = cfg["optimizer"]
    lr = o["base_lr"] * o["batch"] / 256
    return torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                              {"params": rest, "weight_decay": 0.0}], lr=lr,
                             betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                             fused=device.type == "cuda")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_mode(mode, cfg, args, device, batch, flops_out):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = CMAE(cfg).to(device).train()
    opt = make_optimizer(model, cfg, device)
    own = dict(model.named_parameters())
    pairs = list(model.ema_pairs())
    online, target = [own[name] for name, _ in pairs], [t for _, t in pairs]
    momentum = cfg["schedule"]["momentum_base"]
    forward = model
    t_compile = 0.0
    if mode == "compile" and args.compile == "full":
        forward = torch.compile(model, backend=args.compile_backend)
    elif mode == "compile":
        for m in model.modules():
            if isinstance(m, Block):
                m.compile(backend=args.compile_backend)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=args.precision == "bf16"):
            loss = forward(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(target, online, 1 - momentum)
        return loss.detach()

    if mode == "eager" and flops_out is not None:
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops_out.append(counter.get_total_flops())
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # the compile happens in the first
        loss = step()
    sync(device)
    t_compile = time.perf_counter() - t0
    if not math.isfinite(float(loss)):
        sys.exit("cmae_torch: %s: the loss is %s" % (mode, float(loss)))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    ms = 1e3 * (time.perf_counter() - t0) / args.steps
    what = ("bf16 autocast" if args.precision == "bf16" else "f32") + (", compile %s (%s), warm-up %.1f s" % (args.compile,
                                                                     args.compile_backend,
                                                                     t_compile)
                              if mode == "compile" else "")
    print("torch %s: %.3f ms/step, %.1f images/s (batch %d, %d steps, %s, loss %.4f)"
          % (mode, ms, batch[0].shape[0] / ms * 1e3, batch[0].shape[0], args.steps, what,
             float(loss)), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/cmae_vit_base.json")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--compile", choices=("regional", "full"), default="regional")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile's backend (the dry run: aot_eager, which traces and "
                    "splits forward and backward as inductor does, without its code generation)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("bf16", "f32"), default="bf16",
                    help="bf16: autocast to bf16 (the GPU default); f32: no autocast")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (CPU; 0 leaves PyTorch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.model)
    device = torch.device(args.device)
    # one static graph per block shape (online 1 + visible tokens, decoders and target 1 + all
    # tokens; with and without grad): no automatic dynamic shapes, room for every variant
    dynamo = torch._dynamo.config
    dynamo.automatic_dynamic_shapes = False
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, 64)
    gen = torch.Generator().manual_seed(2)
    size, chans = cfg["data"]["image_size"], cfg["data"]["in_chans"]
    img = (torch.rand(args.batch, chans, size, size, generator=gen) * 4 - 2).to(device)
    img_t = (torch.rand(args.batch, chans, size, size, generator=gen) * 4 - 2).to(device)
    batch = (img, img_t) + block_masks(cfg, args.batch, device, gen)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print("# %s batch %d on %s, torch %s" % (cfg["name"], args.batch, name, torch.__version__))
    flops = []
    for mode in args.modes.split(","):
        run_mode(mode, cfg, args, device, batch, flops)
    if flops:
        print("flops: %.4f TFLOP per step (torch.utils.flop_counter, one eager step: matmuls, "
              "convolutions, attention, forward and backward)" % (flops[0] * 1e-12))


if __name__ == "__main__":
    main()
