"""Where one ILM+GN layer's forward and backward spend their time at a small batch (issue 20).

Builds ``ILMGroupNorm`` (its default, the paper init) and ``nn.GroupNorm`` at one shape of the Figure-1 network
(``docs/study/figure1.yaml``; default stage 2: 2 x 64 x 4 x 4, 32 groups, K = 16), then

1. times forward + backward of each (autograd, ``x.requires_grad``), interleaved, median of
   ``--repeats`` calls, one torch thread;
2. runs the ILM layer under ``torch.profiler`` with each piece of the fast path
   (:mod:`ilmconvert.nn.fast_torch`) wrapped in a ``record_function`` label, and reports per piece
   how many top-level aten operations it issues and how many microseconds it takes (profiler
   time: the profiler's own cost inflates every operation by a few µs, so the wall-clock
   column of step 1 is the one to compare with GroupNorm).

Usage::

    python benchmarks/ilm_layer_profile.py --out benchmarks/results/ilm_layer_profile_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilmconvert.nn import ILMGroupNorm, fast_torch  # noqa: E402

#: label -> names in ilmconvert.nn.fast_torch wrapped with that label (those that exist)
PIECES = {
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


def timed(layers: dict[str, nn.Module], x, dy, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in layers}
    for _ in range(20):
        for layer in layers.values():
            fwd_bwd(layer, x, dy)
    for _ in range(repeats):
        for name, layer in layers.items():
            t0 = time.perf_counter()
            fwd_bwd(layer, x, dy)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def profile(layer: nn.Module, x, dy, calls: int) -> dict[str, dict[str, float]]:
    saved = {}
    for label, names in PIECES.items():
        for name in names:
            if hasattr(fast_torch, name):
                saved[name] = getattr(fast_torch, name)
                setattr(fast_torch, name, _wrap(label, saved[name]))
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
        for name, fn in saved.items():
            setattr(fast_torch, name, fn)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="2,64,4,4", help="B,C,H,W (default: Figure-1 stage 2 at batch 2)")
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--calls", type=int, default=50, help="profiled calls")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = tuple(int(s) for s in args.shape.split(","))
    c = shape[1]
    layers = {"GroupNorm": nn.GroupNorm(args.groups, c), "ILM+GN": ILMGroupNorm(args.groups, c)}
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    wall = timed(layers, x, dy, args.repeats)
    print(f"fwd+bwd median, {args.repeats} calls: " + ", ".join(f"{k} {v:.1f} us" for k, v in wall.items())
          + f"; ILM - GN = {wall['ILM+GN'] - wall['GroupNorm']:.1f} us", flush=True)
    pieces = profile(layers["ILM+GN"], x, dy, args.calls)
    print(f"\n| piece (ILM+GN, {args.shape}) | aten ops | op µs | wall µs (profiled) |\n|---|---:|---:|---:|")
    for k in sorted(pieces, key=lambda s: (not s.startswith("fwd"), s)):
        v = pieces[k]
        print(f"| {k} | {v['ops']:.0f} | {v['op_us']:.0f} | {v['wall_us']:.0f} |")
    tot = {f: sum(v[f] for v in pieces.values()) for f in ("ops", "op_us", "wall_us")}
    print(f"| total | {tot['ops']:.0f} | {tot['op_us']:.0f} | {tot['wall_us']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
                                        "shape": shape, "wall_us": wall, "pieces": pieces}, indent=1))


if __name__ == "__main__":
    main()
