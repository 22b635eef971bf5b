#!/usr/bin/env python3
"""PyTorch's side of bench/gpu's GEMM and attention rows, on the same card as cmaec's.

  torch_peer.py gemm SHAPES   each shape of `build/bench/gpu_gemm --list` (the training step's
                              GEMMs) as torch.matmul on bf16 operands, transposed operands as
                              transposed views (cuBLAS reads them in place)
  torch_peer.py attn          F.scaled_dot_product_attention forward + backward in bf16,
                              q, k, v [n, heads, tokens, dim], the gradient dO given
(--dtype f32 for the CPU dry run.)
Each is timed with CUDA events over --seconds after a warm-up (on the CPU, --device cpu, with
the wall clock: the dry run proves it runs). Output lines mirror cmaec's programs:
  gemm: "<index> <role> M N K ta tb count <ms> <TFLOP/s>"; attn: "attn ...: <ms> ms/step ...".
"""
import argparse
import time

import torch
import torch.nn.functional as F


def timer(fn, device, seconds):
    """ms per call of fn: a warm-up call, then enough calls to fill `seconds` (at least 3)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        once = max(start.elapsed_time(end), 1e-3)
        runs = max(3, int(seconds * 1e3 / once))
        start.record()
        for _ in range(runs):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / runs
    runs, t0 = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - t0 < seconds:
        fn()
        runs += 1
    return 1e3 * (time.perf_counter() - t0) / runs


def gemm(args, device):
    rows = []
    with open(args.shapes) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[0].isdigit():
                rows.append(parts[:8])
    print("# torch.matmul %s on %s, torch %s" % (args.dtype_name, name_of(device),
                                                 torch.__version__))
    for index, role, m, n, k, ta, tb, count in rows:
        m, n, k = int(m), int(n), int(k)
        a = torch.randn((k, m) if ta == "1" else (m, k), device=device, dtype=args.dtype)
        b = torch.randn((n, k) if tb == "1" else (k, n), device=device, dtype=args.dtype)
        a = a.t() if ta == "1" else a
        b = b.t() if tb == "1" else b
        ms = timer(lambda: torch.matmul(a, b), device, args.seconds)
        print("%-3s %-5s %6d %6d %6d %2s %2s %5s %10.5f %8.2f"
              % (index, role, m, n, k, ta, tb, count, ms, 2e-9 * m * n * k / ms), flush=True)


def attn(args, device):
    shape = (args.n, args.heads, args.tokens, args.dim)
    q, k, v = (torch.randn(shape, device=device, dtype=args.dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(shape, device=device, dtype=args.dtype)

    def step():
        y = F.scaled_dot_product_attention(q, k, v)
        q.grad = k.grad = v.grad = None
        y.backward(dout)

    ms = timer(step, device, args.seconds)
    print("attn n %d heads %d tokens %d dim %d %s: %.3f ms/step on %s (torch %s, "
          "F.scaled_dot_product_attention forward + backward)"
          % (args.n, args.heads, args.tokens, args.dim, args.dtype_name, ms, name_of(device),
             torch.__version__))


def name_of(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gemm")
    g.add_argument("shapes")
    a = sub.add_parser("attn")
    a.add_argument("--n", type=int, default=128)
    a.add_argument("--heads", type=int, default=12)
    a.add_argument("--tokens", type=int, default=197)
    a.add_argument("--dim", type=int, default=64)
    for p in (g, a):
        p.add_argument("--seconds", type=float, default=0.2)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16",
                       help="f32: the CPU dry run (PyTorch's CPU bf16 matmul is slow without "
                       "native bf16 instructions)")
    args = ap.parse_args()
    args.dtype_name = args.dtype
    args.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    gemm(args, device) if args.what == "gemm" else attn(args, device)


if __name__ == "__main__":
    main()
