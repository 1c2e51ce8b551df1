"""The zoo sweep's process pool: one worker process, a per-architecture time limit, crash isolation.

The parent (:func:`sweep`) picks the architectures (all of timm / torchvision, ``--from-results``,
``--filter``, minus those already in ``--out``), hands them one at a time to a :class:`Worker` (the
entry script run with ``--worker``), and appends each record to ``--out`` as one JSON line. A worker
that does not answer within ``--timeout`` seconds or dies is killed and replaced; the architecture is
recorded as ``timeout`` / ``crash``. The worker (:func:`worker`) answers on its own copy of stdout,
each record prefixed with :data:`MARK`: what the networks print goes to stderr.
"""

from __future__ import annotations

import fnmatch
import json
import os
import select
import subprocess
import sys
import time
import warnings
from pathlib import Path

from .report import load_records, run_info_path

MARK = "@@ZOO@@ "
ENTRY = Path(__file__).resolve().parents[1] / "zoo_sweep.py"  # the script a worker runs (``--worker``)
#: Representative subset for the torch.compile / fx / export checks (one per registered source class).
EXTRAS = {
    "timm:resnet50_gn",  # nn.GroupNorm
    "timm:convnext_atto",  # LayerNorm2d, LayerNorm
    "timm:vit_tiny_patch16_224",  # nn.LayerNorm
    "timm:poolformerv2_s12",  # GroupNorm1NoBias
    "timm:convformer_s18",  # LayerNorm2dNoBias, LayerNormNoBias
    "timm:poolformer_s12",  # GroupNorm1
    "timm:nf_regnet_b0",  # none (control)
    "torchvision:convnext_tiny",
    "torchvision:swin_t",
    "torchvision:vit_b_16",
}


# ------------------------------------------------------------------------------------------ worker
def worker(device: str, max_gb: float, threads: int, method: str = "ilm") -> None:
    """Answer ``spec [extras]`` lines on stdin with one :data:`MARK` record line each, until EOF."""
    import torch

    from .record import run_one

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # models that print must not corrupt the protocol
    for line in sys.stdin:
        spec, _, flag = line.strip().partition(" ")
        rec = run_one(spec, device, max_gb, flag == "extras", method)
        out.write(MARK + json.dumps(rec, default=str) + "\n")


class Worker:
    """A worker process for the sweep's ``args`` (device, max GB, threads, method)."""

    def __init__(self, args) -> None:
        cmd = [
            sys.executable, str(ENTRY), "--worker",
            "--device", args.device, "--max-gb", str(args.max_gb), "--threads", str(args.threads),
            "--method", args.method,
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
        )

    def ask(self, spec: str, extras: bool, timeout: float) -> dict | None:
        """The record of ``spec``; ``{"status": "crash", ...}`` if the worker died, None after ``timeout`` s."""
        self.proc.stdin.write(spec + (" extras" if extras else "") + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                return {"status": "crash", "error": f"worker exited with {self.proc.wait()}"}
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


# ------------------------------------------------------------------------------------------ parent
def all_specs(libraries: list[str]) -> list[str]:
    """``library:name`` of every architecture timm / torchvision registers."""
    specs = []
    if "timm" in libraries:
        import timm

        specs += [f"timm:{n}" for n in timm.list_models()]
    if "torchvision" in libraries:
        import torchvision

        specs += [f"torchvision:{n}" for n in torchvision.models.list_models()]
    return specs


def gn_ln_specs(results: Path) -> set[str]:
    """The architectures whose records in ``results`` (an ILM sweep) list a GroupNorm / LayerNorm
    module (any norm class of the census that is not an InstanceNorm)."""
    out = set()
    for r in load_records(results):
        if any(_is_gn_ln(k) for k in r.get("norms", {})):
            out.add(f"{r['library']}:{r['name']}")
    return out


def _is_gn_ln(qualname: str) -> bool:
    """Whether the class named ``module.Class`` subclasses GroupNorm / LayerNorm (by name where it
    cannot be imported)."""
    import importlib

    from torch import nn

    module, _, cls_name = qualname.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError):
        return "InstanceNorm" not in cls_name
    return isinstance(cls, type) and issubclass(cls, (nn.GroupNorm, nn.LayerNorm))


def _check_out_method(out: Path, method: str) -> None:
    """Refuse to append ``method`` records to a file holding another method's (ILM's have no ``method``)."""
    if not out.exists():
        return
    for line in out.read_text().splitlines():
        try:
            other = json.loads(line).get("method", "ilm")
        except ValueError:
            continue
        if other != method:
            sys.exit(f"{out} holds {other} records; pass another --out for --method {method}")


def done_specs(path: Path, retry: tuple[str, ...] = ()) -> set[str]:
    """Names already recorded in ``path`` (the last record of a name wins), except statuses in ``retry``."""
    last = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            last[f"{r['library']}:{r['name']}"] = r["status"]
    return {k for k, status in last.items() if status not in retry}


def sweep(args) -> None:
    """Run every selected architecture not yet in ``args.out`` through a worker; append the records."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_out_method(out, args.method)
    specs = all_specs(args.libraries.split(","))
    if args.from_results:
        candidates = gn_ln_specs(Path(args.from_results))
        specs = [s for s in specs if s in candidates]
    if args.filter:
        specs = [
            s for s in specs
            if any(fnmatch.fnmatchcase(s.split(":", 1)[1], p) or fnmatch.fnmatchcase(s, p) for p in args.filter)
        ]
    done = done_specs(out, tuple(args.retry.split(",")) if args.retry else ())
    todo = [s for s in specs if s not in done][: args.limit or None]
    print(f"{len(specs)} architectures, {len(done)} done, {len(todo)} to run", flush=True)
    w = Worker(args)
    t_start = time.monotonic()
    with out.open("a") as fh:
        for i, spec in enumerate(todo):
            rec = w.ask(spec, spec in EXTRAS or args.extras_all, args.timeout)
            library, name = spec.split(":", 1)
            if rec is None or rec.get("status") == "crash":
                status = "timeout" if rec is None else "crash"
                err = f"exceeded the {args.timeout:g} s per-model limit" if rec is None else rec["error"]
                rec = {"name": name, "library": library, "status": status, "error": err, "device": args.device}
                if args.method != "ilm":
                    rec["method"] = args.method
                w.kill()
                w = Worker(args)
            fh.write(json.dumps(rec, default=str) + "\n")
            fh.flush()
            why = rec.get("error", rec.get("fail_reason", rec.get("no_pair_reason", "")))
            print(f"[{i + 1}/{len(todo)} {time.monotonic() - t_start:7.0f}s] {spec}: {rec['status']} "
                  f"{rec.get('rel_diff', '')} {why}", flush=True)
    w.kill()
    wall_s = time.monotonic() - t_start
    complete = not set(specs) - done_specs(out)
    _write_run_info(out, args, len(done), len(todo), wall_s, complete=complete)


def _write_run_info(out: Path, args, already: int, ran: int, wall_s: float, complete: bool) -> None:
    """Record how the last sweep over ``out`` ran (wall clock, machine, versions) next to it."""
    import platform

    import torch

    from ilmconvert.io import versions

    info = {
        "command": "python " + " ".join(sys.argv),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "already_recorded": already,
        "architectures_run": ran,
        "wall_s": round(wall_s, 1),
        "complete": complete,
        "device": (
            args.device if args.device != "cpu"
            else f"CPU ({platform.machine()}), {os.cpu_count()} cores, {args.threads} threads"
        ),
        "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "python": platform.python_version(),
        **versions(),
    }
    run_info_path(out).write_text(json.dumps(info, indent=1) + "\n")
