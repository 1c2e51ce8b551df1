"""Zoo sweep: convert every timm and torchvision architecture with ILM Norm and check it.

For each architecture (random weights, fixed seed) the sweep records, as one JSON line:

- the instance-level norms found (``isinstance`` GroupNorm / LayerNorm / InstanceNorm, by exact
  class), how many were converted and which were skipped and why, BatchNorm and other norm-like
  modules (RmsNorm, EvoNorm, ...) that ILM does not take over, parameter increase %;
- the relative output difference against the unconverted network on a random batch of 2 at a
  small valid input size, in float64 (float32 when the network cannot run in float64);
- whether a train-mode forward + backward works and every ILM parameter that takes part in the
  forward gets a finite gradient;
- whether ``ilmconvert.save`` -> ``ilmconvert.load`` reproduces the (float32) outputs bit for bit;
- the wall time of ``ilmconvert.convert`` alone;
- for a representative subset (``--extras``): ``torch._dynamo.explain`` graph breaks of the
  converted vs the original network, ``torch.fx.symbolic_trace`` where the original traces, and
  ``torch.export.export`` in eval mode.

Architectures whose float64 check would not fit ``--max-gb`` of RAM are checked in float32
(criterion 1e-4); those where even float32 does not fit are converted on the meta device
(structure and report only) and marked ``meta``. torchvision detection networks are called with a
list of images (the raw head outputs are compared; the train step uses the detection losses for
two boxes per image) and RAFT with two frames (in float32: torchvision builds RAFT's coordinate
grid with ``.float()``); segmentation and quantized networks (which hold no instance-level norm)
would be converted on the meta device only.

Every architecture runs in a worker process with a per-model time limit (``--timeout``); a
hung or crashed worker is replaced and the architecture recorded as ``timeout`` / ``crash``. The
sweep is resumable: names already in ``--out`` are skipped.

``--method proxy`` sweeps Proxy Norm instead (``convert(method="proxy")``, default settings, no
BatchNorm opt-in) into its own file (default ``benchmarks/results/zoo_cpu_proxy.jsonl``): only
architectures with a GroupNorm / LayerNorm module (``--from-results``: those the ILM sweep's records
say have one; otherwise the census on the meta device decides, ``no_gn_ln``). The conversion runs
first on the meta device; where it finds no norm -> activation pair the architecture is recorded as
``no_pair`` with every norm's reason. Otherwise the same checks as for ILM run on the PN-Act layers,
and the record adds the activations taken over and the skip reasons by category (``skip_reasons``).
``--summarize`` appends a Proxy Norm section when ``--proxy-results`` exists.

Usage::

    HF_HUB_OFFLINE=1 nice -n 19 python benchmarks/zoo_sweep.py --out benchmarks/results/zoo_cpu.jsonl
    HF_HUB_OFFLINE=1 nice -n 19 python benchmarks/zoo_sweep.py --method proxy \\
        --from-results benchmarks/results/zoo_cpu.jsonl --out benchmarks/results/zoo_cpu_proxy.jsonl
    python benchmarks/zoo_sweep.py --out benchmarks/results/zoo_cpu.jsonl --summarize docs/zoo.md
    python benchmarks/zoo_sweep.py --device cuda --out benchmarks/results/zoo_cuda.jsonl
"""


from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the benchmarks package

from benchmarks.zoo.pool import sweep, worker  # noqa: E402
from benchmarks.zoo.report import summarize  # noqa: E402

OUT_DEFAULT = {"ilm": "benchmarks/results/zoo_cpu.jsonl", "proxy": "benchmarks/results/zoo_cpu_proxy.jsonl"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help=f"JSON lines to append to (default {OUT_DEFAULT['ilm']}; "
                   f"{OUT_DEFAULT['proxy']} with --method proxy)")
    p.add_argument("--method", choices=sorted(OUT_DEFAULT), default="ilm", help="conversion method to sweep")
    p.add_argument(
        "--from-results", metavar="JSONL",
        help="sweep only the architectures whose records in this ILM sweep list a GroupNorm / LayerNorm",
    )
    p.add_argument("--libraries", default="timm,torchvision")
    p.add_argument("--filter", action="append", help="fnmatch pattern on the name (repeatable)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--timeout", type=float, default=240.0, help="per-architecture limit, seconds")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--max-gb", type=float, default=20.0, help="RAM for the float64 check; larger networks go to the meta device"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--retry", default="", help="re-run architectures recorded with these statuses, e.g. timeout,crash")
    p.add_argument(
        "--extras-all", action="store_true", help="run the compile / fx / export checks on every architecture"
    )
    p.add_argument(
        "--summarize", metavar="MD",
        help="write the Markdown summary of --out (ILM), and of --proxy-results where it exists, to MD and exit",
    )
    p.add_argument(
        "--proxy-results", metavar="JSONL", default=OUT_DEFAULT["proxy"],
        help="the Proxy Norm sweep that --summarize adds as a section when the file exists (default %(default)s)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.summarize and args.method != "ilm":
        p.error("--summarize reads --out as the ILM sweep and --proxy-results as the Proxy Norm one; drop --method")
    args.out = args.out or OUT_DEFAULT[args.method]
    if args.worker:
        worker(args.device, args.max_gb, args.threads, args.method)
    elif args.summarize:
        import timm
        import torchvision

        summarize(
            Path(args.out), Path(args.summarize), len(timm.list_models()), len(torchvision.models.list_models()),
            proxy=Path(args.proxy_results),
        )
    else:
        sweep(args)


if __name__ == "__main__":
    main()
