#!/usr/bin/env python3
"""Machine ceiling for the DeepFM benchmark, printed as one JSON object.

* CPU model, core count, relevant ISA flags (avx2, fma, avx512f, avx512_bf16,
  avx512_fp16, amx_tile/amx_bf16/amx_int8, avx_vnni) from /proc/cpuinfo.
* torch matmul throughput (GFLOP/s = 2*M*N*K / s, best of several reps) in
  fp32 and bf16: a square 4096^3 matmul, and the DeepFM MLP's own GEMMs at
  batch 4096 (forward shapes 4096x624 @ 624x400, 2 x 4096x400 @ 400x400,
  4096x400 @ 400x1, plus the two backward GEMMs per layer).
* A memory-bandwidth probe (torch triad a = b + s*c on 64M fp32, GB/s), the
  bound for embedding-table/optimizer traffic.
* FLOP-bound training samples/s for the DeepFM MLP: input 39*16 = 624 ->
  400 -> 400 -> 400 -> 1, forward 2*(624*400 + 2*400*400 + 400) = 1.14 MFLOP
  per sample, forward+backward ~ 3x forward = 3.42 MFLOP per sample; ceiling =
  measured GFLOP/s / 3.42 MFLOP.  Reported for both the MLP-shape GEMM rate
  (realistic) and the square-GEMM rate (peak).  Embedding lookups, the FM
  term and the optimizer are ignored (they are bandwidth-, not FLOP-bound).
  With GPU available (--device cuda) the same is measured on the GPU.

Usage: python bench/machine.py [--threads N] [--device cpu|cuda] [--quick] [--square-only fp32|bf16]
"""
import argparse
import json
import os
import platform
import time

import torch

FLAGS = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
         "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16"]
EMB, FIELDS, HID = 16, 39, [400, 400, 400]


def mlp_flops(inputs: int, hidden: list[int] = HID, extra_macs: int = 0) -> float:
    """Forward GEMM FLOPs per sample of an MLP inputs -> hidden... -> 1 (plus ``extra_macs`` multiply-adds)."""
    dims = [inputs, *hidden, 1]
    return 2.0 * (sum(a * b for a, b in zip(dims, dims[1:])) + extra_macs)


def cpu_info():
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and (not model or model == "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu_model": model, "logical_cpus": os.cpu_count(),
            "flags": {f: (f in flags) for f in FLAGS}}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, dev, min_time=0.5, reps=5):
    fn(); sync(dev)                       # warm-up
    best = float("inf")
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn(); n += 1
            sync(dev)
            el = time.perf_counter() - t0
            if el >= min_time / reps:
                break
        best = min(best, el / n)
    return best


def gemm_gflops(m, k, n, dtype, dev, min_time):
    a = torch.randn(m, k, device=dev).to(dtype)
    b = torch.randn(k, n, device=dev).to(dtype)
    t = bench(lambda: torch.mm(a, b), dev, min_time)
    return 2.0 * m * n * k / t / 1e9


def mlp_step_gemms(batch, dtype, dev, min_time):
    """All GEMMs of one MLP training step (fwd, grad-input, grad-weight) -> GFLOP/s."""
    dims = [FIELDS * EMB] + HID + [1]
    ops = []
    for i in range(len(dims) - 1):
        k, n = dims[i], dims[i + 1]
        x = torch.randn(batch, k, device=dev).to(dtype)
        w = torch.randn(k, n, device=dev).to(dtype)
        gy = torch.randn(batch, n, device=dev).to(dtype)
        ops += [(x, w), (gy, w.t().contiguous()), (x.t().contiguous(), gy)]
    flops = sum(2.0 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in ops)

    def run():
        for a, b in ops:
            torch.mm(a, b)
    t = bench(run, dev, min_time)
    return flops / t / 1e9


def triad_gbps(dev, n=1 << 26):
    a = torch.empty(n, device=dev); b = torch.randn(n, device=dev); c = torch.randn(n, device=dev)
    t = bench(lambda: torch.add(b, c, alpha=0.5, out=a), dev, 0.5)
    return 3 * 4 * n / t / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="shorter timing loops")
    ap.add_argument("--square-only", default=None, choices=["fp32", "bf16"],
                    help="only the square-GEMM rate in this precision, now (run_all.py takes it before and "
                         "after every contender): {\"square_gflops\": ...}")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda:0" if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    if args.square_only:
        dt = torch.bfloat16 if args.square_only == "bf16" else torch.float32
        gemm_gflops(4096, 4096, 4096, dt, dev, 0.5)  # warm-up: AMX and the clock reach their rate
        print(json.dumps({"square_gflops": round(gemm_gflops(4096, 4096, 4096, dt, dev, 1.5), 1)}))
        return
    mt = 0.5 if args.quick else 2.0
    fwd_flops = mlp_flops(FIELDS * EMB)
    train_flops = 3.0 * fwd_flops
    out = {"torch": torch.__version__, "device": str(dev), "torch_threads": torch.get_num_threads(),
           **cpu_info(), "mkldnn_bf16_supported": bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)())}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    res = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        sq = gemm_gflops(4096, 4096, 4096, dt, dev, mt)
        mlp = mlp_step_gemms(4096, dt, dev, mt)
        res[name] = {"matmul_4096_gflops": round(sq, 1), "mlp_gemms_b4096_gflops": round(mlp, 1),
                     "mlp_train_samples_per_s_bound": round(mlp * 1e9 / train_flops),
                     "peak_train_samples_per_s_bound": round(sq * 1e9 / train_flops),
                     "mlp_infer_samples_per_s_bound": round(mlp * 1e9 / fwd_flops),
                     "peak_infer_samples_per_s_bound": round(sq * 1e9 / fwd_flops)}
    out["gemm"] = res
    out["triad_GBps"] = round(triad_gbps(dev), 1)
    out["deepfm_mlp"] = {"input": FIELDS * EMB, "hidden": HID, "fwd_mflop_per_sample": fwd_flops / 1e6,
                         "train_mflop_per_sample": train_flops / 1e6}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
