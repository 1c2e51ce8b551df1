"""Every fast-path variant on the GPU against the float64 CPU reference path (issue 14, step 1).

For each layer (ILM on GroupNorm / InstanceNorm / LayerNorm tokens, Proxy Norm GN + PN-Act,
ILM + PN), input case (odd sizes, batch 1, a large mean), dtype (fp32, bf16, fp16), layout
(contiguous, channels_last for pooled layers) and implementation (``layer.fast`` = ``"torch"`` /
``"triton"`` for ILM, the latter twice: ``triton`` with the fused ``(B, C)`` kernels of
``ilmconvert/nn/triton_small.py`` where they apply, ``triton-unfused`` with the PyTorch ``(B, C)``
code between the Triton passes; a Triton row fails if the Triton path gave up and PyTorch computed
it; Proxy Norm has one eager path), runs forward and backward on the device and
compares the output and every gradient (input and parameters) with the reference path of a
float64 copy on the CPU, fed the same dtype-rounded input: ``max |a - b| / max |b|`` (a tensor
whose exact values all lie below a millionth of the largest compared value is judged at that
scale). In low precision the reference computation itself rounds (a standardization's backward
cancels), so a variant passes when its error is at most the dtype's bound (fp32 1e-5, fp16 5e-3,
bf16 3e-2) plus the error of the same layer's reference path run in the same dtype on the CPU
(the triangle inequality, as in tests/helpers.py). Nothing else in the GPU suite counts until
every row passes; exit code 1 otherwise.

Usage::

    python benchmarks/gpu_correctness.py --out $OUT/correctness.json
    python benchmarks/gpu_correctness.py --device cpu                                   # dry run, no Triton rows
    TRITON_INTERPRET=1 python benchmarks/gpu_correctness.py --device cpu --dtypes fp32  # with them, interpreted
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilmconvert.nn import (  # noqa: E402
    ILMGroupNorm,
    ILMInstanceNorm,
    ILMLayerNorm,
    ILMNorm,
    ILMProxyGroupNormAct,
    ProxyGroupNormAct,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BOUNDS = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 3e-2}

#: (name, layer factory, input shape, input offset, pooled)
CASES = [
    ("ilm_gn", lambda: ILMGroupNorm(32, 256), (4, 256, 14, 14), 0.0, True),
    ("ilm_gn_odd_b1", lambda: ILMGroupNorm(8, 72, key_group_size=16), (1, 72, 5, 7), 0.0, True),
    ("ilm_gn_large_mean", lambda: ILMGroupNorm(32, 128), (2, 128, 9, 9), 100.0, True),
    ("ilm_in", lambda: ILMInstanceNorm(64, key_group_size=8), (3, 64, 7, 5), 0.0, True),
    ("ilm_ln_tokens", lambda: ILMLayerNorm(384), (2, 197, 384), 0.0, False),
    ("pn_gn_relu", lambda: ProxyGroupNormAct(32, 256, act_layer=nn.ReLU, output_affine=True), (4, 256, 14, 14),
     0.0, True),
    ("pn_gn_gelu", lambda: ProxyGroupNormAct(8, 64, act_layer=nn.GELU, output_affine=True), (1, 64, 5, 7), 0.0, True),
    ("ilm_pn_gn_silu", lambda: ILMProxyGroupNormAct(8, 64, act_layer=nn.SiLU, output_affine=True), (2, 64, 6, 6),
     0.0, True),
]


def randomized(make, seed: int) -> nn.Module:
    """The layer with every parameter random (so that no term is ``1 * x + 0``)."""
    layer = make()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_((1.0 if name in ("weight", "output_weight") else 0.0) + 0.5 * torch.randn(p.shape, generator=g))
    return layer


def run(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients (in ``named_parameters`` order)."""
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy.to(y.dtype))
    return [y.detach(), x.grad] + [p.grad for _, p in layer.named_parameters()]


def relative(a: torch.Tensor, b: torch.Tensor, floor: float) -> float:
    """``max |a - b| / max(max |b|, floor)``: relative, except for a tensor whose exact values are
    all tiny (a gradient through a saturated tanh), which is judged at the scale ``floor``."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def run_on_device(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, fast: str | None) -> list[torch.Tensor]:
    """:func:`run` with ``layer.fast = fast``; ``"triton-unfused"``: Triton with the PyTorch ``(B, C)`` code.

    Raises:
        RuntimeError: a Triton variant on which the Triton path gave up (PyTorch computed it).
    """
    if fast is None:
        return run(layer, x, dy)
    layer.fast = "triton" if fast.startswith("triton") else fast
    if layer.fast != "triton":
        return run(layer, x, dy)
    from ilmconvert.nn import triton_ilm, triton_small

    enabled, triton_small.ENABLED = triton_small.ENABLED, fast == "triton"
    try:
        out = run(layer, x, dy)
    finally:
        triton_small.ENABLED = enabled
    if triton_ilm.FAILURE is not None:
        raise RuntimeError(f"the Triton path gave up: {triton_ilm.FAILURE}")
    return out


def check(name, make, shape, offset, pooled, dtype, layout, fast, device) -> dict:
    torch.manual_seed(0)
    layer = randomized(make, seed=1)
    # rounded to the dtype first: the reference sees exactly the values the GPU sees
    x = (torch.randn(shape) * 1.5 + offset).to(DTYPES[dtype])
    dy = torch.randn(shape).to(DTYPES[dtype])
    reference = copy.deepcopy(layer).double()
    if isinstance(reference, ILMNorm):
        reference.fast = False
    expected = run(reference, x.double(), dy.double())
    gpu = copy.deepcopy(layer).to(device=device, dtype=DTYPES[dtype])
    xg = x.to(device=device, dtype=DTYPES[dtype])
    if layout == "channels_last":
        xg = xg.contiguous(memory_format=torch.channels_last)
    got = run_on_device(gpu, xg, dy.to(device), fast)
    same_dtype = copy.deepcopy(layer).to(DTYPES[dtype])  # the reference path in the dtype, on the CPU
    if isinstance(same_dtype, ILMNorm):
        same_dtype.fast = False
    rounded = run(same_dtype, x, dy)
    names = ["output", "x"] + [n for n, _ in layer.named_parameters()]
    floor = 1e-6 * max(b.abs().max().item() for b in expected if b is not None)
    errors, slack = {}, {}
    for n, a, r, b in zip(names, got, rounded, expected):
        if a is not None and b is not None:
            errors[n] = relative(a, b, floor)
            slack[n] = BOUNDS[dtype] + (relative(r, b, floor) if dtype != "fp32" or isinstance(layer, ILMNorm) else 0.0)
    worst = max(errors, key=lambda n: errors[n] / slack[n])
    row = {"case": name, "dtype": dtype, "layout": layout, "fast": fast, "worst": worst, "error": errors[worst],
           "bound": slack[worst]}
    row["ok"] = bool(all(errors[n] <= slack[n] for n in errors) and len(errors) == len(names))
    row["errors"] = errors
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument(
        "--device", default="cuda", help="cuda; cpu only to try the script (Triton rows only under TRITON_INTERPRET=1)"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; this script checks the GPU paths (--device cpu to try it)")
    cuda = args.device.startswith("cuda")
    triton_rows = cuda or os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter: a CPU dry run of them
    rows = []
    for name, make, shape, offset, pooled in CASES:
        ilm = type(make()) in (ILMGroupNorm, ILMInstanceNorm, ILMLayerNorm)  # the fast-path layers
        for dtype in args.dtypes.split(","):
            for layout in ("contiguous", "channels_last") if pooled else ("contiguous",):
                ilm_fast = ("torch", "triton", "triton-unfused") if pooled and triton_rows else ("torch",)
                for fast in ilm_fast if ilm else (None,):
                    try:
                        row = check(name, make, shape, offset, pooled, dtype, layout, fast, args.device)
                    except Exception as err:  # noqa: BLE001 - a failed variant is a row, not the end
                        row = {"case": name, "dtype": dtype, "layout": layout, "fast": fast, "ok": False,
                               "exception": f"{type(err).__name__}: {err}"}
                    rows.append(row)
                    status = "ok  " if row["ok"] else "FAIL"
                    detail = row.get("exception") or f"{row['worst']} {row['error']:.2e} (bound {row['bound']:.2e})"
                    print(f"{status} {name:18s} {dtype:5s} {layout:14s} {fast!s:14s} {detail}", flush=True)
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)} / {len(rows)} variants within bounds")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if cuda else "cpu"
        result = {"device": device, "torch": torch.__version__, "bounds": BOUNDS, "rows": rows}
        args.out.write_text(json.dumps(result, indent=1))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
