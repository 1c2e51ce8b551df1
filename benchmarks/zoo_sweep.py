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
import fnmatch
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MARK = "@@ZOO@@ "
SMALL = 64  # input side tried first
FLOW_UPDATES = 4  # RAFT refinement iterations in the sweep (the default is 12)
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
TORCHVISION_FULL = ("torchvision.models", "torchvision.models.video")
OUT_DEFAULT = {"ilm": "benchmarks/results/zoo_cpu.jsonl", "proxy": "benchmarks/results/zoo_cpu_proxy.jsonl"}
#: Proxy Norm skip reasons -> a short category (first match); "goes to X" is found by ``_GOES_TO``.
SKIP_CATEGORIES = (
    ("torch.fx cannot trace", "cannot trace (torch.fx)"),
    ("is shared", "shared activation module"),
    ("users, not one activation", "several users"),
    ("the norm module is called at", "norm called at several places"),
    ("never called in the traced forward", "norm never called"),
    ("takes more than the norm's output", "activation takes more inputs"),
    ("no activation follows this norm", "norm + act module without activation"),
    ("a dropout between", "dropout before the activation"),
    ("spans more than the channel", "normalized over more than the channels"),
    ("no Proxy Norm counterpart", "class not in the proxy mapping"),
    ("is not in the mapping", "class not in the proxy mapping"),
    ("BatchNorm is batch-level", "BatchNorm (not opted in)"),
)
_GOES_TO = re.compile(r"its output goes to ([^)]*)\)")


# ------------------------------------------------------------------------------------------ worker
def _qual(obj) -> str:
    c = type(obj)
    return f"{c.__module__}.{c.__qualname__}"


def _family(library: str, name: str) -> str:
    if library == "timm":
        from timm.models._registry import _model_to_module

        return _model_to_module.get(name, "?")
    import torchvision

    mod = torchvision.models.get_model_builder(name).__module__
    return mod.removeprefix("torchvision.models.")


def _census(model) -> dict:
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    norms, bn, other = Counter(), Counter(), Counter()
    not_norms = ("conv", "mlp", "head", "block", "net", "linear", "stage", "attention")
    for mod in model.modules():
        if isinstance(mod, (nn.GroupNorm, nn.LayerNorm, _InstanceNorm)):
            norms[_qual(mod)] += 1
        elif isinstance(mod, _BatchNorm):
            bn[_qual(mod)] += 1
        else:
            name = type(mod).__name__
            low = name.lower()
            # leaf-ish norm-like modules that subclass nothing standard (RmsNorm, EvoNorm, GRN, ...)
            if "norm" in low and not any(s in low for s in not_norms):
                other[_qual(mod)] += 1
    return {"norms": dict(norms), "batchnorm": dict(bn), "other_norms": dict(other)}


def _build(library: str, name: str, kwargs: dict, device: str | None = None):
    from ilmconvert.models import create_model

    if library == "torchvision":
        import inspect

        import torchvision

        if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
            kwargs = {"weights_backbone": None, **kwargs}  # no backbone download
    return create_model(f"{library}:{name}", pretrained=False, device=device, **kwargs)


def _leaves(out):
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _task(family: str) -> str:
    """How a network of ``family`` is called: ``image`` (a batch tensor), ``detection`` or ``flow``."""
    return {"detection": "detection", "optical_flow": "flow"}.get(family.split(".")[0], "image")


def _inputs(task: str, shape: tuple[int, ...], gen, dtype, device: str) -> tuple:
    """Positional arguments of one forward call: a batch, a list of images, or two frames."""
    import torch

    x = torch.randn(*shape, generator=gen, dtype=dtype).to(device)
    if task == "detection":
        return (list(x.unbind(0)),)
    if task == "flow":
        return (x, torch.randn(*shape, generator=gen, dtype=dtype).to(device))
    return (x,)


def _call(model, args: tuple, task: str):
    return model(*args, num_flow_updates=FLOW_UPDATES) if task == "flow" else model(*args)


def _forward(model, args: tuple, task: str = "image") -> list:
    """The network's floating-point outputs, flattened. For detection networks these are the raw
    outputs of ``model.head`` (class logits, box regression, centerness): the post-processed
    detections pass a score threshold, top-k and NMS, which hide or exaggerate small differences."""
    import torch

    with torch.no_grad():
        if task != "detection":
            out = _call(model, args, task)
        else:
            out = []
            hook = model.head.register_forward_hook(lambda mod, inp, o: out.append(o))
            try:
                model(*args)
            finally:
                hook.remove()
        return [t.detach().clone() for t in _leaves(out)]


def _train_loss(model, args: tuple, task: str):
    """A scalar to backpropagate in train mode: the detection losses for two boxes per image, else
    the mean square of every output."""
    import torch

    if task == "detection":
        targets = [
            {
                "boxes": torch.tensor(
                    [[4.0, 4.0, 40.0, 40.0], [16.0, 8.0, 60.0, 50.0]], dtype=img.dtype, device=img.device
                ),
                "labels": torch.tensor([1, 2], device=img.device),
            }
            for img in args[0]
        ]
        return sum(model(args[0], targets).values())
    return sum((o.float() ** 2).mean() for o in _leaves(_call(model, args, task)))


def _rel(before, after) -> tuple[float, float]:
    max_abs = max(float((a.double() - b.double()).abs().max()) for a, b in zip(after, before))
    scale = max(float(b.double().abs().max()) for b in before)
    return max_abs, (max_abs / scale if scale else max_abs)


def _small_side(name: str) -> int:
    """The first input side to try: ``SMALL``, or 56 = 4 x 14 for patch-14 ViTs (64 is not a multiple)."""
    return 56 if "patch14" in name or name.endswith("_14") else SMALL


def _attempts(library: str, name: str) -> list[tuple[dict, tuple[int, ...]]]:
    """(constructor kwargs, input shape) to try, smallest first."""
    if library == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        size = tuple(cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
        small = _small_side(name)
        out = [({"img_size": small}, (2, 3, small, small)), ({}, (2, 3, small, small))]
        if size[1] > 2 * SMALL:
            out.append(({"img_size": 2 * SMALL}, (2, 3, 2 * SMALL, 2 * SMALL)))
        out.append(({}, (2, *size)))
        return out
    fam = _family(library, name)
    if fam.startswith("detection"):
        # the transform resizes every image to min_size..max_size; keep it small
        return [({"min_size": SMALL, "max_size": SMALL}, (2, 3, SMALL, SMALL))]
    if fam.startswith("optical_flow"):
        return [({}, (2, 3, 128, 128))]  # RAFT's correlation pyramid needs H, W >= 8 * 16
    if fam.startswith("video"):
        return [({}, (2, 3, 4, SMALL, SMALL)), ({}, (2, 3, 16, 224, 224))]
    if name.startswith("vit_"):
        small = _small_side(name)
        return [({"image_size": small}, (2, 3, small, small)), ({}, (2, 3, 224, 224))]
    if name.startswith("maxvit"):
        return [({"input_size": (SMALL, SMALL)}, (2, 3, SMALL, SMALL)), ({}, (2, 3, 224, 224))]
    if name.startswith("inception") or name == "googlenet":
        side = 299 if name.startswith("inception") else 224
        return [({"init_weights": True, "aux_logits": False}, (2, 3, side, side))]
    return [({}, (2, 3, SMALL, SMALL)), ({}, (2, 3, 224, 224))]


class _StageClock:
    """Wall time per stage of one architecture; ``stage`` is the stage running now."""

    def __init__(self, first: str) -> None:
        self.stage = first
        self.seconds: dict[str, float] = {}
        self.start = self._last = time.perf_counter()

    def enter(self, new: str) -> None:
        """Start stage ``new``; the time since the previous stage began goes to that stage."""
        now = time.perf_counter()
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + now - self._last
        self._last, self.stage = now, new


def run_one(spec: str, device: str, max_gb: float, extras: bool, method: str = "ilm") -> dict:
    library, name = spec.split(":", 1)
    rec: dict = {"name": name, "library": library, "family": _family(library, name), "device": device}
    if method != "ilm":
        rec["method"] = method
    clock = _StageClock("meta-build")
    try:
        _run_checks(rec, clock, device, max_gb, extras, method)
    except Exception as err:  # noqa: BLE001
        rec["status"] = "error"
        rec["stage"] = clock.stage
        rec["error"] = _first_line(err)
        rec["traceback"] = traceback.format_exc(limit=-4)[-1500:]
    finally:
        clock.enter("done")
        rec["stage_s"] = {k: round(v, 3) for k, v in clock.seconds.items()}
        rec["total_s"] = time.perf_counter() - clock.start
    return rec


def _run_checks(rec: dict, clock: _StageClock, device: str, max_gb: float, extras: bool, method: str) -> None:
    """Fill ``rec`` for the architecture it names, stage by stage (``clock`` follows the stages)."""
    library, name = rec["library"], rec["name"]
    meta = _build(library, name, {}, device="meta")
    rec.update(_census(meta))
    rec["params"] = sum(p.numel() for p in meta.parameters())
    if method == "proxy":
        if _proxy_stops_on_meta(meta, rec, clock):
            return
    elif not rec["norms"]:
        rec["status"] = "no_instance_norm"
        return
    non_cls = library == "torchvision" and rec["family"].split(".")[0] in ("segmentation", "quantization")
    task = _task(rec["family"])
    float32_only, too_big = _memory_plan(rec, max_gb)
    if too_big or non_cls:
        if method == "ilm":  # (Proxy Norm converted the meta network already)
            clock.enter("meta-convert")
            _timed_convert(meta, rec)
        _mark_meta(rec, max_gb, too_big)
        return
    del meta

    # ---- build a real network at the smallest input size that runs (float64 when possible)
    clock.enter("build")
    model, args, before = _build_and_probe(library, name, task, device, float32_only, rec)

    original = None
    if extras:
        import copy

        original = copy.deepcopy(model).float()

    # ---- convert (timed), preservation
    clock.enter("convert")
    _timed_convert(model, rec, init="preserve", **({"method": method} if method != "ilm" else {}))
    clock.enter("preservation")
    _check_preservation(model, args, task, before, rec)

    # ---- forward + backward in train mode
    clock.enter("backward")
    _check_backward(model, args, task, rec, method)

    # ---- save -> load, exact (float32, as a checkpoint is used)
    clock.enter("save-load")
    args32 = _check_save_load(model, args, task, device, rec)

    if extras:
        clock.enter("extras")
        rec["extras"] = _extras(original, model, *args32)

    _verdict(rec)


def _memory_plan(rec: dict, max_gb: float) -> tuple[bool, bool]:
    """(float32_only, too_big) for ``rec["params"]`` parameters and ``max_gb`` of RAM."""
    # float64 check: the network and its reloaded copy at 8 bytes a parameter; when that does not
    # fit but float32 does, the check runs in float32 (criterion 1e-4 instead of 1e-10)
    float32_only = rec["params"] * 16 > max_gb * 2**30
    too_big = rec["params"] * 8 > max_gb * 2**30
    if float32_only and not too_big:
        rec["float32_reason"] = (
            f"float64 check needs ~{rec['params'] * 16 / 2**30:.0f} GB > {max_gb:g} GB: checked in float32"
        )
    return float32_only, too_big


def _timed_convert(model, rec: dict, **kwargs) -> None:
    """``ilmconvert.convert`` with its wall time and report recorded in ``rec``."""
    import ilmconvert

    t0 = time.perf_counter()
    report = ilmconvert.convert(model, **kwargs)
    rec["convert_s"] = time.perf_counter() - t0
    _report_fields(rec, report)
    if kwargs.get("method") == "proxy":
        _proxy_report_fields(rec, report)


def _mark_meta(rec: dict, max_gb: float, too_big: bool) -> None:
    """Structure and report only (the meta-device network was converted): record why it stops there."""
    rec["status"] = "meta"
    rec["meta_reason"] = (
        f"even a float32 check needs ~{rec['params'] * 8 / 2**30:.0f} GB > {max_gb:g} GB" if too_big
        else "no probe input for this task (structure and report only)"
    )


def _build_and_probe(library: str, name: str, task: str, device: str, float32_only: bool, rec: dict) -> tuple:
    """(model, args, outputs): the network built with the first of ``_attempts`` whose forward runs,
    its positional arguments and its outputs; the input used is recorded in ``rec``."""
    model = args = before = dtype = None
    kwargs_built = None
    errors: list[str] = []
    for kwargs, shape in _attempts(library, name):
        try:
            if kwargs != kwargs_built:
                model = None  # free the previous network before building the next
                model, dtype = _build_for_probe(library, name, kwargs, device, float32_only, rec)
                kwargs_built = kwargs
            args, before, dtype = _probe_forward(model, task, shape, dtype, device, f"{kwargs} {shape}", errors)
            if before:
                rec["input_kwargs"], rec["input_shape"], rec["dtype"] = kwargs, list(shape), str(dtype)[6:]
                break
        except Exception as err:  # noqa: BLE001
            errors.append(f"{kwargs} {shape}: {_first_line(err)}")
            kwargs_built = None
    if not before:
        raise RuntimeError("no input size runs the original network: " + " | ".join(errors[-3:]))
    return model, args, before


def _build_for_probe(library: str, name: str, kwargs: dict, device: str, float32_only: bool, rec: dict) -> tuple:
    """(model, dtype): the network (seed 0, random norm affines) in eval mode, cast to float64 unless
    ``float32_only`` or the cast fails; the build time goes to ``rec``."""
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = _build(library, name, kwargs).to(device).eval()
    rec["build_s"] = time.perf_counter() - t0
    # non-trivial norm affines (w ~ N(1, 0.5), b ~ N(0, 0.5)): preservation is not 1 * x + 0
    _randomize_norm_affines(model)
    dtype = torch.float32 if float32_only else torch.float64
    try:
        model.to(dtype)
    except Exception:  # noqa: BLE001
        dtype = torch.float32
    return model, dtype


def _probe_forward(model, task: str, shape: tuple[int, ...], dtype, device: str, label: str, errors: list) -> tuple:
    """(args, outputs, dtype): one seed-0 input of ``shape`` run through ``model`` in ``dtype``, falling
    back from float64 to float32; outputs is None (and each failure is in ``errors``) when neither runs."""
    import torch

    gen = torch.Generator().manual_seed(0)
    args = None
    for dt in ((dtype, torch.float32) if dtype == torch.float64 else (torch.float32,)):
        try:
            model.to(dt)
            args = _inputs(task, shape, gen, dt, device)
            return args, _forward(model, args, task), dt
        except Exception as err:  # noqa: BLE001
            errors.append(f"{label} {dt}: {_first_line(err)}")
    return args, None, dtype


def _check_preservation(model, args: tuple, task: str, before: list, rec: dict) -> None:
    """Output difference of the converted network against the original outputs ``before``."""
    import torch

    after = _forward(model, args, task)
    rec["max_abs_diff"], rec["rel_diff"] = _rel(before, after)
    rec["finite"] = all(bool(torch.isfinite(a).all()) for a in after)


def _check_backward(model, args: tuple, task: str, rec: dict, method: str = "ilm") -> None:
    """Train-mode forward + backward: finite loss, and finite gradients for every ILM (PN-Act) layer
    that takes part."""
    import torch

    model.train()
    model.zero_grad(set_to_none=True)
    loss = _train_loss(model, args, task)
    loss.backward()
    n_ilm, unused, nonfinite = _ilm_gradients(model) if method == "ilm" else _proxy_gradients(model)
    rec["ilm_layers_unused" if method == "ilm" else "pn_layers_unused"] = unused
    rec["grad_nonfinite"] = nonfinite[:5]
    rec["backward_ok"] = bool(torch.isfinite(loss)) and not nonfinite and unused < n_ilm
    model.zero_grad(set_to_none=True)


def _ilm_gradients(model) -> tuple[int, int, list[str]]:
    """(ILM layers, layers without any gradient, names of layers with a missing or non-finite one)."""
    import torch

    from ilmconvert.nn import ILMNorm

    ilm = {id(m): (n, m) for n, m in model.named_modules() if isinstance(m, ILMNorm)}
    unused, nonfinite = 0, []
    for n, m in ilm.values():
        grads = [p.grad for p in m.parameters(recurse=False)]
        grads += [p.grad for c in (m.encoder, m.decoder_mu, m.decoder_gamma) for p in c.parameters()]
        if all(g is None for g in grads):
            unused += 1
        elif any(g is None or not bool(torch.isfinite(g).all()) for g in grads):
            nonfinite.append(n)
    return len(ilm), unused, nonfinite


def _proxy_gradients(model) -> tuple[int, int, list[str]]:
    """(PN-Act layers, layers without any gradient, names of layers with a missing or non-finite one)."""
    import torch

    from ilmconvert.nn import ProxyNormAct

    pn = [(n, m) for n, m in model.named_modules() if isinstance(m, ProxyNormAct)]
    unused, nonfinite = 0, []
    for n, m in pn:
        grads = [p.grad for p in m.parameters()]
        if all(g is None for g in grads):
            unused += 1
        elif any(g is None or not bool(torch.isfinite(g).all()) for g in grads):
            nonfinite.append(n)
    return len(pn), unused, nonfinite


def _check_save_load(model, args: tuple, task: str, device: str, rec: dict) -> tuple:
    """``ilmconvert.save`` -> ``ilmconvert.load`` gives bit-identical float32 outputs; returns the float32
    arguments used (the model is left in float32 eval mode)."""
    import torch
    from torch.utils._pytree import tree_map

    import ilmconvert

    model.eval().float()
    args32 = tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) else t, args)
    ref = _forward(model, args32, task)
    with tempfile.TemporaryDirectory() as tmp:
        ilmconvert.save(model, Path(tmp) / "ckpt")
        # rebuild the unconverted architecture without the (slow, overwritten) random init;
        # load() then re-converts it and loads every parameter and persistent buffer strictly
        with _no_init():
            fresh = _build(rec["library"], rec["name"], rec["input_kwargs"])
        loaded = ilmconvert.load(Path(tmp) / "ckpt", model=fresh).to(device)
        got = _forward(loaded, args32, task)
    rec["save_load_exact"] = all(torch.equal(a, b) for a, b in zip(ref, got))
    return args32


def _verdict(rec: dict) -> None:
    """``status`` ok / fail from the checks in ``rec``, and the reason for a failure."""
    ok = rec["finite"] and rec["backward_ok"] and rec["save_load_exact"]
    limit = 1e-10 if rec["dtype"] == "float64" else 1e-4
    rec["preserved"] = rec["rel_diff"] <= limit
    rec["status"] = "ok" if ok and rec["preserved"] else "fail"
    if not rec["preserved"]:
        rec["fail_reason"] = f"relative output difference {rec['rel_diff']:.2e} > {limit:g} ({rec['dtype']})"
    elif not ok:
        rec["fail_reason"] = (
            "non-finite output" if not rec["finite"]
            else "backward" if not rec["backward_ok"]
            else "save->load not exact"
        )


class _no_init:
    """Make the weight-init functions no-ops (parameters stay uninitialized until loaded)."""

    def __enter__(self):
        import timm.layers.weight_init as wi
        import torch

        self.saved = []
        targets = [(torch.nn.init, n) for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
        names = ("trunc_normal_", "trunc_normal_tf_", "variance_scaling_", "lecun_normal_")
        targets += [(wi, n) for n in names]
        targets += [(m, n) for k, m in list(sys.modules.items()) if k.startswith("timm.models") and m is not None
                    for n in names if callable(getattr(m, n, None))]
        for mod, n in targets:
            self.saved.append((mod, n, getattr(mod, n)))
            setattr(mod, n, lambda t, *a, **k: t)
        return self

    def __exit__(self, *exc):
        for mod, n, f in self.saved:
            setattr(mod, n, f)
        return False


def _randomize_norm_affines(model) -> None:
    import torch
    from torch import nn
    from torch.nn.modules.instancenorm import _InstanceNorm

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm, _InstanceNorm)):
                for p, mean in ((getattr(m, "weight", None), 1.0), (getattr(m, "bias", None), 0.0)):
                    if isinstance(p, torch.Tensor):
                        p.copy_(mean + 0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))


def _report_fields(rec: dict, report) -> None:
    rec["converted"] = len(report.converted) + sum(len(c.aliases) for c in report.converted)
    rec["converted_by_class"] = dict(Counter(c.source for c in report.converted))
    skipped = Counter((s.source, s.reason) for s in report.skipped)
    rec["skipped"] = [{"source": s, "reason": r, "count": n} for (s, r), n in skipped.items()]
    rec["params_before"], rec["params_after"] = report.params_before, report.params_after
    rec["increase_pct"] = report.increase_percent


def _proxy_stops_on_meta(meta, rec: dict, clock: _StageClock) -> bool:
    """Proxy Norm on the meta-device network (cheap): True, with the status in ``rec``, when the
    architecture has no GroupNorm / LayerNorm (``no_gn_ln``) or no norm -> activation pair
    (``no_pair``, with every norm's reason); else its report is in ``rec`` and the checks go on."""
    from torch import nn

    import ilmconvert

    if not any(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in meta.modules()):
        rec["status"] = "no_gn_ln"
        return True
    clock.enter("meta-convert")
    try:
        _timed_convert(meta, rec, method="proxy")
    except ilmconvert.ConversionError as err:
        rec["status"] = "no_pair"
        rec["no_pair_reason"] = _first_line(err)
        rec["converted"] = 0
        skipped = _unpaired_reasons(meta)
        rec["skipped"] = [{"source": s, "reason": r, "count": n} for (s, r), n in skipped.items()]
        rec["skip_reasons"] = _skip_categories(rec["skipped"])
        return True
    return False


def _unpaired_reasons(model) -> Counter:
    """``(source class, reason) -> modules`` for the GN / LN / IN modules of a network where
    ``convert(method="proxy")`` converted nothing, found with the same public pieces it uses
    (``proxy_mapping``, ``find_activation_pairs``, ``swap_module``), worded like its report."""
    from torch import nn
    from torch.nn.modules.instancenorm import _InstanceNorm

    from ilmconvert import swap_module
    from ilmconvert.convert import proxy_mapping
    from ilmconvert.nn import UnsupportedNormError
    from ilmconvert.pairing import find_activation_pairs

    mapping = proxy_mapping()
    pairing = find_activation_pairs(model, tuple(t for t, a in mapping.items() if a.needs_activation))
    out = Counter()
    for m in model.modules():
        if not isinstance(m, (nn.GroupNorm, nn.LayerNorm, _InstanceNorm)):
            continue
        adapter = mapping.get(type(m))
        if adapter is None:
            reason = f"{type(m).__name__} has no Proxy Norm counterpart (not in the proxy mapping)"
        elif id(m) in pairing.reasons:
            reason = f"not paired with an activation: {pairing.reasons[id(m)]}"
        else:
            try:
                swap_module(m, adapter, activation=pairing.activations.get(id(m)))
                reason = "convertible alone (converted nothing as a whole: see no_pair_reason)"
            except UnsupportedNormError as err:
                reason = str(err)
        out[(_qual(m), reason[:300])] += 1
    return out


def _skip_category(reason: str) -> str:
    """A short category of a Proxy Norm skip reason (``SKIP_CATEGORIES``; ``goes to X``)."""
    goes = _GOES_TO.search(reason)
    if goes:
        return f"goes to {goes.group(1)}"
    for needle, category in SKIP_CATEGORIES:
        if needle in reason:
            return category
    return reason[:80]


def _skip_categories(skipped: list[dict]) -> dict:
    """Skipped modules by category, BatchNorms (never converted without the opt-in) left out."""
    c = Counter()
    for s in skipped:
        category = _skip_category(s["reason"])
        if category != "BatchNorm (not opted in)":
            c[category] += s["count"]
    return dict(c.most_common())


def _proxy_report_fields(rec: dict, report) -> None:
    """Proxy Norm's additions to the report fields: activations taken over, absorbed activation
    modules, skip reasons by category."""
    rec["activations"] = dict(Counter(c.activation for c in report.converted))
    rec["absorbed"] = sum(len(c.absorbed) for c in report.converted)
    rec["skip_reasons"] = _skip_categories(rec["skipped"])


def _extras(original, model, x) -> dict:
    """torch.compile / fx / export checks on the float32 eval-mode converted network."""
    import torch

    out: dict = {}
    torch._dynamo.reset()
    try:
        e0 = torch._dynamo.explain(original)(x)
        torch._dynamo.reset()
        e1 = torch._dynamo.explain(model)(x)
        out["graph_breaks_original"] = e0.graph_break_count
        out["graph_breaks_converted"] = e1.graph_break_count
        out["break_reasons"] = sorted({str(b.reason)[:160] for b in e1.break_reasons})[:5]
    except Exception as err:  # noqa: BLE001
        out["explain_error"] = _first_line(err)
    finally:
        torch._dynamo.reset()
    try:
        torch.fx.symbolic_trace(original)
        out["fx_original"] = True
    except Exception as err:  # noqa: BLE001
        out["fx_original"] = False
        out["fx_original_error"] = _first_line(err)
    if out["fx_original"]:
        try:
            gm = torch.fx.symbolic_trace(model)
            out["fx_converted"] = _close(_forward(model, (x,)), _forward(gm, (x,)))
        except Exception as err:  # noqa: BLE001
            out["fx_converted"] = False
            out["fx_error"] = _first_line(err)
    try:
        ep = torch.export.export(model.eval(), (x,))
        out["export"] = _close(_forward(model, (x,)), _forward(ep.module(), (x,)))
    except Exception as err:  # noqa: BLE001
        out["export"] = False
        out["export_error"] = _first_line(err)
    return out


def _close(a, b) -> bool:
    import torch

    return all(torch.allclose(u, v, rtol=1e-5, atol=1e-5) for u, v in zip(a, b))


def _first_line(err: BaseException) -> str:
    from ilmconvert.errors import first_line

    return first_line(err)[:300]


def worker(device: str, max_gb: float, threads: int, method: str = "ilm") -> None:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # models that print must not corrupt the protocol
    for line in sys.stdin:
        spec, _, flag = line.strip().partition(" ")
        rec = run_one(spec, device, max_gb, flag == "extras", method)
        out.write(MARK + json.dumps(rec, default=str) + "\n")


# ------------------------------------------------------------------------------------------ parent
def all_specs(libraries: list[str]) -> list[str]:
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
    for r in _load_records(results):
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


class Worker:
    def __init__(self, args) -> None:
        cmd = [
            sys.executable, __file__, "--worker",
            "--device", args.device, "--max-gb", str(args.max_gb), "--threads", str(args.threads),
            "--method", args.method,
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
        )

    def ask(self, spec: str, extras: bool, timeout: float) -> dict | None:
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


def sweep(args) -> None:
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


def _run_path(jsonl: Path) -> Path:
    return jsonl.with_suffix(".run.json")


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
    _run_path(out).write_text(json.dumps(info, indent=1) + "\n")


# ------------------------------------------------------------------------------------------ summary
def summarize(
    jsonl: Path, md: Path, total_timm: int | None = None, total_tv: int | None = None, proxy: Path | None = None
) -> None:
    """Write the Markdown summary of the ILM sweep ``jsonl`` to ``md``, followed by a Proxy Norm
    section when the ``proxy`` sweep's file exists (without it the output is the ILM summary alone)."""
    rows = _load_records(jsonl)
    with_norm = [r for r in rows if r["status"] not in ("no_instance_norm",)]
    by_lib = defaultdict(list)
    for r in rows:
        by_lib[r["library"]].append(r)
    lines = _intro_lines()
    lines += _totals_lines(by_lib, total_timm, total_tv)
    lines += _coverage_lines()
    lines += _norm_class_lines(rows, with_norm)
    lines += _family_lines(with_norm)
    lines += _failure_lines(with_norm)
    lines += _meta_lines(with_norm)
    lines += _extras_lines(rows)
    lines += _timing_lines(rows, with_norm)
    lines += _last_run_lines(jsonl)
    if proxy is not None and proxy.exists():
        lines += _proxy_lines(proxy)
    lines.append("")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")


def _load_records(jsonl: Path) -> list[dict]:
    """The records of ``jsonl``, one per architecture (the last record of a name wins)."""
    recs = {}
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        recs[(r["library"], r["name"])] = r
    return list(recs.values())


def _intro_lines() -> list[str]:
    return [
        "# Zoo sweep: ILM conversion of every timm / torchvision architecture",
        "",
        "Generated by `python benchmarks/zoo_sweep.py --out benchmarks/results/zoo_cpu.jsonl --summarize docs/zoo.md`",
        "from the JSON lines of the sweep (one per architecture). Each architecture is built with random",
        "weights (seed 0) and random norm affines (w ~ N(1, 0.5), b ~ N(0, 0.5)), converted with",
        "`init=\"preserve\"`, and checked: relative output difference `max|after - before| / max|before|` "
        "on a random batch of 2 at the smallest input size that runs",
        "(float64; float32 where the network cannot run in float64), a train-mode forward + backward with",
        "finite gradients for every ILM parameter that takes part, and save -> load giving bit-identical",
        "float32 outputs. **ok** = all of these with rel. diff <= 1e-10 (float64) / 1e-4 (float32).",
        "torchvision's detection networks (FCOS, RetinaNet v2) take a list of two images: their raw head outputs",
        "are compared, and the train step backpropagates the detection losses for two boxes per image.",
        "RAFT takes two frames (four refinement steps) and is checked in float32: torchvision builds its",
        "coordinate grid with `.float()`.",
        "",
    ]


def _totals_lines(by_lib: dict, total_timm: int | None, total_tv: int | None) -> list[str]:
    """Per-library counts by status, the share that is ok, and the registered totals."""
    lines = [
        "## Totals",
        "",
        "| library | architectures swept | with GN / LN / IN | ok | meta only | fail | error / timeout |",
        "|---|---|---|---|---|---|---|",
    ]
    for lib, rs in sorted(by_lib.items()):
        wn = [r for r in rs if r["status"] != "no_instance_norm"]
        c = Counter(r["status"] for r in wn)
        lines.append(
            f"| {lib} | {len(rs)} | {len(wn)} | {c['ok']} | {c['meta']} | {c['fail']} "
            f"| {c['error'] + c['timeout'] + c['crash']} |"
        )
    lines.append("")
    for lib, rs in sorted(by_lib.items()):
        wn = [r for r in rs if r["status"] != "no_instance_norm"]
        if wn:
            ok = sum(r["status"] == "ok" for r in wn)
            lines.append(
                f"- {lib}: **{ok} / {len(wn)} = {100 * ok / len(wn):.1f} %** of the swept architectures "
                "with an instance-level norm convert, preserve, train and round-trip."
            )
    if total_timm:
        lines.append(f"- timm registers {total_timm} architectures; {len(by_lib.get('timm', []))} were swept so far.")
    if total_tv:
        lines.append(
            f"- torchvision registers {total_tv} architectures; "
            f"{len(by_lib.get('torchvision', []))} were swept so far."
        )
    return lines


def _coverage_lines() -> list[str]:
    out = "--out benchmarks/results/zoo_cpu.jsonl"
    return [
        "",
        "Coverage is what the JSON lines hold: the sweep is resumable, and architectures not yet swept are",
        "simply absent from the tables. To continue (skips every name already recorded; `--retry timeout`",
        "re-runs the ones that hit the per-model limit, with a larger `--timeout`):",
        "",
        "```",
        f"HF_HUB_OFFLINE=1 nice -n 19 python benchmarks/zoo_sweep.py {out} --timeout 240",
        f"HF_HUB_OFFLINE=1 nice -n 19 python benchmarks/zoo_sweep.py {out} --retry timeout --timeout 900",
        f"python benchmarks/zoo_sweep.py {out} --summarize docs/zoo.md",
        "```",
        "",
        "torch.fx: each ILM layer is one opaque node of a `torch.fx.symbolic_trace` graph",
        "(`ilmconvert.nn.core.ilm_forward`, wrapped with `torch.fx.wrap`), run eagerly; see the subset table below.",
        "",
    ]


def _norm_class_lines(rows: list[dict], with_norm: list[dict]) -> list[str]:
    """Norm classes met and converted, the skipped ones, and the norm-like modules left alone."""
    found, conv = Counter(), Counter()
    for r in with_norm:
        for k in r.get("norms", {}):
            found[k] += 1
        for k in r.get("converted_by_class", {}):
            conv[k] += 1
    lines = [
        "## Norm classes met",
        "",
        "| class | architectures containing it | architectures where it was converted |",
        "|---|---|---|",
    ]
    lines += [f"| `{k}` | {n} | {conv.get(k, 0)} |" for k, n in found.most_common()]
    lines += _skipped_lines(with_norm)
    lines += _other_norm_lines(rows)
    lines.append("")
    return lines


def _skipped_lines(with_norm: list[dict]) -> list[str]:
    skipped = Counter()
    for r in with_norm:
        for s in r.get("skipped", []):
            skipped[(s["source"], s["reason"])] += 1
    if not skipped:
        return []
    lines = [
        "",
        "Skipped (left as they are), by class and reason:",
        "",
        "| class | reason | architectures |",
        "|---|---|---|",
    ]
    lines += [f"| `{s}` | {reason} | {n} |" for (s, reason), n in skipped.most_common()]
    return lines


def _other_norm_lines(rows: list[dict]) -> list[str]:
    other = Counter()
    for r in rows:
        for k in r.get("other_norms", {}):
            other[k] += 1
    if not other:
        return []
    return [
        "",
        "Norm-like modules that are not GroupNorm / LayerNorm / InstanceNorm subclasses (RMSNorm, EvoNorm, GRN, ...): "
        "not instance-level mean/variance standardization, so not converted:",
        "",
        ", ".join(f"`{k.rsplit('.', 1)[-1]}` ({n})" for k, n in other.most_common()),
    ]


def _family_lines(with_norm: list[dict]) -> list[str]:
    fam = defaultdict(list)
    for r in with_norm:
        fam[(r["library"], r.get("family", "?"))].append(r)
    lines = [
        "## By family",
        "",
        "| library | family | archs | ok | meta | fail/error | max rel. diff (float64) | mean param. increase % "
        "| max convert s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_family_row(lib, f, rs) for (lib, f), rs in sorted(fam.items())]
    lines.append("")
    return lines


def _family_row(lib: str, family: str, rs: list[dict]) -> str:
    c = Counter(r["status"] for r in rs)
    diffs = [r["rel_diff"] for r in rs if r.get("dtype") == "float64" and "rel_diff" in r]
    inc = [r["increase_pct"] for r in rs if "increase_pct" in r]
    cs = [r["convert_s"] for r in rs if "convert_s" in r]
    head = f"| {lib} | {family} | {len(rs)} | {c['ok']} | {c['meta']} | {len(rs) - c['ok'] - c['meta']} | "
    if diffs and inc and cs:
        row = f"{head}{max(diffs):.1e} | {sum(inc) / len(inc):.2f} | {max(cs):.2f} |"
        return row.replace("| 0.0e+00 |", "| 0 |")
    mean_inc = (sum(inc) / len(inc)) if inc else float("nan")
    max_cs = max(cs) if cs else float("nan")
    return f"{head}- | {mean_inc:.2f} | {max_cs:.2f} |"


def _failure_lines(with_norm: list[dict]) -> list[str]:
    bad = [r for r in with_norm if r["status"] not in ("ok", "meta")]
    lines = ["## Every failure and its cause", ""]
    if not bad:
        return lines + ["None."]
    lines += ["| architecture | status | stage | cause |", "|---|---|---|---|"]
    for r in sorted(bad, key=lambda r: (r["library"], r["name"])):
        cause = r.get("fail_reason") or r.get("error", "")
        lines.append(
            f"| {r['library']}:{r['name']} | {r['status']} | {r.get('stage', '')} | {cause.replace('|', '/')[:220]} |"
        )
    return lines


def _meta_lines(with_norm: list[dict]) -> list[str]:
    metas = [r for r in with_norm if r["status"] == "meta"]
    if not metas:
        return []
    lines = ["", "## Converted on the meta device only (structure and report, no numerical check)", ""]
    lines += [
        f"- {r['library']}:{r['name']} ({r['params'] / 1e6:.0f} M params): {r.get('meta_reason', '')}"
        for r in sorted(metas, key=lambda r: -r["params"])
    ]
    return lines


def _extras_lines(rows: list[dict]) -> list[str]:
    ex = [r for r in rows if "extras" in r]
    if not ex:
        return []
    lines = [
        "",
        "## torch.compile / fx / export (representative subset, float32, eval)",
        "",
        "| architecture | graph breaks original -> converted | fx (where the original traces) | export |",
        "|---|---|---|---|",
    ]
    return lines + [_extras_row(r) for r in ex]


def _extras_row(r: dict) -> str:
    e = r["extras"]
    if "graph_breaks_converted" in e:
        gb = f"{e.get('graph_breaks_original')} -> {e.get('graph_breaks_converted')}"
    else:
        gb = e.get("explain_error", "")
    if not e.get("fx_original"):
        fx = "original does not trace"
    else:
        fx = "ok" if e.get("fx_converted") else f"FAIL: {e.get('fx_error', '')[:120]}"
    exp = "ok" if e.get("export") else f"FAIL: {e.get('export_error', '')[:120]}"
    return f"| {r['library']}:{r['name']} | {gb} | {fx} | {exp} |"


def _timing_lines(rows: list[dict], with_norm: list[dict]) -> list[str]:
    """The slowest and the largest conversions, and the summed sweep time."""
    timed = [r for r in with_norm if "convert_s" in r]
    lines = [
        "",
        "## Slowest and largest conversions",
        "",
        "| architecture | params (M) | norms converted | convert s | status |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(timed, key=lambda r: -r["convert_s"])[:10]:
        lines.append(
            f"| {r['library']}:{r['name']} | {r['params'] / 1e6:.0f} | {r.get('converted', 0)} "
            f"| {r['convert_s']:.3f} | {r['status']} |"
        )
    lines += ["", "Largest:", ""]
    for r in sorted(timed, key=lambda r: -r["params"])[:5]:
        lines.append(
            f"- {r['library']}:{r['name']}: {r['params'] / 1e6:.0f} M params, {r.get('converted', 0)} norms, "
            f"convert {r['convert_s']:.3f} s ({r['status']})"
        )
    wall = sum(r.get("total_s", 0) for r in rows)
    lines += [
        "",
        "## Sweep time",
        "",
        f"Sum over the recorded architectures (excluding worker start-up): {wall / 60:.1f} min.",
    ]
    return lines


def _last_run_lines(jsonl: Path) -> list[str]:
    """How the last sweep over ``jsonl`` ran, from the ``.run.json`` next to it (none if absent)."""
    run = _run_path(jsonl)
    if not run.exists():
        return []
    info = json.loads(run.read_text())
    if not info["already_recorded"]:
        start = "from an empty file"
    else:
        start = f"resuming after {info['already_recorded']} recorded"
    return [
        "",
        f"Last run ({info['finished']}, {start}, {'complete' if info['complete'] else 'incomplete'}): "
        f"{info['architectures_run']} architectures in **{info['wall_s'] / 60:.1f} min** wall clock on "
        f"{info['cuda_device'] or info['device']}; torch {info['torch']}, torchvision {info['torchvision']}, "
        f"timm {info['timm']}, Python {info['python']}:",
        "",
        "```",
        info["command"],
        "```",
    ]


# ------------------------------------------------------------------------------ summary: Proxy Norm
PN_SWEPT_OUT = ("no_gn_ln",)  # records that are not architectures with a GN / LN module


def _proxy_lines(jsonl: Path) -> list[str]:
    """The Proxy Norm section: counts, preservation, skip reasons, families, failures, time."""
    rows = [r for r in _load_records(jsonl) if r["status"] not in PN_SWEPT_OUT]
    paired = [r for r in rows if r["status"] != "no_pair"]
    lines = _proxy_intro_lines(jsonl)
    lines += _proxy_totals_lines(rows)
    lines += _proxy_preservation_lines(paired)
    lines += _proxy_skip_lines(rows)
    lines += _proxy_family_lines(rows)
    ex = [r for r in paired if "extras" in r]
    if ex:
        lines += ["", "torch.compile / fx / export of the converted network (subset, float32, eval):", ""]
        lines += _extras_lines(ex)[3:]
    bad = [r for r in paired if r["status"] not in ("ok", "meta")]
    lines += ["", "### Proxy Norm failures", ""] + (_failure_lines(bad)[2:] if bad else ["None."])
    wall = sum(r.get("total_s", 0) for r in rows)
    lines += ["", f"Sum over the recorded architectures (excluding worker start-up): {wall / 60:.1f} min."]
    return lines + _last_run_lines(jsonl)


def _proxy_intro_lines(jsonl: Path) -> list[str]:
    return [
        "",
        "## Proxy Norm",
        "",
        "The same sweep with `ilmconvert.convert(model, method=\"proxy\")` (default settings: `init=\"preserve\"`, no",
        "BatchNorm opt-in) over the architectures whose ILM records list a GroupNorm / LayerNorm module. Each",
        "norm -> activation pair (timm's GroupNormAct / LayerNormAct(2d), or a plain GN / LN that torch.fx pairs with",
        "the activation module after it) becomes GN / LN + PN-Act (docs/design.md §8); the conversion is tried",
        "first on the meta device, and an architecture where it finds no pair is recorded as **no pair** with",
        "every norm's reason. The others get the ILM checks: rel. diff <= 1e-10 (float64) / 1e-4 (float32), a",
        "train step with finite gradients for every PN-Act parameter that takes part, bit-exact save -> load.",
        "",
        "```",
        f"HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/zoo_sweep.py --method proxy --from-results "
        f"benchmarks/results/zoo_cpu.jsonl --out {jsonl} --timeout 240",
        "```",
        "",
    ]


def _proxy_totals_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| library | with GN / LN | no pair | with a pair | ok | meta only | fail | error / timeout "
        "| PN-Act layers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_lib = defaultdict(list)
    for r in rows:
        by_lib[r["library"]].append(r)
    for lib, rs in sorted(by_lib.items()):
        c = Counter(r["status"] for r in rs)
        layers = sum(r.get("converted", 0) for r in rs if r["status"] != "no_pair")
        lines.append(
            f"| {lib} | {len(rs)} | {c['no_pair']} | {len(rs) - c['no_pair']} | {c['ok']} | {c['meta']} "
            f"| {c['fail']} | {c['error'] + c['timeout'] + c['crash']} | {layers} |"
        )
    lines.append("")
    for lib, rs in sorted(by_lib.items()):
        paired = [r for r in rs if r["status"] != "no_pair"]
        if paired:
            ok = sum(r["status"] == "ok" for r in paired)
            lines.append(
                f"- {lib}: **{ok} / {len(paired)} = {100 * ok / len(paired):.1f} %** of the architectures with a "
                "norm -> activation pair convert, preserve, train and round-trip."
            )
    return lines


def _proxy_preservation_lines(paired: list[dict]) -> list[str]:
    """The worst preservation figure per dtype, and the activations taken over."""
    lines = [""]
    for dtype in ("float64", "float32"):
        checked = [r for r in paired if r.get("dtype") == dtype and "rel_diff" in r]
        if checked:
            worst = max(checked, key=lambda r: r["rel_diff"])
            lines.append(
                f"- Worst rel. diff in {dtype} over {len(checked)} architectures: {worst['rel_diff']:.1e} "
                f"({worst['library']}:{worst['name']})."
            )
    acts = Counter()
    for r in paired:
        acts.update(r.get("activations", {}))
    if acts:
        lines.append("- Activations taken over: " + ", ".join(f"{a} {n}" for a, n in acts.most_common()) + ".")
    return lines


def _proxy_skip_lines(rows: list[dict]) -> list[str]:
    """GN / LN / IN modules left alone, by reason category (BatchNorms not counted)."""
    modules, archs, no_pair = Counter(), Counter(), Counter()
    for r in rows:
        for category, n in r.get("skip_reasons", {}).items():
            modules[category] += n
            archs[category] += 1
            no_pair[category] += r["status"] == "no_pair"
    if not modules:
        return []
    lines = [
        "",
        "Norms left alone, by reason (BatchNorms, never converted without the opt-in, not counted):",
        "",
        "| reason | norm modules | architectures | of which with no pair |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c} | {n} | {archs[c]} | {no_pair[c]} |" for c, n in modules.most_common(15)]
    if len(modules) > 15:
        rest = list(modules)[15:]
        lines.append(f"| {len(rest)} other reasons | {sum(modules[c] for c in rest)} | | |")
    return lines


def _proxy_family_lines(rows: list[dict]) -> list[str]:
    fam = defaultdict(list)
    for r in rows:
        fam[(r["library"], r.get("family", "?"))].append(r)
    lines = [
        "",
        "### Proxy Norm by family",
        "",
        "| library | family | with GN / LN | with a pair | ok | fail/error | PN-Act layers | max rel. diff (float64) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    unpaired = []
    for (lib, f), rs in sorted(fam.items()):
        c = Counter(r["status"] for r in rs)
        paired = len(rs) - c["no_pair"]
        if not paired:
            unpaired.append(f"{lib}:{f} ({len(rs)})")
            continue
        layers = sum(r.get("converted", 0) for r in rs if r["status"] != "no_pair")
        diffs = [r["rel_diff"] for r in rs if r.get("dtype") == "float64" and "rel_diff" in r]
        diff = (f"{max(diffs):.1e}" if max(diffs) else "0") if diffs else "-"
        lines.append(
            f"| {lib} | {f} | {len(rs)} | {paired} | {c['ok']} | {paired - c['ok'] - c['meta']} | {layers} | {diff} |"
        )
    if unpaired:
        lines += ["", "Families with a GN / LN module but no pair (architectures): " + ", ".join(unpaired) + "."]
    return lines


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
