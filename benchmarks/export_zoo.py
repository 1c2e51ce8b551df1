"""Export the zoo's representative subset to ONNX (both exporters) and pt2, with runtime parity.

For each architecture (``pretrained=False``, fixed seed, converted with ILM Norm or, for the
``proxy`` rows, Proxy Norm) the script calls :func:`ilmconvert.export` three times, ONNX with the
dynamo exporter, ONNX with the TorchScript exporter, and pt2 (``torch.export``), each with a
dynamic batch at the network's own input size (timm's ``pretrained_cfg``, else 224), and records
as one JSON line: the export time (trace and write, without the check), the max relative
difference to the PyTorch model at batch 1 and 3 (onnxruntime on the CPU / ``torch.export.load``),
the ONNX operator domains and node count, and any failure's first line. Resumable: rows already
in ``--out`` are skipped.

Usage::

    HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/export_zoo.py --out benchmarks/results/export_zoo_cpu.jsonl
    python benchmarks/export_zoo.py --out benchmarks/results/export_zoo_cpu.jsonl --summarize
    HF_HUB_OFFLINE=1 python benchmarks/export_zoo.py --only timm:resnet50_gn --out /tmp/r50.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the benchmarks package

from benchmarks.zoo.checks import first_line, reinit_zero_linears  # noqa: E402

#: (spec, method, constructor kwargs); small variants, one or more per family
SUBSET = [
    ("timm:resnet50_gn", "ilm", {}),
    ("timm:resnetv2_50x1_bit", "ilm", {}),
    ("timm:convnext_atto", "ilm", {}),
    ("timm:vit_tiny_patch16_224", "ilm", {}),
    ("timm:deit_tiny_patch16_224", "ilm", {}),
    ("timm:swin_tiny_patch4_window7_224", "ilm", {}),
    ("timm:poolformer_s12", "ilm", {}),
    ("timm:poolformerv2_s12", "ilm", {}),
    ("timm:convformer_s18", "ilm", {}),
    ("timm:efficientformer_l1", "ilm", {}),
    ("timm:maxvit_nano_rw_256", "ilm", {}),
    ("timm:mobilevitv2_050", "ilm", {}),
    ("timm:edgenext_xx_small", "ilm", {}),
    ("timm:gcvit_xxtiny", "ilm", {}),
    ("timm:test_efficientnet_gn", "ilm", {}),
    ("timm:test_efficientnet_ln", "ilm", {}),
    ("torchvision:convnext_tiny", "ilm", {}),
    ("torchvision:swin_t", "ilm", {}),
    ("torchvision:vit_b_16", "ilm", {}),
    ("timm:mixer_s16_224", "ilm", {}),
    ("timm:cait_xxs24_224", "ilm", {}),
    ("timm:resnet50_gn", "proxy", {}),
    ("timm:resnetv2_50x1_bit", "proxy", {}),
    ("timm:test_efficientnet_gn", "proxy", {}),
    ("timm:test_efficientnet_ln", "proxy", {}),
]
RUNS = (("onnx_dynamo", "onnx", "dynamo"), ("onnx_torchscript", "onnx", "torchscript"), ("pt2", "pt2", "dynamo"))


def run_one(spec: str, method: str, kwargs: dict) -> dict:
    """Convert ``spec`` with ``method`` and export it three ways; one record."""
    import onnx
    import torch

    import ilmconvert

    torch.manual_seed(0)
    model = ilmconvert.create_model(spec, pretrained=False, **kwargs)
    reinit_zero_linears(model)  # zero-initialized heads (torchvision's ViT) would make every parity 0
    report = ilmconvert.convert(model, method=method)
    record: dict = {"spec": spec, "method": method, "converted": len(report.converted)}
    record["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    with tempfile.TemporaryDirectory() as tmp:
        for key, fmt, exporter in RUNS:
            path = Path(tmp) / f"model.{fmt}"
            try:
                result = ilmconvert.export(model, path, format=fmt, exporter=exporter)
            except Exception as err:
                record[key] = {"ok": False, "error": first_line(err)}
            else:
                row = {"ok": True, "seconds": round(result.seconds, 2), "parity": result.parity}
                if fmt == "onnx":
                    proto = onnx.load(str(path), load_external_data=False)
                    row.update(domains=result.domains, opset=result.opset, nodes=len(proto.graph.node))
                else:
                    row["exact_reload"] = result.exact
                record[key] = row
                record["input_size"] = json.loads(result.metadata["input_size"])
            print(f"  {spec} [{method}] {key}: {record[key]}", file=sys.stderr, flush=True)
            for p in Path(tmp).iterdir():
                p.unlink()
    return record


def environment() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import timm
    import torch

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


def summarize(rows: list[dict]) -> str:
    """The markdown table of docs/zoo.md's export section."""
    lines = [
        "| architecture | method | ONNX dynamo s | ONNX TorchScript s | pt2 s | rel. diff batch 1 / 3 (ONNX dynamo) "
        "| rel. diff batch 1 / 3 (TorchScript) | pt2 vs eager, reload exact | ONNX domains |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for key, _, _ in RUNS:
            e = r.get(key, {})
            cells.append(f"{e['seconds']:.1f}" if e.get("ok") else f"FAIL: {e.get('error', '?')[:60]}")
        par = []
        for key in ("onnx_dynamo", "onnx_torchscript", "pt2"):
            e = r.get(key, {})
            p = e.get("parity") or {}
            par.append(" / ".join(f"{float(v):.1e}" for v in p.values()) if e.get("ok") else "-")
        pt2 = r.get("pt2", {})
        exact = f"{par[2]}, {'yes' if pt2.get('exact_reload') else 'no'}" if pt2.get("ok") else "-"
        onnx_runs = [r.get(k, {}) for k in ("onnx_dynamo", "onnx_torchscript")]
        domains = ", ".join(sorted({d or "ai.onnx" for e in onnx_runs for d in e.get("domains", [])}))
        head = f"| `{r['spec']}` | {r['method']} | {' | '.join(cells)} "
        lines.append(f"{head}| {par[0]} | {par[1]} | {exact} | {domains} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_zoo_cpu.jsonl"))
    parser.add_argument("--only", action="append", help="only this spec (repeatable)")
    parser.add_argument("--summarize", action="store_true", help="print the markdown table of --out and exit")
    args = parser.parse_args()
    done = []
    if args.out.exists():
        done = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    if args.summarize:
        rows = {(r["spec"], r["method"]): r for r in reversed(done) if "spec" in r}  # first record wins
        order = {key: i for i, (spec, method, _) in enumerate(SUBSET) for key in [(spec, method)]}
        print(summarize(sorted(rows.values(), key=lambda r: order.get((r["spec"], r["method"]), 99))))
        return
    seen = {(r["spec"], r["method"]) for r in done if "spec" in r}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        if not done:
            f.write(json.dumps({"environment": environment(), "started": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
        for spec, method, kwargs in SUBSET:
            if (args.only and spec not in args.only) or (spec, method) in seen:
                continue
            try:
                record = run_one(spec, method, kwargs)
            except Exception as err:  # conversion or construction failed: recorded, the sweep goes on
                record = {"spec": spec, "method": method, "error": first_line(err)}
            f.write(json.dumps(record) + "\n")
            f.flush()


if __name__ == "__main__":
    main()
