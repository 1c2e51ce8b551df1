"""Layer speed of ILM Norm against the norm it replaces (issue 4), in one run.

For every shape, dtype and layout, times the forward and the forward+backward of:

- ``native``:     ``nn.GroupNorm(32, C)`` (ResNet shapes) or ``nn.LayerNorm(C)`` (ViT tokens);
- ``published``:  the published ILM code's op sequence (benchmarks/published_ilm.py);
- ``reference``:  our reference path (``layer.fast = False``);
- ``fast``:       our fast path in eager PyTorch (``layer.fast = "torch"``);
- ``compiled``:   ``torch.compile`` of our layer (fast path, inductor fuses each pass);
- ``triton``:     our Triton kernels (CUDA only, pooled layers; ``layer.fast = "triton"``).

With ``--proxy``, also GN + PN-Act (``ProxyGroupNormAct``) against timm's ``GroupNormAct`` at the
same GN shapes, dtypes and layouts (issue 10; the measurement is benchmarks/proxy_layer.py's).

Reports the median time, the achieved GB/s of the forward for the bytes it must move (read x
once, write y once) against the measured device-copy bandwidth, and every time as a ratio to
the native norm measured in the same run. ILM layers use the ``paper`` init with random W2/W3
(so every term is live) and the ``preserve`` init's parameter shapes.

Usage::

    # GPU (the issue's tables): ResNet-50 shapes at batch 64 + ViT-B tokens, fp32 and bf16
    python benchmarks/layers.py --device cuda --out $OUT/layers.json
    # CPU target: 16 x 256 x 28^2, fp32, 2 threads
    python benchmarks/layers.py --device cpu --out benchmarks/results/layers_cpu.json
    # GN + PN-Act only, CPU
    python benchmarks/layers.py --device cpu --variants '' --tokens '' --layouts channels_first --proxy
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy_layer  # noqa: E402
from published_ilm import PublishedILM  # noqa: E402

from ilmconvert.nn import ILMGroupNorm, ILMLayerNorm  # noqa: E402

RESNET50 = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # (C, H = W) of the GN layers per stage
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


STAT = {"fn": statistics.median}


def time_fn(fn: Callable[[], object], device: torch.device, *, repeats: int, min_time: float) -> float:
    """Seconds of ``fn()`` after warm-up (median, or minimum with ``--stat min``); CUDA events on
    GPU, perf_counter on CPU."""
    for _ in range(3):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all < min_time and len(times) < 10 * repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return STAT["fn"](times)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Measured device-copy bandwidth in GB/s: (read + write) bytes / time of ``dst.copy_(src)``."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, repeats=repeats, min_time=0.2)
    return 2 * n * 4 / t / 1e9


# ---------------------------------------------------------------------------- variants
def _ilm_layer(kind: str, c: int, device, dtype) -> nn.Module:
    if kind == "gn":
        layer = ILMGroupNorm(32, c, device=device, dtype=dtype)
    else:
        layer = ILMLayerNorm(c, device=device, dtype=dtype)
    layer.reset_parameters()  # paper init: W1..W3 random, every term of eqs. 4-6 live
    return layer


def build_variants(kind: str, c: int, device, dtype, names: list[str]) -> dict[str, nn.Module]:
    """The modules to time; ``triton`` only where it applies (CUDA, pooled)."""
    out: dict[str, nn.Module] = {}
    for name in names:
        if name == "native":
            mod = nn.GroupNorm(32, c) if kind == "gn" else nn.LayerNorm(c)
            out[name] = mod.to(device=device, dtype=dtype)
        elif name == "published":
            out[name] = PublishedILM(_ilm_layer(kind, c, device, dtype))
        elif name == "reference":
            layer = _ilm_layer(kind, c, device, dtype)
            layer.fast = False
            out[name] = layer
        elif name == "fast":
            layer = _ilm_layer(kind, c, device, dtype)
            layer.fast = "torch"
            out[name] = layer
        elif name == "compiled":
            layer = _ilm_layer(kind, c, device, dtype)
            layer.fast = "torch"
            out[name] = torch.compile(layer, dynamic=False)
        elif name == "triton":
            if device.type != "cuda" or kind != "gn":
                continue
            layer = _ilm_layer(kind, c, device, dtype)
            layer.fast = "triton"
            out[name] = layer
        else:
            raise SystemExit(f"unknown variant {name!r}")
    return out


def check_against_float64(mod: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Max relative error (output, dx, every parameter gradient) of ``mod`` on the first two
    instances, against the reference path of the same layer in float64. NaN -> inf."""
    import copy

    layer = getattr(mod, "_orig_mod", mod)
    oracle = copy.deepcopy(layer).double()
    oracle.fast = False
    xs, dys = x[:2].detach(), dy[:2]
    outs = []
    for m, inp, g in ((mod, xs.clone(), dys), (oracle, xs.double(), dys.double())):
        for p in m.parameters():
            p.grad = None
        inp = inp.requires_grad_(True)
        y = m(inp)
        y.backward(g.to(y.dtype))
        outs.append([y.detach(), inp.grad] + [p.grad for p in (layer if m is mod else oracle).parameters()])
    worst = 0.0
    for a, b in zip(*outs):
        if a is None or b is None:
            continue
        a = a.double()
        if not torch.isfinite(a).all():
            return float("inf")
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    for p in layer.parameters():
        p.grad = None
    return worst


CHECKED = ("fast", "compiled", "triton", "reference")  # variants checked against float64 and published


def _time_fwd_and_bwd(
    mod: nn.Module, x: torch.Tensor, xg: torch.Tensor, dy: torch.Tensor, device, args
) -> tuple[float, float]:
    """Seconds of the forward of ``mod`` on ``x`` (no grad) and of its forward + backward on ``xg``
    (a copy of ``x`` that requires grad) with output gradient ``dy``."""

    def fwd():
        with torch.no_grad():
            return mod(x)

    def fwd_bwd():
        for p in mod.parameters():
            p.grad = None
        xg.grad = None
        y = mod(xg)
        y.backward(dy)

    t_f = time_fn(fwd, device, repeats=args.repeats, min_time=args.min_time)
    t_fb = time_fn(fwd_bwd, device, repeats=args.repeats, min_time=args.min_time)
    return t_f, t_fb


def _print_row(name: str, row: dict) -> None:
    """One progress line for a timed variant (``row`` as ``bench_case`` builds it)."""
    err = row.get("max_rel_err_vs_float64")
    native = ""
    if "fwd_vs_native" in row:
        native = f"  x native: {row['fwd_vs_native']:.2f} / {row['fwd_bwd_vs_native']:.2f}"
    print(
        f"  {name:10s} fwd {row['fwd_ms']:8.3f} ms ({row['fwd_GBs']:7.1f} GB/s, {row['fwd_frac_copy_bw']:5.1%} of copy)"
        f"  fwd+bwd {row['fwd_bwd_ms']:8.3f} ms"
        + (f"  err {err:.1e}" if err is not None else "")
        + native,
        flush=True,
    )


def _add_speedup_vs_published(rows: list[dict]) -> None:
    """Forward + backward speed-up of our variants over the published code measured in the same case."""
    by = {r["variant"]: r for r in rows if "error" not in r}
    if "published" in by:
        for r in rows:
            if "error" not in r and r["variant"] in CHECKED:
                r["fwd_bwd_speedup_vs_published"] = by["published"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]


def bench_case(case: dict, args, device, copy_gbs: float) -> list[dict]:
    kind, dtype = case["kind"], DTYPES[case["dtype"]]
    shape = case["shape"]
    c = shape[1] if kind == "gn" else shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype)
    if case["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    rows = []
    nbytes = 2 * x.numel() * x.element_size()  # read x once, write y once
    variants = build_variants(kind, c, device, dtype, args.variants)
    native_t: dict[str, float] = {}
    for name, mod in variants.items():
        xg = x.detach().clone().requires_grad_(True)
        try:
            t_f, t_fb = _time_fwd_and_bwd(mod, x, xg, dy, device, args)
        except Exception as err:  # noqa: BLE001 - report, keep going
            rows.append({**case, "variant": name, "error": f"{type(err).__name__}: {err}"})
            print(f"  {name:10s} FAILED: {type(err).__name__}: {err}", flush=True)
            continue
        if name == "native":
            native_t = {"fwd": t_f, "fwd_bwd": t_fb}
        err = check_against_float64(mod, x, dy) if name in CHECKED else None
        gbs = nbytes / t_f / 1e9
        row = {
            **case,
            "variant": name,
            "fwd_ms": t_f * 1e3,
            "fwd_bwd_ms": t_fb * 1e3,
            "fwd_GBs": gbs,
            "fwd_frac_copy_bw": gbs / copy_gbs,
        }
        if err is not None:
            row["max_rel_err_vs_float64"] = err
        if native_t:
            row["fwd_vs_native"] = t_f / native_t["fwd"]
            row["fwd_bwd_vs_native"] = t_fb / native_t["fwd_bwd"]
        rows.append(row)
        _print_row(name, row)
    _add_speedup_vs_published(rows)
    return rows


def cases(args) -> list[dict]:
    out = []
    for dt in args.dtypes:
        for c, hw in args.shapes:
            for layout in args.layouts:
                out.append({"kind": "gn", "shape": [args.batch, c, hw, hw], "dtype": dt, "layout": layout})
        for b, t, c in args.tokens:
            out.append({"kind": "ln", "shape": [b, t, c], "dtype": dt, "layout": "tokens"})
    return out


def _shape_list(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]  # type: ignore[misc]


def _token_list(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]  # type: ignore[misc]


def summary_table(rows: list[dict]) -> str:
    """Markdown table: one line per (case, variant)."""
    head = (
        "| norm | shape | dtype | layout | variant | fwd ms | fwd+bwd ms | fwd GB/s | % copy BW "
        "| fwd x native | fwd+bwd x native | fwd+bwd speed-up vs published | max rel err vs fp64 |\n"
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        if "error" in r:
            lines.append(
                f"| {r['kind']} | {shape} | {r['dtype']} | {r['layout']} | {r['variant']} "
                f"| error: {r['error'][:60]} |||||||"
            )
            continue
        lines.append(
            f"| {r['kind']} | {shape} | {r['dtype']} | {r['layout']} | {r['variant']} | {r['fwd_ms']:.3f} "
            f"| {r['fwd_bwd_ms']:.3f} | {r['fwd_GBs']:.1f} | {100 * r['fwd_frac_copy_bw']:.0f} % "
            f"| {r.get('fwd_vs_native', float('nan')):.2f} | {r.get('fwd_bwd_vs_native', float('nan')):.2f} "
            f"| {r.get('fwd_bwd_speedup_vs_published', float('nan')):.2f} "
            f"| {r['max_rel_err_vs_float64']:.1e} |" if "max_rel_err_vs_float64" in r else
            f"| {r['kind']} | {shape} | {r['dtype']} | {r['layout']} | {r['variant']} | {r['fwd_ms']:.3f} "
            f"| {r['fwd_bwd_ms']:.3f} | {r['fwd_GBs']:.1f} | {100 * r['fwd_frac_copy_bw']:.0f} % "
            f"| {r.get('fwd_vs_native', float('nan')):.2f} | {r.get('fwd_bwd_vs_native', float('nan')):.2f} "
            f"| {r.get('fwd_bwd_speedup_vs_published', float('nan')):.2f} | - |"
        )
    return head + "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict:
    import timm

    env = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    else:
        env["device"] = f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    return env


def proxy_rows_of(args) -> list[dict]:
    """GN + PN-Act against ``GroupNormAct`` (ReLU, 32 groups) at every GN shape, dtype and layout."""
    rows = []
    for (c, hw), dtype, layout in itertools.product(args.shapes, args.dtypes, args.layouts):
        settings = argparse.Namespace(
            device=args.device, dtype=dtype, batch=args.batch, channels=c, groups=32, size=hw,
            channels_last=layout == "channels_last", warmup=max(5, args.repeats // 5), repeats=args.repeats,
        )
        row = proxy_layer.measure(settings)
        print(f"GN + PN-Act {args.batch}x{c}x{hw}x{hw} {dtype} {layout}: fwd ratio {row['fwd']['ratio']:.2f}, "
              f"fwd+bwd ratio {row['fwd_bwd']['ratio']:.2f}", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="64 on CUDA, 16 on CPU")
    p.add_argument("--shapes", type=_shape_list, default=None,
                   help="CxHW list, e.g. 256x56,512x28 (CUDA default: the ResNet-50 stages; CPU: 256x28)")
    p.add_argument("--tokens", type=_token_list, default=None,
                   help="BxTxC list (CUDA default 64x197x768; CPU default 16x197x384; '' for none)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (CUDA: fp32,bf16; CPU: fp32)")
    p.add_argument("--layouts", default="channels_first,channels_last")
    p.add_argument("--variants", default="native,published,reference,fast,compiled,triton")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (CUDA 50, CPU 15)")
    p.add_argument("--min-time", type=float, default=None, help="seconds to keep timing (CUDA 0.5, CPU 2)")
    p.add_argument("--stat", choices=("median", "min"), default=None,
                   help="statistic over the timed calls (CUDA: median; CPU: min, robust to preemption "
                        "on a shared machine)")
    p.add_argument("--proxy", action="store_true",
                   help="also GN + PN-Act against timm's GroupNormAct at the GN shapes (benchmarks/proxy_layer.py)")
    p.add_argument("--out", type=Path, default=None, help="JSON with environment and rows")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (64 if cuda else 16)
    args.shapes = args.shapes if args.shapes is not None else (RESNET50 if cuda else [(256, 28)])
    if args.tokens is None:
        args.tokens = [(64, 197, 768)] if cuda else [(16, 197, 384)]
    args.dtypes = (args.dtypes or ("fp32,bf16" if cuda else "fp32")).split(",")
    args.layouts = args.layouts.split(",")
    args.variants = [v for v in args.variants.split(",") if v]
    args.repeats = args.repeats or (50 if cuda else 15)
    args.min_time = args.min_time if args.min_time is not None else (0.5 if cuda else 2.0)

    args.stat = args.stat or ("median" if cuda else "min")
    STAT["fn"] = min if args.stat == "min" else statistics.median
    env = environment(device)
    env["stat"] = args.stat
    biggest = max(
        [args.batch * c * hw * hw for c, hw in args.shapes] + [b * t * c for b, t, c in args.tokens] + [1]
    )
    copy_gbs = copy_bandwidth(device, max(4 * biggest, 64 << 20), repeats=args.repeats)
    env["copy_GBs"] = copy_gbs
    print(f"# {env}", flush=True)
    print(f"# device copy bandwidth: {copy_gbs:.1f} GB/s", flush=True)
    rows: list[dict] = []
    for case in cases(args):
        print(f"{case['kind']} {'x'.join(map(str, case['shape']))} {case['dtype']} {case['layout']}", flush=True)
        rows.extend(bench_case(case, args, device, copy_gbs))
    proxy_rows = proxy_rows_of(args) if args.proxy else []
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    table = summary_table(rows)
    print()
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"command": command, "environment": env, "rows": rows, "proxy_rows": proxy_rows}
        args.out.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(
            f"Command: `{command}`\n\nEnvironment: {json.dumps(env)}\n\n{table}"
        )


if __name__ == "__main__":
    main()
