#!/usr/bin/env python3
"""The one table of bench/gpu/run.sh, from the outputs its parts left in DIR:
  shapes.txt     build/bench/gpu_gemm --list (the step's GEMM shapes)
  cm_gemm.txt    build/bench/gpu_gemm (cmaec, each shape timed)
  torch_gemm.txt bench/gpu/torch_peer.py gemm
  cm_attn.txt    build/bench/attn --dtype bf16      torch_attn.txt  torch_peer.py attn
  cm_step.txt    build/bench/step --precision bf16 (tuned: CMAEC_TUNE=cached)
  cm_step_untuned.txt  the same with CMAEC_TUNE=off    torch_step.txt  bench/gpu/cmae_torch.py
  card.txt       the card's name (nvidia-smi)
Ratios are cmaec's throughput over PyTorch's (torch ms / cmaec ms) for GEMMs and attention,
speed-ups (torch ms / cmaec ms) for the step; the fraction of the dense bf16 peak divides the
step's FLOPs (counted by PyTorch's flop counter on the same step) by the time. Targets (issue
16): GEMM >= 90 %, attention >= 80 %, step >= 1.3x eager and >= 1.1x torch.compile, >= 45 % of
the peak. The step's rows (untuned, tuned, torch eager, torch.compile, and the speed-ups) start
"step| ": tests/gpu/run.sh prints them under its table. The last line, "summary: ...", is
tests/gpu/run.sh's row. Exit status 0 when every figure was found (targets missed are
reported, not failures), 1 otherwise.
"""
import os
import re
import sys

# dense bf16 tensor-core peaks in TFLOP/s by the card's name (SXM parts; PCIe H100: 756)
PEAKS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]
TARGETS = {"gemm": 0.90, "attn": 0.80, "eager": 1.3, "compile": 1.1, "peak": 0.45}


def read(d, name):
    try:
        with open(os.path.join(d, name)) as f:
            return f.read()
    except OSError:
        return ""


def gemm_rows(text):
    """index -> (role, M, N, K, ta, tb, count, ms or None)"""
    rows = {}
    for line in text.splitlines():
        p = line.split()
        if len(p) >= 8 and p[0].isdigit():
            ms = None
            if len(p) >= 9:
                try:
                    ms = float(p[8])
                except ValueError:
                    ms = None
            rows[int(p[0])] = (p[1], int(p[2]), int(p[3]), int(p[4]), p[5], p[6], int(p[7]), ms)
    return rows


def first_float(pattern, text):
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else None


def pct(x):
    return "%.1f %%" % (100 * x) if x is not None else "-"


def verdict(x, target):
    return "" if x is None else ("met" if x >= target else "below")


def speedup(slow, fast):
    """slow / fast as "x1.23", or "-" when either is missing"""
    return "x%.2f" % (slow / fast) if slow and fast else "-"


def step_rows(untuned, tuned, tuned_stages, eager, comp):
    """The step's table: each row's ms and images/s (batch 128), and its speed-up over untuned
    cmaec, eager and torch.compile (that row's time over this row's)."""
    rows = [("cmaec untuned (CMAEC_TUNE=off)", untuned),
            ("cmaec tuned (%s stages from tuning.db)" % (
                tuned_stages if tuned_stages is not None else "?"), tuned),
            ("torch eager AMP", eager), ("torch.compile", comp)]
    out = ["step| %-42s %10s %9s %12s %10s %12s" % (
        "ViT-B bf16 step, batch 128", "ms", "images/s", "vs untuned", "vs eager", "vs compile")]
    for name, ms in rows:
        out.append("step| %-42s %10s %9s %12s %10s %12s" % (
            name, "%.2f" % ms if ms else "-", "%.1f" % (128e3 / ms) if ms else "-",
            speedup(untuned, ms), speedup(eager, ms), speedup(comp, ms)))
    return out


def main():
    d = sys.argv[1]
    card = read(d, "card.txt").strip() or "(no GPU)"
    peak = next((p for key, p in PEAKS if key in card), None)
    shapes, cm, pt = (gemm_rows(read(d, n)) for n in ("shapes.txt", "cm_gemm.txt",
                                                      "torch_gemm.txt"))
    print("== bench/gpu on %s (dense bf16 peak %s) ==" % (
        card, "%.0f TFLOP/s" % peak if peak else "unknown for this card"))
    print("%-3s %-5s %6s %6s %6s %2s %2s %5s %10s %10s %9s  %s" % (
        "#", "GEMM", "M", "N", "K", "ta", "tb", "count", "cmaec TF/s", "torch TF/s", "ratio",
        "target 90 %"))
    cm_total = pt_total = 0.0
    complete, met = True, 0
    for i, (role, m, n, k, ta, tb, count, _) in sorted(shapes.items()):
        c, t = cm.get(i, (None,) * 8)[7], pt.get(i, (None,) * 8)[7]
        flop = 2.0 * m * n * k
        ratio = t / c if c and t else None
        if c and t:
            cm_total += count * c
            pt_total += count * t
            met += ratio >= TARGETS["gemm"]
        else:
            complete = False
        print("%-3d %-5s %6d %6d %6d %2s %2s %5d %10s %10s %9s  %s" % (
            i, role, m, n, k, ta, tb, count, "%.1f" % (flop / c * 1e-9) if c else "-",
            "%.1f" % (flop / t * 1e-9) if t else "-", pct(ratio), verdict(ratio, TARGETS["gemm"])))
    gemm_ratio = pt_total / cm_total if cm_total and complete else None
    print("GEMMs of one step (each shape x its count): cmaec %.2f ms, torch %.2f ms: %s of torch "
          "(%d of %d shapes >= 90 %%; cmaec: the kernel's CUDA events, torch: CUDA events around "
          "back-to-back calls)" % (cm_total, pt_total, pct(gemm_ratio), met, len(shapes)))

    cm_attn = first_float(r"(?:bf16|f32): ([0-9.]+) ms/step", read(d, "cm_attn.txt"))
    pt_attn = first_float(r"(?:bf16|f32): ([0-9.]+) ms/step", read(d, "torch_attn.txt"))
    attn_ratio = pt_attn / cm_attn if cm_attn and pt_attn else None
    print("attention fwd+bwd bf16 128 x 12 heads x 197 x 64: cmaec %s ms, torch SDPA %s ms: %s "
          "(target 80 %%: %s)" % (cm_attn, pt_attn, pct(attn_ratio),
                                  verdict(attn_ratio, TARGETS["attn"]) or "-"))

    cm_text, pt_text = read(d, "cm_step.txt"), read(d, "torch_step.txt")
    cm_ms = first_float(r"^step ([0-9.]+) ms", cm_text)
    untuned_ms = first_float(r"^step ([0-9.]+) ms", read(d, "cm_step_untuned.txt"))
    tuned_stages = first_float(r"stages, ([0-9]+) tuned", cm_text)
    eager = first_float(r"^torch eager: ([0-9.]+) ms/step", pt_text)
    comp = first_float(r"^torch compile: ([0-9.]+) ms/step", pt_text)
    tflop = first_float(r"^flops: ([0-9.]+) TFLOP", pt_text)
    up_e = eager / cm_ms if eager and cm_ms else None
    up_c = comp / cm_ms if comp and cm_ms else None

    def of_peak(ms):
        return tflop / (ms * 1e-3) / peak if tflop and ms and peak else None

    for line in step_rows(untuned_ms, cm_ms, None if tuned_stages is None else int(tuned_stages),
                          eager, comp):
        print(line)
    print("step cmae_vit_base bf16: cmaec %s ms, torch eager AMP %s ms (cmaec x%s, target 1.3: "
          "%s), torch.compile %s ms (x%s, target 1.1: %s)" % (
              cm_ms, eager, "%.2f" % up_e if up_e else "-", verdict(up_e, 1.3) or "-", comp,
              "%.2f" % up_c if up_c else "-", verdict(up_c, 1.1) or "-"))
    print("step FLOPs %s TFLOP (torch's flop counter): of the dense bf16 peak cmaec %s (target "
          "45 %%: %s), eager %s, compile %s" % (tflop, pct(of_peak(cm_ms)),
                                                 verdict(of_peak(cm_ms), 0.45) or "-",
                                                 pct(of_peak(eager)), pct(of_peak(comp))))
    tuned_up = untuned_ms / cm_ms if untuned_ms and cm_ms else None
    figures = [gemm_ratio, attn_ratio, up_e, up_c, of_peak(cm_ms)]
    goals = [TARGETS[k] for k in ("gemm", "attn", "eager", "compile", "peak")]
    n_met = sum(1 for f, g in zip(figures, goals) if f is not None and f >= g)
    missing = sum(1 for f in figures if f is None)
    missing += tuned_up is None
    print("summary: %s: GEMMs %s of torch, attention %s, step x%s eager x%s compile, %s of peak, "
          "tuned x%s untuned; targets met %d of 5%s" % (
              card, pct(gemm_ratio), pct(attn_ratio), "%.2f" % up_e if up_e else "-",
              "%.2f" % up_c if up_c else "-", pct(of_peak(cm_ms)),
              "%.2f" % tuned_up if tuned_up else "-", n_met,
              ", %d figures missing" % missing if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
