"""Where one ILM+GN layer's forward and backward spend their time at a small batch (issue 20).

Builds ``ILMGroupNorm`` (its default, the paper init), ``nn.GroupNorm``, timm's ``GroupNormAct``
(ReLU) and ``ProxyGroupNormAct`` (ReLU) at one shape of the Figure-1 network
(``docs/study/figure1.yaml``; default stage 2: 2 x 64 x 4 x 4, 32 groups, K = 16), then

1. times forward + backward of each (autograd, ``x.requires_grad``), interleaved, median of
   ``--repeats`` calls, one torch thread: the ILM and PN layers with the compiled CPU kernel
   (:mod:`ilmconvert.nn.cpu_kernel`, the default where it builds) and with PyTorch operations only
   (``ILMCONVERT_CPU_KERNEL=0``), and the kernel's two C calls alone (through ``ctypes``, no
   autograd, no allocation);
2. runs the ILM layer under ``torch.profiler`` (``--path kernel``: the default path; ``torch``: the
   PyTorch fast path) with each piece (:mod:`ilmconvert.nn.fast_torch`, the kernel's autograd
   Function) wrapped in a ``record_function`` label, and reports per piece how many top-level aten
   operations it issues and how many microseconds it takes (profiler time: the profiler's own cost
   inflates every operation by a few µs, so the wall-clock column of step 1 is the one to compare
   with GroupNorm).

Usage::

    python benchmarks/ilm_layer_profile.py --out benchmarks/results/ilm_layer_profile_cpu.json

**On CUDA (issue 20 part d)**, ``--device cuda`` compares, for every GroupNorm shape of the Figure-1
network (:data:`FIGURE1_SHAPES`) at batch 1, 2 and 4, one ILM+GN layer's forward + backward on the
Triton path with the fused ``(B, C)`` kernels (:mod:`ilmconvert.nn.triton_small`: moments ->
``_small_forward`` -> apply, bwd_sums -> ``_small_backward`` -> bwd_apply) against the Triton path
with the PyTorch ``(B, C)`` code, the all-PyTorch fast path and ``nn.GroupNorm``: first each ILM
variant's output and gradients against the float64 CPU reference path (as
``benchmarks/gpu_correctness.py``; exit 1 when one is off), then the median wall-clock µs per
fwd+bwd (synchronized, interleaved), and the GPU activities (kernels, memsets) and top-level aten
operations per fwd+bwd from ``torch.profiler``::

    python benchmarks/ilm_layer_profile.py --device cuda --out $OUT/ilm_small_kernel_cuda.json

``--device cpu --fused-small`` runs the same comparison as a dry run under the Triton interpreter
(``TRITON_INTERPRET=1``; its times mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_correctness import relative, run, run_on_device  # noqa: E402
from ilmconvert.nn import ILMGroupNorm, ProxyGroupNormAct, cpu_kernel, fast_torch  # noqa: E402

#: label -> names in ilmconvert.nn.fast_torch wrapped with that label (those that exist)
PIECES = {
    "fwd: compiled kernel (allocations, ctypes call)": ["cpu_kernel.PooledILMCPU.forward"],
    "bwd: compiled kernel (allocations, ctypes call)": ["cpu_kernel.PooledILMCPU.backward"],
    "fwd: channel moments (pass over x)": ["channel_moments"],
    "fwd: key features + norm statistics (Chan)": ["_group_moments", "_key_and_norm_moments"],
    "fwd: encoder / decoder": ["_mlp_forward"],
    "fwd: alignment, upsample, a and d": ["pooled_coefficients"],
    "fwd: standardization + affine (pass over x)": ["_channel_affine_fwd"],
    "bwd: channel sums S0, S1 (pass over dy, x)": ["_channel_sums"],
    "bwd: small part (B, C) algebra": ["pooled_small_backward"],
    "bwd: encoder / decoder backward": ["_mlp_backward"],
    "bwd: dx pass and rest": ["pooled_backward"],
}


def _wrap(label: str, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapped


def fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    layer(x).backward(dy)


def timed(
    calls: dict[str, Callable[[], None]], repeats: int, warmup: int = 20, sync: Callable[[], None] | None = None
) -> dict[str, float]:
    """Median µs of each call, the calls interleaved (wall clock; ``sync`` before and after each
    call, e.g. ``torch.cuda.synchronize``)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(warmup):
        for call in calls.values():
            call()
    for _ in range(repeats):
        for name, call in calls.items():
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            call()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def _switched(layer: nn.Module, x, dy, kernel: bool) -> Callable[[], None]:
    def call():
        cpu_kernel.set_enabled(kernel)
        try:
            fwd_bwd(layer, x, dy)
        finally:
            cpu_kernel.set_enabled(None)

    return call


def _kernel_calls_alone(layer: ILMGroupNorm, x: torch.Tensor, dy: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The ILM kernel's forward and backward C functions on preallocated buffers (no autograd)."""
    lib = cpu_kernel.library()
    if lib is None or x.dtype != torch.float32:
        return {}
    b, c = x.shape[:2]
    params = [t.detach() for t in (layer.weight, layer.bias, layer.encoder.weight, layer.decoder_mu.weight,
                                   layer.decoder_gamma.weight)]
    grads = [torch.empty_like(t) for t in params]
    xd, y, dx = x.detach(), torch.empty_like(x), torch.empty_like(x)
    moments = torch.empty(b, 2, c, dtype=torch.float64)
    dims = (b, c, x.numel() // (b * c), layer.num_groups, layer.key_group_size, params[2].shape[0], layer.eps)
    ptrs = [t.data_ptr() for t in params]
    fwd = (xd.data_ptr(), y.data_ptr(), moments.data_ptr(), *ptrs, *dims)
    gptrs = [g.data_ptr() for g in grads]
    bwd = (xd.data_ptr(), dy.data_ptr(), moments.data_ptr(), dx.data_ptr(), *gptrs, *ptrs, *dims)
    buffers = (xd, y, dx, dy, moments, *params, *grads)  # the pointers above point into these: keep them alive

    def call():
        lib.ilm_pooled_forward_f32(*fwd)
        lib.ilm_pooled_backward_f32(*bwd)
        return buffers

    return {"ILM kernel: C forward + backward alone": call}


def _target(name: str):
    """``(owner, attribute)`` for a PIECES name: a function of fast_torch or ``cpu_kernel.Class.method``."""
    if name.startswith("cpu_kernel."):
        _, cls, attr = name.split(".")
        return getattr(cpu_kernel, cls), attr
    return fast_torch, name


def profile(layer: nn.Module, x, dy, calls: int) -> dict[str, dict[str, float]]:
    saved = {}
    for label, names in PIECES.items():
        for name in names:
            owner, attr = _target(name)
            if hasattr(owner, attr):
                saved[name] = (owner, attr, owner.__dict__[attr])
                fn = getattr(owner, attr)
                wrapped = _wrap(label, fn)
                setattr(owner, attr, staticmethod(wrapped) if isinstance(owner, type) else wrapped)
    try:
        for _ in range(5):
            fwd_bwd(layer, x, dy)
        with torch.profiler.profile() as prof:
            for _ in range(calls):
                with torch.profiler.record_function("fwd: autograd Function + dispatch (rest)"):
                    y = layer(x)
                with torch.profiler.record_function("bwd: autograd engine (rest)"):
                    y.backward(dy)
    finally:
        for owner, attr, fn in saved.values():
            setattr(owner, attr, fn)
    events = prof.events()
    labels = set(PIECES) | {"fwd: autograd Function + dispatch (rest)", "bwd: autograd engine (rest)"}
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"ops": 0, "op_us": 0.0, "wall_us": 0.0})

    def label_of(e):
        p = e.cpu_parent
        while p is not None and p.name not in labels:
            p = p.cpu_parent
        return p

    for e in events:
        if e.name in labels:
            inner = sum(c.cpu_time_total for c in _child_labels(e, labels))
            out[e.name]["wall_us"] += (e.cpu_time_total - inner) / calls
        elif e.name.startswith("aten::") and (e.cpu_parent is None or e.cpu_parent.name in labels):
            lab = label_of(e)
            key = lab.name if lab is not None else "outside"
            out[key]["ops"] += 1 / calls
            out[key]["op_us"] += e.cpu_time_total / calls
    return dict(out)


def _child_labels(e, labels):
    """The nearest labelled descendants of event ``e``."""
    found = []
    for c in e.cpu_children:
        if c.name in labels:
            found.append(c)
        else:
            found.extend(_child_labels(c, labels))
    return found


# ====================================================================== CUDA: the fused (B, C) kernels
#: (C, H, W) of the 13 GroupNorms of the Figure-1 network (docs/study/figure1.yaml, 32 px input), 32 groups each
FIGURE1_SHAPES = ((64, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2), (256, 1, 1))
#: variant -> ``layer.fast`` as benchmarks/gpu_correctness.py names it ("triton": with the fused (B, C)
#: kernels, "triton-unfused": with the PyTorch (B, C) code); None: nn.GroupNorm
SMALL_VARIANTS = {
    "GroupNorm": None,
    "ILM torch": "torch",
    "ILM triton + torch (B,C)": "triton-unfused",
    "ILM triton + fused (B,C)": "triton",
}


def _variant_call(layer: nn.Module, fast: str, x, dy) -> Callable[[], None]:
    from ilmconvert.nn import triton_small  # needs Triton: imported only for this comparison

    layer.fast = "triton" if fast.startswith("triton") else fast

    def call():
        enabled, triton_small.ENABLED = triton_small.ENABLED, fast == "triton"
        try:
            fwd_bwd(layer, x, dy)
        finally:
            triton_small.ENABLED = enabled

    return call


def _checked(layer: ILMGroupNorm, fast: str, x: torch.Tensor, dy: torch.Tensor) -> dict[str, float]:
    """Output and gradients of ``layer`` on the device against the float64 CPU reference path, per
    tensor: ``{name: error / bound}`` with bound 1e-5 + the float32 CPU reference path's own error."""
    names = ["output", "x"] + [n for n, _ in layer.named_parameters()]
    exact_layer = copy.deepcopy(layer).cpu().double()
    exact_layer.fast = False
    exact = run(exact_layer, x.detach().cpu().double(), dy.cpu().double())
    rounded_layer = copy.deepcopy(layer).cpu()
    rounded_layer.fast = False
    rounded = run(rounded_layer, x.detach().cpu(), dy.cpu())
    got = run_on_device(copy.deepcopy(layer), x, dy, fast)
    floor = 1e-6 * max(b.abs().max().item() for b in exact)
    return {n: relative(a, b, floor) / (1e-5 + relative(r, b, floor)) for n, a, r, b in zip(names, got, rounded, exact)}


def _gpu_activities(call: Callable[[], None], cuda: bool) -> dict[str, int]:
    """GPU activities (kernels, memsets, copies) and top-level aten operations of one ``call()``."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    call()
    with torch.profiler.profile(activities=activities) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    gpu = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    aten = sum(1 for e in events if e.name.startswith("aten::") and (e.cpu_parent is None
                                                                     or not e.cpu_parent.name.startswith("aten::")))
    return {"gpu_activities": gpu, "aten_ops": aten}


def small_kernel_table(args) -> dict:
    """The issue-20-d comparison (see the module doc) on ``args.device``; exit 1 when a check fails."""
    from ilmconvert.nn import triton_ilm

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    rows, failed = [], []
    for b in (int(v) for v in args.batch_sizes.split(",")):
        for c, h, w in FIGURE1_SHAPES:
            torch.manual_seed(0)
            layer = ILMGroupNorm(args.groups, c)
            with torch.no_grad():  # random parameters: every term of eqs. 2-6 matters
                for name, prm in layer.named_parameters():
                    prm.copy_((1.0 if name == "weight" else 0.0) + 0.5 * torch.randn(prm.shape))
            layer = layer.to(device)
            x = torch.randn(b, c, h, w, device=device, requires_grad=True)
            dy = torch.randn(b, c, h, w, device=device)
            calls, errors = {}, {}
            for name, fast in SMALL_VARIANTS.items():
                if fast is None:
                    calls[name] = functools.partial(fwd_bwd, nn.GroupNorm(args.groups, c).to(device), x, dy)
                    continue
                if fast.startswith("triton"):
                    errors[name] = _checked(layer, fast, x, dy)
                calls[name] = _variant_call(copy.deepcopy(layer), fast, x, dy)
            if triton_ilm.FAILURE is not None:
                raise SystemExit(f"error: the Triton path gave up ({triton_ilm.FAILURE}); nothing to compare")
            wall = timed(calls, args.repeats, warmup=args.warmup, sync=sync)
            counts = {name: _gpu_activities(call, cuda) for name, call in calls.items()}
            worst = {name: max(e.values()) for name, e in errors.items()}
            row = {"batch": b, "shape": [c, h, w], "wall_us": wall, "counts": counts, "error_over_bound": worst,
                   "errors": errors}
            rows.append(row)
            failed += [f"{b}x{c}x{h}x{w} {name}" for name, e in worst.items() if not e <= 1.0]
            fused, unfused = wall["ILM triton + fused (B,C)"], wall["ILM triton + torch (B,C)"]
            print(f"| {b} | {c}x{h}x{w} | " + " | ".join(f"{wall[n]:.0f}" for n in SMALL_VARIANTS)
                  + f" | {fused / unfused:.2f} | " + " / ".join(str(counts[n]["gpu_activities"] if cuda else
                                                                 counts[n]["aten_ops"]) for n in SMALL_VARIANTS)
                  + f" | {max(worst.values()):.2f} |", flush=True)
    return {"rows": rows, "failed": failed}


def small_kernel_main(args) -> None:
    import triton
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("error: on the CPU the comparison runs only under the Triton interpreter: "
                         "TRITON_INTERPRET=1 python benchmarks/ilm_layer_profile.py --device cpu --fused-small")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (--device cpu --fused-small for a dry run under TRITON_INTERPRET=1)")
    what = "GPU activities" if args.device.startswith("cuda") else "aten ops"
    print(f"one ILM+GN layer ({args.groups} groups), fwd+bwd, median µs of {args.repeats} interleaved calls; "
          f"{what} per fwd+bwd; error: worst (error / bound) against the float64 CPU reference\n"
          "| batch | C x H x W | " + " | ".join(SMALL_VARIANTS) + " | fused / torch (B,C) | "
          + f"{what} ({' / '.join(SMALL_VARIANTS)}) | error |\n|---|---|" + "---:|" * (len(SMALL_VARIANTS) + 3))
    result = small_kernel_table(args)
    if args.out:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (Triton interpreter)"
        meta = {"command": "python " + " ".join(sys.argv), "device": device, "torch": torch.__version__,
                "triton": triton.__version__}
        args.out.write_text(json.dumps({**meta, **result}, indent=1))
    if result["failed"]:
        print("FAILED (error above bound): " + ", ".join(result["failed"]))
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="2,64,4,4", help="B,C,H,W (default: Figure-1 stage 2 at batch 2)")
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--calls", type=int, default=50, help="profiled calls")
    p.add_argument("--path", choices=("kernel", "torch"), default="kernel",
                   help="profile the compiled-kernel path (default where it builds) or the PyTorch fast path")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cpu", help="cuda: the fused (B, C) kernels against the PyTorch (B, C) code")
    p.add_argument("--fused-small", action="store_true",
                   help="on the CPU: that comparison as a dry run under TRITON_INTERPRET=1")
    p.add_argument("--batch-sizes", default="1,2,4", help="for the fused (B, C) comparison")
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.device != "cpu" or args.fused_small:
        small_kernel_main(args)
        return
    torch.manual_seed(0)
    shape = tuple(int(s) for s in args.shape.split(","))
    c = shape[1]
    import timm.layers

    gn, ilm = nn.GroupNorm(args.groups, c), ILMGroupNorm(args.groups, c)
    gn_act = timm.layers.GroupNormAct(c, args.groups, act_layer=nn.ReLU)
    pn = ProxyGroupNormAct(args.groups, c, act_layer=nn.ReLU)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    calls = {
        "GroupNorm": lambda: fwd_bwd(gn, x, dy),
        "ILM+GN (kernel)": _switched(ilm, x, dy, True),
        "ILM+GN (PyTorch ops)": _switched(ilm, x, dy, False),
        "GN+ReLU (timm GroupNormAct)": lambda: fwd_bwd(gn_act, x, dy),
        "GN+PN ReLU (kernel)": _switched(pn, x, dy, True),
        "GN+PN ReLU (PyTorch ops)": _switched(pn, x, dy, False),
        **_kernel_calls_alone(ilm, x, dy),
    }
    wall = timed(calls, args.repeats)
    print(f"fwd+bwd median, {args.repeats} calls (kernel: {cpu_kernel.library() is not None}):")
    for k, v in wall.items():
        print(f"  {k:40s} {v:8.1f} us")
    print(f"ILM (kernel) - GN = {wall['ILM+GN (kernel)'] - wall['GroupNorm']:.1f} us, "
          f"PN (kernel) - GN+ReLU = {wall['GN+PN ReLU (kernel)'] - wall['GN+ReLU (timm GroupNormAct)']:.1f} us",
          flush=True)
    cpu_kernel.set_enabled(args.path == "kernel")
    try:
        pieces = profile(ilm, x, dy, args.calls)
    finally:
        cpu_kernel.set_enabled(None)
    print(f"\n| piece (ILM+GN, {args.shape}, {args.path} path) | aten ops | op µs | wall µs (profiled) |\n"
          "|---|---:|---:|---:|")
    for k in sorted(pieces, key=lambda s: (not s.startswith("fwd"), s)):
        v = pieces[k]
        print(f"| {k} | {v['ops']:.0f} | {v['op_us']:.0f} | {v['wall_us']:.0f} |")
    tot = {f: sum(v[f] for v in pieces.values()) for f in ("ops", "op_us", "wall_us")}
    print(f"| total | {tot['ops']:.0f} | {tot['op_us']:.0f} | {tot['wall_us']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
                                        "shape": shape, "path": args.path, "kernel": cpu_kernel.library() is not None,
                                        "wall_us": wall, "pieces": pieces}, indent=1))


if __name__ == "__main__":
    main()
