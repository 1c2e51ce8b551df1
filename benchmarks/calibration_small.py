"""Train the small BN networks that docs/calibration.md calibrates (issue 18's second table).

Weights obtained honestly: trained here, from scratch, unconverted (``finetune --method none``), at
32 px on CIFAR-10 JPEGs, one torch thread:

- ``surgery-bn``: the BN network of the surgery study (docs/study.md §2): timm ``resnet18`` with
  BatchNorm at half width, one block per stage, pretrained exactly as ``benchmarks/study_surgery.py``
  does (classes 0-4, 4 epochs over 12,500 images, batch 64, lr 0.05 cosine).
- ``torchvision-resnet18``: torchvision's ``resnet18`` (BatchNorm, its ImageNet stem), all ten
  classes, 3 epochs over 10,000 training images, batch 64, lr 0.05 cosine.

Then ``benchmarks/calibration.py --checkpoint OUT/NAME/last --data DATA ...`` measures each (the
surgery network on the classes 0-4 folder this script links, ``OUT/data-classes-0-4``). Resumable:
finished trainings are skipped. Usage::

    HF_HUB_OFFLINE=1 python benchmarks/calibration_small.py --cifar CIFAR10_ROOT --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.study_surgery import CLASSES, pretrain, split_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TORCHVISION_RESNET18 = {
    "name": "calibration-torchvision-resnet18",
    "description": "torchvision resnet18 (BatchNorm) from scratch on CIFAR-10 at 32 px (docs/calibration.md)",
    "model": {"name": "torchvision:resnet18", "kwargs": {}},
    "conversion": {"method": "none"},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "sched": "cosine", "cpu_threads": 1, "seed": 0},
    "data": {"train_subset": 10000, "test_subset": 2000, "num_workers": 0, "eval_batch_size": 500},
}


def train(recipe: dict, data: Path, run: Path) -> dict:
    """Train ``recipe`` on ``data`` into ``run`` (skipped when finished); returns the last epoch's metrics."""
    import yaml

    from ilmconvert.train.run import prepare_finetune, run_finetune
    from ilmconvert.train.sweep_results import finished

    epochs = recipe["train"]["epochs"]
    if not finished(run, epochs):
        path = run.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        resume = (run / "last").is_dir()
        plan = prepare_finetune(data=str(data), run=run, recipe=None if resume else path, resume=resume, device="cpu")
        run_finetune(plan)
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 ImageFolder root (train/, test/)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    five = split_folder(args.cifar, args.out / "data-classes-0-4", CLASSES[:5])
    pretrain("batchnorm", five, args.out)  # -> OUT/pretrain-batchnorm
    surgery = json.loads((args.out / "pretrain-batchnorm" / "metrics.jsonl").read_text().splitlines()[-1])
    print(json.dumps({"network": "surgery-bn", "checkpoint": str(args.out / "pretrain-batchnorm" / "last"), **surgery}))
    tv = train(TORCHVISION_RESNET18, args.cifar, args.out / "torchvision-resnet18")
    print(
        json.dumps(
            {"network": "torchvision-resnet18", "checkpoint": str(args.out / "torchvision-resnet18" / "last"), **tv}
        )
    )
    print(f"wall {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
