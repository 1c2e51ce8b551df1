"""``finetune``'s training throughput against a minimal plain PyTorch loop (issue 13).

Both train the same converted network (timm ``resnet18`` layout at half width with GroupNorm ->
ILM, the tests' tiny network; or ``--model``) on the same cached uint8 images through the same
DataLoader (``make_loader``: seeded order, RandomCrop + flip), with the same thread count, SGD
momentum 0.9 and cross-entropy. The floor is ``for x, y in loader: normalize; forward; loss;
zero_grad; backward; step``; ``finetune``'s loop is ``ilmconvert.train.loop.train_one_epoch``
(accuracy counting, loss sums on the device, the NaN check every 10 batches, scheduler stepping).
The two alternate epoch by epoch (after one warm-up epoch each), and the median images/s of each is
reported with the ratio finetune / floor.

Usage::

    python benchmarks/train_throughput.py --threads 1 --images 2048 --epochs 5
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ilmconvert  # noqa: E402
from ilmconvert.train import loop as L  # noqa: E402
from ilmconvert.train.data import ImageSet, train_transform  # noqa: E402
from ilmconvert.train.loader import make_loader, to_input  # noqa: E402
from ilmconvert.train.recipes import DataSettings, TrainSettings  # noqa: E402

TINY = {"norm_layer": "groupnorm", "channels": [32, 64, 128, 256], "stem_width": 32, "layers": [1, 1, 1, 1]}


def floor_epoch(network: nn.Module, loader, optimizer, data: DataSettings) -> float:
    """Images per second of the minimal loop over one epoch."""
    criterion = nn.CrossEntropyLoss()
    network.train()
    seen, start = 0, time.perf_counter()
    for images, labels in loader:
        x = to_input(images, data.mean, data.std, torch.device("cpu"))
        loss = criterion(network(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += labels.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:resnet18")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kwargs = TINY if args.model == "timm:resnet18" else {}
    torch.manual_seed(0)
    base = ilmconvert.create_model(args.model, pretrained=False, num_classes=10, **kwargs)
    ilmconvert.convert(base)
    rng = np.random.default_rng(0)
    items = list(rng.integers(0, 255, (args.images, 32, 32, 3), dtype=np.uint8))
    data = DataSettings()
    train = TrainSettings(batch_size=args.batch_size, lr=0.01, epochs=args.epochs + 1, sched="cosine")
    images = ImageSet(items, [i % 10 for i in range(args.images)], [str(i) for i in range(10)], 32,
                      transform=train_transform(data))
    loader = make_loader(images, args.batch_size, train=True, seed=0)
    precision = L.Precision(torch.device("cpu"))
    ours_net, floor_net = copy.deepcopy(base), copy.deepcopy(base)
    ours_opt = L.create_optimizer(ours_net, train)
    scheduler = L.create_scheduler(ours_opt, train, len(loader))
    floor_opt = torch.optim.SGD(floor_net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    rates: dict[str, list[float]] = {"finetune": [], "floor": []}
    updates = 0
    for epoch in range(args.epochs + 1):
        L.seed_epoch(loader, 0, epoch)
        metrics, updates = L.train_one_epoch(ours_net, loader, ours_opt, scheduler, train, data, precision, updates)
        L.seed_epoch(loader, 0, epoch)
        floor = floor_epoch(floor_net, loader, floor_opt, data)
        if epoch:  # the first epoch of each is a warm-up
            rates["finetune"].append(metrics["images_per_s"])
            rates["floor"].append(floor)
    result = {
        "model": args.model,
        "images": args.images,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "finetune_images_per_s": statistics.median(rates["finetune"]),
        "floor_images_per_s": statistics.median(rates["floor"]),
        "per_epoch": rates,
        "versions": {"torch": torch.__version__, "timm": __import__("timm").__version__,
                     "python": platform.python_version()},
        "cpu": platform.processor() or platform.machine(),
    }
    result["ratio"] = result["finetune_images_per_s"] / result["floor_images_per_s"]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
