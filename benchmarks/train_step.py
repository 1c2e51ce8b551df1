"""Full training-step time before and after ILM conversion (issue 4).

One step = forward, cross-entropy, backward, SGD step (momentum 0.9), on random data, channels_last,
bf16 autocast on CUDA, with and without ``torch.compile``. Models: ResNet-50-GN (timm
``resnet50_gn``), ConvNeXt-T (``convnext_tiny``) and ViT-S (``vit_small_patch16_224``); random
weights (no hub access needed). The converted model is ``ilmconvert.convert(model)`` with the
default ``preserve`` init. Reports the median step time and the converted / original ratio,
measured in the same run.

Usage::

    python benchmarks/train_step.py --device cuda --out $OUT/train_step.json           # batch 64 at 224^2
    python benchmarks/train_step.py --device cpu --out benchmarks/results/train_step_cpu.json  # small
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilmconvert.convert import convert  # noqa: E402

MODELS = {"resnet50_gn": "ResNet-50-GN", "convnext_tiny": "ConvNeXt-T", "vit_small_patch16_224": "ViT-S"}


def step_time(model: nn.Module, args, device: torch.device, compiled: bool) -> float:
    """Median seconds of one training step of ``model`` (a fresh copy is trained)."""
    model = model.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fwd = torch.compile(model) if compiled else model
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    use_amp = device.type == "cuda" or args.cpu_autocast

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = nn.functional.cross_entropy(fwd(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    import timm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", type=int, default=None, help="64 on CUDA, 4 on CPU")
    p.add_argument("--size", type=int, default=None, help="224 on CUDA, 96 on CPU (ViT: 224 always)")
    p.add_argument("--compile", default=None, help="'eager,compiled' (CUDA default) or 'eager' (CPU default)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (CUDA 30, CPU 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (CUDA 10, CPU 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpu-autocast", action="store_true", help="bf16 autocast on CPU as well")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (64 if cuda else 4)
    base_size = args.size or (224 if cuda else 96)
    modes = (args.compile or ("eager,compiled" if cuda else "eager")).split(",")
    args.steps = args.steps or (30 if cuda else 5)
    args.warmup = args.warmup or (10 if cuda else 2)
    env = {"torch": torch.__version__, "timm": timm.__version__,
           "device": torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads",
           "batch": args.batch, "amp": "bf16" if (cuda or args.cpu_autocast) else "fp32"}
    print(f"# {env}", flush=True)
    rows = []
    for name in args.models.split(","):
        args.size = 224 if name.startswith("vit") else base_size
        torch.manual_seed(0)
        kwargs = {"img_size": args.size} if name.startswith("vit") else {}
        original = timm.create_model(name, pretrained=False, **kwargs)
        converted = copy.deepcopy(original)
        report = convert(converted)
        for mode in modes:
            t_orig = step_time(copy.deepcopy(original), args, device, mode == "compiled")
            t_ilm = step_time(copy.deepcopy(converted), args, device, mode == "compiled")
            row = {"model": MODELS.get(name, name), "timm_name": name, "mode": mode, "size": args.size,
                   "original_ms": t_orig * 1e3, "converted_ms": t_ilm * 1e3, "ratio": t_ilm / t_orig,
                   "converted_layers": len(getattr(report, "converted", []))}
            rows.append(row)
            print(f"{row['model']:14s} {mode:9s} original {row['original_ms']:9.1f} ms  "
                  f"ILM {row['converted_ms']:9.1f} ms  ratio {row['ratio']:.3f}", flush=True)
    table = ("| model | mode | input | original ms | ILM ms | ILM / original |\n|---|---|---|---:|---:|---:|\n"
             + "\n".join(f"| {r['model']} | {r['mode']} | {args.batch}x3x{r['size']}² | {r['original_ms']:.1f} "
                         f"| {r['converted_ms']:.1f} | {r['ratio']:.3f} |" for r in rows) + "\n")
    print()
    print(table)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": command, "environment": env, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(f"Command: `{command}`\n\nEnvironment: {json.dumps(env)}\n\n{table}")


if __name__ == "__main__":
    main()
