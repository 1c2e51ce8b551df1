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

Small batches (issue 20), every variant of a network stepped in turn, in a shuffled order per
round, so that the ratios come from one run under the same load::

    python benchmarks/train_step.py --device cpu --threads 1 --models figure1 --batch-sizes 1,2,4,64 \
        --steps 30 --warmup 5 --out benchmarks/results/train_step_figure1_cpu.json
    python benchmarks/train_step.py --device cpu --threads 1 --models resnet50_gn --batch-sizes 2 \
        --size 96 --steps 30 --warmup 5 --interleave

On CUDA (issue 20, part d; each step synchronized, wall clock), eager against CUDA graphs::

    python benchmarks/train_step.py --device cuda --models figure1 --batch-sizes 1,2,4,64 \
        --compile eager,reduce-overhead --steps 30 --warmup 10 --out $OUT/train_step_figure1_cuda.json

``figure1`` is the network of ``docs/study/figure1.yaml`` (timm ``resnet18`` layout, half width,
one block per stage, CIFAR-10 32 px input) in the sweep's variants ``gn``, ``ilm+gn`` and
``gn+pn``, built by the sweep's own code (:meth:`ilmconvert.train.sweep.Sweep.cell_recipe`,
:func:`ilmconvert.train.loop.build_network`); a timm model is compared as ``original`` and
``ilm`` (``ilmconvert.convert``), in the interleaved mode also ``proxy`` when ``--variants`` asks.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
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


FIGURE1 = Path(__file__).resolve().parents[1] / "docs" / "study" / "figure1.yaml"
FIGURE1_VARIANTS = ("gn", "ilm+gn", "gn+pn")


def figure1_networks(variants: tuple[str, ...] = FIGURE1_VARIANTS) -> dict[str, nn.Module]:
    """The Figure-1 network of ``docs/study/figure1.yaml`` in each sweep variant, as the sweep builds it."""
    from ilmconvert.train.loop import build_network
    from ilmconvert.train.sweep import Cell, plan_sweep

    with tempfile.TemporaryDirectory() as out:
        sweep = plan_sweep(recipe=FIGURE1, data="cifar10", out=Path(out) / "sweep", variants=",".join(variants),
                           batch_sizes="2", seeds="0")
        networks = {}
        for name in variants:
            recipe = sweep.cell_recipe(Cell(name, 2, 0))
            networks[name] = build_network(recipe.model, recipe.conversion, 10, seed=recipe.train.seed)
    return networks


def timm_networks(name: str, variants: tuple[str, ...]) -> dict[str, nn.Module]:
    """timm ``name`` (random weights) as ``original`` and converted: ``ilm`` (default), ``proxy``."""
    import timm

    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False)
    networks = {"original": original}
    for method in variants:
        if method != "original":
            networks[method] = copy.deepcopy(original)
            convert(networks[method], method=method)
    return networks


def interleaved_step_times(networks: dict[str, nn.Module], batch: int, size: int, classes: int, steps: int,
                           warmup: int, seed: int = 0, clock=time.perf_counter, device: str = "cpu",
                           compile_mode: str | None = None) -> dict[str, list[float]]:
    """Seconds of each training step of every network, the networks stepped in turn.

    One step = forward, cross-entropy, backward, SGD step (momentum 0.9, weight decay 5e-4) on the
    same random batch for every network; each round runs every network once, in a shuffled order.
    ``clock``: ``time.perf_counter`` (wall) or ``time.thread_time`` (CPU time of this thread, which
    with one torch thread is all the work: time while the thread is descheduled does not count).
    On CUDA (``device="cuda"``, wall clock) each step is synchronized before and after;
    ``compile_mode`` (``"default"``, ``"reduce-overhead"`` = CUDA graphs, ...) compiles each
    network's forward with ``torch.compile(mode=...)`` (the warm-up steps pay the compilation).
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    target = torch.randint(0, classes, (batch,), generator=gen).to(device)
    cuda = torch.device(device).type == "cuda"
    runs = {}
    for name, net in networks.items():
        model = copy.deepcopy(net).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        runs[name] = (torch.compile(model, mode=compile_mode) if compile_mode else model, opt)

    def step(name: str) -> float:
        model, opt = runs[name]
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return clock() - t0

    times: dict[str, list[float]] = {name: [] for name in networks}
    order = list(networks)
    for i in range(warmup + steps):
        rng.shuffle(order)
        for name in order:
            t = step(name)
            if i >= warmup:
                times[name].append(t)
    return times


def interleaved_main(args) -> None:
    """``--batch-sizes`` / ``figure1`` / ``--interleave``: ratios of variants measured in one run."""
    import timm

    from ilmconvert.nn import cpu_kernel, cpu_op

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    env = {"torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0],
           "device": device, "cpu_kernel": cpu_kernel.library() is not None,
           "cpu_op": cpu_op.proxy_operator() is not None, "amp": "fp32", "steps": args.steps,
           "warmup": args.warmup, "statistic": "median", "clock": args.clock}
    print(f"# {env}", flush=True)
    rows = []
    for model in args.models.split(","):
        if model == "figure1":
            variants = tuple(args.variants.split(",")) if args.variants else FIGURE1_VARIANTS
            networks, base, size, classes = figure1_networks(variants), "gn", 32, 10
        else:
            variants = tuple(args.variants.split(",")) if args.variants else ("original", "ilm")
            networks, base, size, classes = timm_networks(model, variants), "original", args.size or 96, 1000
        for batch, mode in [(b, m) for m in args.interleave_modes for b in args.batch_sizes]:
            clock = time.thread_time if args.clock == "cpu" else time.perf_counter
            times = interleaved_step_times(networks, batch, size, classes, args.steps, args.warmup, clock=clock,
                                           device=args.device, compile_mode=None if mode == "eager" else mode)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"model": model, "mode": mode, "batch": batch, "size": size, "base": base,
                   "ms": {k: v * 1e3 for k, v in med.items()},
                   "ratio": {k: v / med[base] for k, v in med.items() if k != base},
                   "q25_q75_ms": {k: [float(q) * 1e3 for q in statistics.quantiles(v, n=4)[::2]]
                                  for k, v in times.items()}}
            rows.append(row)
            print(f"{model} {mode} batch {batch:3d}: {base} {row['ms'][base]:8.2f} ms  "
                  + "  ".join(f"{k}/{base} {r:.3f}" for k, r in row["ratio"].items()), flush=True)
    others = [k for k in rows[0]["ratio"]] if rows else []
    table = ("| model | mode | batch | input | base ms | " + " | ".join(f"{k} / base" for k in others) + " |\n"
             + "|---|---|---:|---|---:|" + "---:|" * len(others) + "\n"
             + "".join(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['size']} px | "
                       f"{r['ms'][r['base']]:.2f} ({r['base']}) | "
                       + " | ".join(f"{r['ratio'].get(k, float('nan')):.2f}×" for k in others) + " |\n"
                       for r in rows))
    print()
    print(table)
    _write(args, {"environment": env, "rows": rows}, table)


def _write(args, record: dict, table: str) -> None:
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *args.argv])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": command, **record}, indent=1))
        args.out.with_suffix(".md").write_text(
            f"Command: `{command}`\n\nEnvironment: {json.dumps(record['environment'])}\n\n{table}")


def main(argv: list[str] | None = None) -> None:
    import timm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", type=int, default=None, help="64 on CUDA, 4 on CPU")
    p.add_argument("--size", type=int, default=None, help="224 on CUDA, 96 on CPU (ViT: 224 always)")
    p.add_argument("--compile", default=None,
                   help="'eager,compiled' (CUDA default) or 'eager' (CPU default); interleaved mode: 'eager' and/or "
                        "torch.compile modes, e.g. 'eager,reduce-overhead' (CUDA graphs)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (CUDA 30, CPU 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (CUDA 10, CPU 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpu-autocast", action="store_true", help="bf16 autocast on CPU as well")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated batch sizes: the interleaved CPU mode (implies --interleave)")
    p.add_argument("--interleave", action="store_true",
                   help="step the variants in turn (shuffled per round) and report ratios from one run (CPU)")
    p.add_argument("--variants", default=None,
                   help="figure1: sweep variants (default gn,ilm+gn,gn+pn); timm: original,ilm[,proxy]")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="interleaved mode: wall clock, or this thread's CPU time (a shared machine; needs --threads 1)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu measures the calling thread only: pass --threads 1")
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.batch_sizes or args.interleave or "figure1" in args.models.split(","):
        if args.device not in ("cpu", "cuda") or (args.device == "cuda" and args.clock == "cpu"):
            p.error("the interleaved mode runs on --device cpu or cuda (wall clock on cuda)")
        args.interleave_modes = (args.compile or "eager").split(",")
        if args.device == "cpu" and args.compile and args.compile != "eager":
            print("# note: compiled modes on CPU pay inductor's compilation in the warm-up steps", flush=True)
        torch.set_num_threads(args.threads)
        args.batch_sizes = [int(b) for b in (args.batch_sizes or str(args.batch or 2)).split(",")]
        args.steps = args.steps or 30
        args.warmup = args.warmup or 5
        interleaved_main(args)
        return
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
    _write(args, {"environment": env, "rows": rows}, table)


if __name__ == "__main__":
    main()
