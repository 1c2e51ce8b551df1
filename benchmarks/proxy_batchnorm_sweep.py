"""Every torchvision classification network with its BatchNorms opted in to Proxy Norm (issue 10).

``convert(model, method=METHOD, batchnorm="gn")`` for ``proxy`` and ``ilm+proxy`` on each
architecture of ``torchvision.models`` (random weights, 3 classes), then: how many norms became
GN + PN (or ILM + PN) and how many plain GroupNorm (a BatchNorm with no activation to take over),
how many modules were re-traced so that a shared activation has a module per call
(``ilmconvert.pairing.unshare_activations``), whether a sample's output depends on the rest of the
batch (relative difference of ``model(x)[:1]`` and ``model(x[:1])``, float32, eval mode), and for
networks below ``--reload-max-params`` whether ``save`` -> ``load`` reproduces the outputs bit for
bit. One JSON line per (architecture, method).

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/proxy_batchnorm_sweep.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ilmconvert  # noqa: E402
from benchmarks.zoo.checks import batch_dependence, check_save_load  # noqa: E402


def check(name: str, method: str, reload_max_params: float) -> dict:
    record: dict = {"name": name, "method": method}
    start = time.perf_counter()
    try:
        model = ilmconvert.create_model(f"torchvision:{name}", pretrained=False, num_classes=3).eval()
        size = 299 if "inception" in name else (224 if name.startswith(("vit", "swin", "maxvit")) else 96)
        report = ilmconvert.convert(model, method=method, batchnorm="gn")
        record["proxy_layers"] = sum(c.target != "GroupNorm" for c in report.converted)
        record["plain_group_norms"] = sum(c.target == "GroupNorm" for c in report.converted)
        record["retraced_modules"] = len({c.note for c in report.converted if "re-traced" in c.note})
        x = torch.randn(2, 3, size, size)
        record["batch_dependence"] = batch_dependence(model, x)
        if sum(p.numel() for p in model.parameters()) <= reload_max_params:
            record["reload_exact"] = check_save_load(model, (x,))[0]
    except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
        record["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/proxy_batchnorm_torchvision.jsonl"))
    parser.add_argument("--methods", default="proxy,ilm+proxy")
    parser.add_argument("--reload-max-params", type=float, default=40e6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for name in torchvision.models.list_models(module=torchvision.models):
            for method in args.methods.split(","):
                record = check(name, method, args.reload_max_params)
                print(json.dumps(record), flush=True)
                out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
