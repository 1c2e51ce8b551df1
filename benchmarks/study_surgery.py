"""The study's surgery experiment (docs/study.md §2): pretrain, swap, fine-tune on new classes.

1. Pretrain two small ResNets from scratch on CIFAR-10 classes 0-4 (airplane ... deer), one with
   GroupNorm and one with BatchNorm, unconverted (``finetune --method none``).
2. Make the arms from each pretrained network's *final* epoch (``last/``), all with the same fresh
   5-class head (seeded): the network as it is (``none``), ``convert(method="ilm",
   init="preserve")`` (ILM+GN) and ``convert(method="proxy", init="preserve")`` (GN+PN); for the BN
   network the conversions also take ``batchnorm="gn"`` (BN -> GN standardization: the function
   changes). For GN the preservation is checked (max relative output difference printed).
3. Fine-tune every arm on classes 5-9 (dog ... truck) with ``ilmconvert sweep`` (variants that
   name a checkpoint), the same epochs and learning rate at every batch size
   (``--lr-scaling none``), seeds 0, 1, 2: the GN arms at batch 32 and 4, the BN arms at batch 4.

Resumable: run it again and finished parts are skipped. Usage::

    HF_HUB_OFFLINE=1 python benchmarks/study_surgery.py --cifar /tmp/cifar/cifar10 --out /work/study-out/surgery
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY = {"channels": [32, 64, 128, 256], "stem_width": 32, "layers": [1, 1, 1, 1]}


def pretrain_recipe(norm: str) -> dict:
    """Pretraining on classes 0-4: 4 epochs over 12,500 of their 25,000 training images."""
    return {
        "name": f"study-surgery-pretrain-{norm}",
        "description": "pretraining on CIFAR-10 classes 0-4 (docs/study.md)",
        "model": {"name": "timm:resnet18", "kwargs": {"norm_layer": norm, **TINY}},
        "conversion": {"method": "none"},
        "train": {"epochs": 4, "batch_size": 64, "lr": 0.05, "sched": "cosine", "cpu_threads": 1, "seed": 0},
        "data": {"train_subset": 12500, "test_subset": 2000, "num_workers": 0, "eval_batch_size": 500},
    }


def finetune_recipe(norm: str, arms: Path) -> dict:
    """Fine-tuning on classes 5-9: 3 epochs over 2,500 training images; the variants are the arms."""
    return {
        "name": f"study-surgery-finetune-{norm}",
        "description": "fine-tuning on CIFAR-10 classes 5-9 (docs/study.md)",
        "model": {"name": "timm:resnet18", "kwargs": {"norm_layer": norm, **TINY}},  # unused: checkpoints
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "sched": "cosine", "cpu_threads": 1, "seed": 0},
        "data": {"train_subset": 2500, "test_subset": 2000, "num_workers": 0, "eval_batch_size": 500},
        "variants": {name: {"checkpoint": str(arms / f"{norm}-{arm}")} for name, arm in ARMS.items()},
    }


#: variant name -> arm folder suffix
ARMS = {"unconverted": "none", "ilm+gn": "ilm", "gn+pn": "pn"}


def split_folder(cifar: Path, target: Path, classes: list[str]) -> Path:
    """An ImageFolder of some CIFAR-10 classes: symbolic links to the class folders."""
    for split in ("train", "test"):
        (target / split).mkdir(parents=True, exist_ok=True)
        for name in classes:
            link = target / split / name
            if not link.exists():
                link.symlink_to((cifar / split / name).resolve(), target_is_directory=True)
    return target


def pretrain(norm: str, data: Path, out: Path) -> Path:
    """Train (or resume, or skip when finished) the unconverted network on classes 0-4."""
    import yaml

    from ilmconvert.train.run import prepare_finetune, run_finetune
    from ilmconvert.train.sweep_results import finished

    run, recipe = out / f"pretrain-{norm}", out / f"pretrain-{norm}.yaml"
    recipe.write_text(yaml.safe_dump(pretrain_recipe(norm), sort_keys=False))
    if not finished(run, 4):
        start = time.perf_counter()
        resume = (run / "last").is_dir()
        plan = prepare_finetune(data=str(data), run=run, recipe=None if resume else recipe, resume=resume, device="cpu")
        summary = run_finetune(plan)
        print(f"pretrained {norm}: final top-1 {summary['last']['top1']:.2f} % in {time.perf_counter() - start:.0f} s")
    return run / "last"


def make_arms(norm: str, pretrained: Path, out: Path) -> dict:
    """The three arms of one pretrained network, saved under ``out/arms``; returns their checks."""
    import copy

    import torch

    import ilmconvert
    from ilmconvert.models import resize_classifier

    checks = {}
    base = ilmconvert.load(pretrained)
    torch.manual_seed(1234)
    resize_classifier(base, 5)  # the same fresh head for every arm of this network
    batchnorm = "gn" if norm == "batchnorm" else None
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base.eval()(x)
    for arm, method in (("none", "none"), ("ilm", "ilm"), ("pn", "proxy")):
        target = out / "arms" / f"{norm}-{arm}"
        network = copy.deepcopy(base)
        if method != "none":
            ilmconvert.convert(network, method=method, init="preserve", batchnorm=batchnorm)
        with torch.no_grad():
            y = network.eval()(x)
        relative = ((y - reference).abs().max() / reference.abs().max()).item()
        report = network.ilm_conversion
        checks[f"{norm}-{arm}"] = {"converted": len(report.converted), "relative_output_change": relative}
        if not (target / "config.json").is_file():
            ilmconvert.save(network, target, metadata={"study": "surgery", "pretrained": str(pretrained)})
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 ImageFolder root (train/, test/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    import yaml

    from ilmconvert.train.sweep import plan_sweep, run_sweep

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    old = split_folder(args.cifar, out / "data-classes-0-4", CLASSES[:5])
    new = split_folder(args.cifar, out / "data-classes-5-9", CLASSES[5:])
    started = time.perf_counter()
    checks = {}
    for norm, sizes in (("groupnorm", "32,4"), ("batchnorm", "4")):
        pretrained = pretrain(norm, old, out)
        checks |= make_arms(norm, pretrained, out)
        recipe = out / f"finetune-{norm}.yaml"
        recipe.write_text(yaml.safe_dump(finetune_recipe(norm, (out / "arms").resolve()), sort_keys=False))
        sweep = plan_sweep(
            recipe=recipe, data=str(new), out=out / f"sweep-{norm}", variants=",".join(ARMS),
            batch_sizes=sizes, seeds=args.seeds, lr_scaling="none", reference="unconverted", device="cpu",
        )  # fmt: skip
        summary = run_sweep(sweep)
        print(f"{norm}: {summary['cells_finished']} cells; see {out / f'sweep-{norm}' / 'summary.md'}")
    (out / "arms.json").write_text(json.dumps(checks, indent=2) + "\n")
    print(json.dumps(checks, indent=2))
    print(
        f"this invocation: wall {(time.perf_counter() - started) / 60:.1f} min, "
        f"CPU {time.process_time() / 60:.1f} min (one torch thread: the wall time on an otherwise idle machine)"
    )


if __name__ == "__main__":
    main()
