#!/usr/bin/env python3
"""scripts/scaling_model.py -- the data-parallel step-time model of docs/scaling.md.

T(N) = T_compute + T_small(N) + max(0, T_end(N) - T_compute) + kappa * T_overlapped(N)

T_compute is the one-GPU step at the per-GPU batch (weak scaling: the per-GPU batch stays,
the global batch grows with N). The gradients (f32, 4 bytes per trained parameter) are
packed in production order into buckets of 25 MB (cm_data_parallel's default); a bucket is ready when its last gradient
is produced, the backward producing the gradient bytes at an even rate over its share of the
step; the buckets' ring all_reduces run one after another on the communication stream,
each starting when it is ready and the previous one has ended. T_end is when the last one
ends; the part of the communication before T_compute is hidden behind the backward, except
for the slowdown kappa of the compute it overlaps (NCCL's kernels take SMs and memory
bandwidth). T_small is the latency of the step's small collectives (SyncBN's statistics,
the InfoNCE keys' all_gather and their gradients), which sit on the critical path.

Ring all_reduce of S bytes over N ranks: 2 (N - 1) / N * S / B_bus + latency, with B_bus the
bus bandwidth: within a node NVLink 4, across nodes the 8 NICs of each node together (a ring
crosses each node boundary once per channel, NCCL runs one channel per NIC).

Usage: python3 scripts/scaling_model.py [--cmaec build/cmaec] [--step-ms 40] ...
       python3 scripts/scaling_model.py --cpu --cpu-step-ms MS   (the 2-rank CPU prediction)
Every figure it assumes is an option; docs/scaling.md says why each default is what it is.
"""
import argparse
import math
import os
import re
import socket
import subprocess
import threading
import time

MB = 1000 * 1000
MiB = 1 << 20


def summary_figures(cmaec, model):
    """(trained params, backward GFLOP, step GFLOP) from `cmaec summary MODEL`."""
    out = subprocess.run([cmaec, "summary", model], check=True, capture_output=True,
                         text=True).stdout
    total = re.search(r"^total\s+([\d,]+)\s+([\d,]+)", out, re.M)
    backward = re.search(r"backward \(autodiff nodes\)\s+([\d.]+) GFLOP", out)
    step = re.search(r"step, exact from the graphs\s+([\d.]+) GFLOP", out)
    if not (total and backward and step):
        raise SystemExit("scaling_model: cannot read `cmaec summary %s`" % model)
    return int(total.group(2).replace(",", "")), float(backward.group(1)), float(step.group(1))


def small_collectives(cmaec, model):
    """Collectives of the step other than the gradient buckets (`cmaec build --ranks 2`)."""
    path = "/tmp/scaling_model_step_%d.txt" % os.getpid()
    try:
        subprocess.run([cmaec, "build", model, "-o", path, "--text", "--train", "--ranks", "2",
                        "--batch", "2", "--no-opt"], check=True, capture_output=True)
        text = open(path).read()
    finally:
        if os.path.exists(path):
            os.remove(path)
    n = 0
    for line in text.splitlines():
        if re.search(r"= (all_reduce|all_gather|reduce_scatter)\(", line) and \
                "grad_bucket" not in line:
            n += 1
    return n


def buckets(grad_bytes, bucket_bytes):
    """Bucket sizes in production order (the last one holds what is left)."""
    sizes = []
    left = grad_bytes
    while left > 0:
        sizes.append(min(bucket_bytes, left))
        left -= sizes[-1]
    return sizes


def ring_allreduce_s(nbytes, n, a):
    """Seconds for one ring all_reduce of nbytes over n ranks."""
    if n == 1:
        return 0.0
    per_node = a.gpus_per_node
    nodes = math.ceil(n / per_node)
    bus = a.nvlink_gbs if nodes == 1 else min(a.nvlink_gbs, per_node * a.nic_gbs)
    # a chunk goes round the ring twice (reduce-scatter, all-gather): n - nodes NVLink hops and
    # nodes network hops per round (one node: n NVLink hops)
    hops_nv = n if nodes == 1 else n - nodes
    hops_ib = 0 if nodes == 1 else nodes
    latency = 2 * (hops_nv * a.alpha_nvlink_us + hops_ib * a.alpha_ib_us) * 1e-6
    return 2 * (n - 1) / n * nbytes / (bus * 1e9) + latency


def small_collective_s(n, a):
    """Latency of a small (latency-bound) collective: NCCL's tree, 2 log2(n) hops."""
    if n == 1:
        return 0.0
    alpha = a.alpha_nvlink_us if n <= a.gpus_per_node else a.alpha_ib_us
    return 2 * math.ceil(math.log2(n)) * alpha * 1e-6


def step_time(n, t1, backward_frac, sizes, n_small, allreduce_s, small_s, kappa):
    """(T(N), exposed gradient communication, its total) in seconds."""
    if n == 1:
        return t1, 0.0, 0.0
    t_backward = t1 * backward_frac
    t_start = t1 - t_backward
    total = sum(sizes)
    produced = 0
    end = 0.0
    comm = 0.0
    overlapped = 0.0
    for s in sizes:
        produced += s
        ready = t_start + t_backward * produced / total
        start = max(ready, end)
        dur = allreduce_s(s, n)
        end = start + dur
        comm += dur
        overlapped += max(0.0, min(end, t1) - start)
    exposed = max(0.0, end - t1)
    return t1 + n_small * small_s(n) + exposed + kappa * overlapped, exposed, comm


def loopback_gbs(nbytes=256 * MiB, chunk=4 * MiB):
    """Measured TCP bandwidth over 127.0.0.1, one direction, GB/s."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def sink():
        c, _ = srv.accept()
        got = 0
        while got < nbytes:
            b = c.recv(chunk)
            if not b:
                break
            got += len(b)
        c.sendall(b"k")
        c.close()

    th = threading.Thread(target=sink)
    th.start()
    cli = socket.create_connection(("127.0.0.1", port))
    buf = b"\0" * chunk
    t0 = time.perf_counter()
    sent = 0
    while sent < nbytes:
        cli.sendall(buf)
        sent += chunk
    cli.recv(1)
    dt = time.perf_counter() - t0
    cli.close()
    th.join()
    srv.close()
    return nbytes / dt / 1e9


def gpu_table(a):
    params, bwd_gflop, step_gflop = a.params, a.backward_gflop, a.step_gflop
    if a.cmaec:
        params, bwd_gflop, step_gflop = summary_figures(a.cmaec, a.model)
        a.small = small_collectives(a.cmaec, a.model)
    grad_bytes = 4 * params
    sizes = buckets(grad_bytes, int(a.bucket_mb * MB))
    frac = bwd_gflop / step_gflop
    t1 = a.step_ms * 1e-3
    print("model %s: %d trained params, %.1f MB of f32 gradients in %d buckets of %g MB; "
          "backward %.1f %% of the step's FLOPs; %d small collectives" %
          (os.path.basename(a.model), params, grad_bytes / 1e6, len(sizes), a.bucket_mb,
           100 * frac, a.small))
    print("one-GPU step %.1f ms; NVLink bus %.0f GB/s, NIC %.0f GB/s x %d per node; "
          "alpha %.1f / %.1f us; kappa %.2f" %
          (a.step_ms, a.nvlink_gbs, a.nic_gbs, a.gpus_per_node, a.alpha_nvlink_us,
           a.alpha_ib_us, a.kappa))
    print("%5s %10s %12s %12s %10s %11s" % ("GPUs", "T(N) ms", "comm ms", "exposed ms",
                                           "small ms", "efficiency"))
    for n in a.gpus:
        t, exposed, comm = step_time(n, t1, frac, sizes, a.small,
                                     lambda s, k: ring_allreduce_s(s, k, a),
                                     lambda k: small_collective_s(k, a), a.kappa)
        print("%5d %10.2f %12.2f %12.3f %10.3f %10.1f%%" %
              (n, 1e3 * t, 1e3 * comm, 1e3 * exposed, 1e3 * a.small * small_collective_s(n, a),
               100 * t1 / t))


def cpu_prediction(a):
    params, bwd_gflop, step_gflop = a.params, a.backward_gflop, a.step_gflop
    if a.cmaec:
        params, bwd_gflop, step_gflop = summary_figures(a.cmaec, a.model)
        a.small = small_collectives(a.cmaec, a.model)
    grad_bytes = 4 * params
    sizes = buckets(grad_bytes, int(a.bucket_mb * MB))
    bw = a.loopback_gbs if a.loopback_gbs > 0 else loopback_gbs()
    # 2 ranks: each sends and receives 2 (N - 1) / N * S = S bytes per bucket; on a machine whose
    # cores the two ranks' compute already fills, the kernel's copies take CPU time from it, so
    # nothing overlaps (kappa = 1)
    comm = sum(s / (bw * 1e9) + a.cpu_latency_us * 1e-6 for s in sizes)
    small = 2 * a.small * a.cpu_latency_us * 1e-6
    t1 = a.cpu_step_ms * 1e-3
    t2 = t1 + comm + small
    print("model %s: %.2f MB of f32 gradients in %d bucket(s); loopback %.2f GB/s (%s); "
          "%d small collectives at %g us" %
          (os.path.basename(a.model), grad_bytes / 1e6, len(sizes), bw,
           "given" if a.loopback_gbs > 0 else "measured", a.small, a.cpu_latency_us))
    print("1 process at the global batch: %.1f ms/step (measured, given)" % a.cpu_step_ms)
    print("2 ranks at half the batch each: %.1f ms/step predicted (+%.1f ms gradients, "
          "+%.2f ms small collectives): overhead %.1f %%" %
          (1e3 * t2, 1e3 * comm, 1e3 * small, 100 * (t2 / t1 - 1)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cmaec", help="read the model's figures with this binary's summary/build")
    p.add_argument("--model", default="models/cmae_vit_base.json")
    p.add_argument("--params", type=int, default=121118208, help="trained params (ViT-B)")
    p.add_argument("--backward-gflop", type=float, default=51.248)
    p.add_argument("--step-gflop", type=float, default=112.117)
    p.add_argument("--small", type=int, default=11, help="small collectives per step")
    p.add_argument("--step-ms", type=float, default=40.0,
                   help="one-GPU step at the per-GPU batch (ViT-B, batch 128, bf16)")
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbs", type=float, default=360.0,
                   help="NCCL all_reduce bus bandwidth within an H100 node")
    p.add_argument("--nic-gbs", type=float, default=45.0,
                   help="usable InfiniBand NDR bandwidth per GPU (400 Gb/s line rate)")
    p.add_argument("--alpha-nvlink-us", type=float, default=1.0)
    p.add_argument("--alpha-ib-us", type=float, default=5.0)
    p.add_argument("--kappa", type=float, default=0.1,
                   help="slowdown of the compute that communication overlaps")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--cpu", action="store_true", help="the 2-rank CPU prediction instead")
    p.add_argument("--cpu-step-ms", type=float, default=0.0,
                   help="measured 1-process CPU step (metrics.jsonl step_ms)")
    p.add_argument("--loopback-gbs", type=float, default=0.0, help="0: measure it")
    p.add_argument("--cpu-latency-us", type=float, default=50.0,
                   help="one collective's latency over loopback TCP")
    a = p.parse_args()
    if a.cpu:
        if a.cpu_step_ms <= 0:
            raise SystemExit("scaling_model: --cpu needs --cpu-step-ms (the 1-process step)")
        if a.model == "models/cmae_vit_base.json":
            a.model = "models/cmae_vit_tiny_fmnist.json"
            a.params, a.backward_gflop, a.step_gflop = 1708048, 0.243, 0.476
        cpu_prediction(a)
    else:
        gpu_table(a)


if __name__ == "__main__":
    main()
