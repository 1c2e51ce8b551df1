"""GN + PN-Act (``ilmconvert.nn.ProxyGroupNormAct``) against timm's ``GroupNormAct`` (issue 10).

Times forward and forward+backward of both layers on the same input, interleaved in a shuffled
order, and reports the median of each and their ratio (target on CPU at 16x256x28x28 fp32:
fwd+bwd <= 1.3x). On CUDA the timing uses CUDA events after a synchronize; on CPU
``time.perf_counter``, with glibc asked to keep freed memory (:func:`keep_freed_memory`;
``--malloc-default`` to leave it). Results are checked first: the preserve-initialized PN layer
must compute ``GroupNormAct``'s function.

Usage::

    python benchmarks/proxy_layer.py --device cpu --threads 2 --out benchmarks/results/proxy_layer_cpu.json
    python benchmarks/proxy_layer.py --device cuda --dtype bf16 --out $OUT/proxy_layer_cuda.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilmconvert.nn import ProxyGroupNormAct  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _timer(device: torch.device):
    """A callable that times ``fn()`` in seconds on ``device``."""
    if device.type == "cuda":

        def cuda_time(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return cpu_time


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    native = timm_group_norm_act(args.channels, args.groups).to(device)
    with torch.no_grad():
        native.weight.normal_(1.0, 0.5)
        native.bias.normal_(0.0, 0.5)
    proxy = ProxyGroupNormAct.from_norm(native).to(device)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    dy = torch.randn_like(x)
    if args.channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # correctness first: preserve init computes GroupNormAct's function
        relative = ((proxy(x) - native(x)).abs().max() / native(x).abs().max()).item()
    x, dy = x.to(dtype), dy.to(dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    timer = _timer(device)

    def fwd(layer):
        with torch.no_grad(), autocast:
            layer(x)

    def fwd_bwd(layer):
        xr = x.detach().requires_grad_(True)
        with autocast:
            y = layer(xr)
        y.backward(dy.to(y.dtype))

    rows = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        times = {"GroupNormAct": [], "ProxyGroupNormAct": []}
        order = random.Random(0)
        for i in range(args.warmup + args.repeats):
            pair = [("GroupNormAct", native), ("ProxyGroupNormAct", proxy)]
            order.shuffle(pair)  # neither layer always runs on the other's cache
            for label, layer in pair:
                t = timer(lambda: fn(layer))
                if i >= args.warmup:
                    times[label].append(t)
        medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows[name] = {
            **{f"{k}_ms": v for k, v in medians.items()},
            "ratio": medians["ProxyGroupNormAct"] / medians["GroupNormAct"],
        }
    return {
        "shape": [args.batch, args.channels, args.size, args.size],
        "groups": args.groups,
        "dtype": args.dtype,
        "layout": "channels_last" if args.channels_last else "contiguous",
        "preserve_relative_difference_fp32": relative,
        **rows,
        "malloc_keeps_freed_memory": args.keep_freed_memory,
        "environment": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }


def timm_group_norm_act(channels: int, groups: int) -> nn.Module:
    from timm.layers import GroupNormAct

    return GroupNormAct(channels, groups, act_layer=nn.ReLU)


def keep_freed_memory() -> bool:
    """Ask glibc (``mallopt``) to keep freed blocks instead of returning them to the kernel.

    Each layer allocates 12.8 MB outputs; by default glibc may hand such blocks back (``munmap`` or
    a trim) and fault them in again on the next call, which on a VM adds milliseconds of noise to
    either layer at random. Returns False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 1 << 30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument(
        "--malloc-default", action="store_true", help="leave glibc's malloc thresholds as they are (noisier)"
    )
    args = parser.parse_args()
    args.keep_freed_memory = False if args.malloc_default else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    for name in ("fwd", "fwd_bwd"):
        row = result[name]
        print(
            f"{name:8} GroupNormAct {row['GroupNormAct_ms']:.2f} ms   GN + PN {row['ProxyGroupNormAct_ms']:.2f} ms"
            f"   ratio {row['ratio']:.2f}"
        )
    print(f"preserve init: relative difference {result['preserve_relative_difference_fp32']:.2e} (fp32)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
