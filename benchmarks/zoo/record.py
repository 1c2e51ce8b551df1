"""One architecture of the zoo sweep -> one record (a JSON-able dict), stage by stage.

:func:`run_one` builds the network on the meta device (census, parameter count; for Proxy Norm the
conversion itself, which finds the norm -> activation pairs), plans the memory (float64, float32 or
meta only), builds the real network at the smallest input size that runs (:func:`attempts`), and
runs the checks of :mod:`benchmarks.zoo.checks` on it: convert (timed), preservation, train step,
save -> load, and, for the representative subset, compile / fx / export. :func:`verdict` turns the
checks into ``status`` ok / fail. Any exception is recorded as ``error`` with the stage it stopped in.
"""

from __future__ import annotations

import copy
import re
import time
import traceback
from collections import Counter

import torch
from torch import nn

import ilmconvert

from . import checks
from .checks import INSTANCE_NORMS, class_path, first_line

SMALL = 64  # input side tried first
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


def _small_side(name: str) -> int:
    """The first input side to try: ``SMALL``, or 56 = 4 x 14 for patch-14 ViTs (64 is not a multiple)."""
    return 56 if "patch14" in name or name.endswith("_14") else SMALL


def attempts(library: str, name: str) -> list[tuple[dict, tuple[int, ...]]]:
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
    fam = checks.family(library, name)
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
    """The record of architecture ``spec`` (``library:name``) converted with ``method`` on ``device``."""
    library, name = spec.split(":", 1)
    rec: dict = {"name": name, "library": library, "family": checks.family(library, name), "device": device}
    if method != "ilm":
        rec["method"] = method
    clock = _StageClock("meta-build")
    try:
        _run_checks(rec, clock, device, max_gb, extras, method)
    except Exception as err:  # noqa: BLE001
        rec["status"] = "error"
        rec["stage"] = clock.stage
        rec["error"] = first_line(err)
        rec["traceback"] = traceback.format_exc(limit=-4)[-1500:]
    finally:
        clock.enter("done")
        rec["stage_s"] = {k: round(v, 3) for k, v in clock.seconds.items()}
        rec["total_s"] = time.perf_counter() - clock.start
    return rec


def _run_checks(rec: dict, clock: _StageClock, device: str, max_gb: float, extras: bool, method: str) -> None:
    """Fill ``rec`` for the architecture it names, stage by stage (``clock`` follows the stages)."""
    library, name = rec["library"], rec["name"]
    meta = checks.build(f"{library}:{name}", device="meta")
    rec.update(checks.census(meta))
    rec["params"] = sum(p.numel() for p in meta.parameters())
    if method == "proxy":
        if _proxy_stops_on_meta(meta, rec, clock):
            return
    elif not rec["norms"]:
        rec["status"] = "no_instance_norm"
        return
    non_cls = library == "torchvision" and rec["family"].split(".")[0] in ("segmentation", "quantization")
    task = checks.task_of(rec["family"])
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
    original = copy.deepcopy(model).float() if extras else None

    # ---- convert (timed), preservation
    clock.enter("convert")
    _timed_convert(model, rec, init="preserve", **({"method": method} if method != "ilm" else {}))
    clock.enter("preservation")
    kept = checks.check_preservation(model, args, before, task)
    rec["max_abs_diff"], rec["rel_diff"], rec["finite"] = kept.max_abs_diff, kept.rel_diff, kept.finite

    # ---- forward + backward in train mode
    clock.enter("backward")
    grads = checks.check_backward(model, args, task, method)
    rec["ilm_layers_unused" if method == "ilm" else "pn_layers_unused"] = grads.unused
    rec["grad_nonfinite"] = grads.nonfinite[:5]
    rec["backward_ok"] = grads.ok

    # ---- save -> load, exact (float32, as a checkpoint is used)
    clock.enter("save-load")

    def rebuild() -> nn.Module:
        # the unconverted architecture without the (slow, overwritten) random init
        with checks.no_init():
            return checks.build(f"{library}:{name}", rec["input_kwargs"])

    rec["save_load_exact"], args32 = checks.check_save_load(model, args, task, rebuild=rebuild, device=device)

    if extras:
        clock.enter("extras")
        rec["extras"] = checks.compile_fx_export(original, model, *args32)

    verdict(rec)


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


def _timed_convert(model: nn.Module, rec: dict, **kwargs) -> None:
    """``ilmconvert.convert`` with its wall time and report recorded in ``rec``."""
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
    """(model, args, outputs): the network built with the first of :func:`attempts` whose forward
    runs, its positional arguments and its outputs; the input used is recorded in ``rec``."""
    model = args = before = dtype = None
    kwargs_built = None
    errors: list[str] = []
    for kwargs, shape in attempts(library, name):
        try:
            if kwargs != kwargs_built:
                model = None  # free the previous network before building the next
                model, dtype = _build_for_probe(f"{library}:{name}", kwargs, device, float32_only, rec)
                kwargs_built = kwargs
            args, before, dtype = _probe_forward(model, task, shape, dtype, device, f"{kwargs} {shape}", errors)
            if before:
                rec["input_kwargs"], rec["input_shape"], rec["dtype"] = kwargs, list(shape), str(dtype)[6:]
                break
        except Exception as err:  # noqa: BLE001
            errors.append(f"{kwargs} {shape}: {first_line(err)}")
            kwargs_built = None
    if not before:
        raise RuntimeError("no input size runs the original network: " + " | ".join(errors[-3:]))
    return model, args, before


def _build_for_probe(spec: str, kwargs: dict, device: str, float32_only: bool, rec: dict) -> tuple:
    """(model, dtype): the network (seed 0, random norm affines) in eval mode, cast to float64 unless
    ``float32_only`` or the cast fails; the build time goes to ``rec``."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = checks.build(spec, kwargs).to(device).eval()
    rec["build_s"] = time.perf_counter() - t0
    checks.randomize_norm_affines(model)  # preservation is not 1 * x + 0
    dtype = torch.float32 if float32_only else torch.float64
    try:
        model.to(dtype)
    except Exception:  # noqa: BLE001
        dtype = torch.float32
    return model, dtype


def _probe_forward(model, task: str, shape: tuple[int, ...], dtype, device: str, label: str, errors: list) -> tuple:
    """(args, outputs, dtype): one seed-0 input of ``shape`` run through ``model`` in ``dtype``, falling
    back from float64 to float32; outputs is None (and each failure is in ``errors``) when neither runs."""
    gen = torch.Generator().manual_seed(0)
    args = None
    for dt in ((dtype, torch.float32) if dtype == torch.float64 else (torch.float32,)):
        try:
            model.to(dt)
            args = checks.make_inputs(task, shape, gen, dt, device)
            return args, checks.forward_outputs(model, args, task), dt
        except Exception as err:  # noqa: BLE001
            errors.append(f"{label} {dt}: {first_line(err)}")
    return args, None, dtype


def verdict(rec: dict) -> None:
    """``status`` ok / fail from the checks in ``rec``, and the reason for a failure: rel. diff
    <= 1e-10 in float64 (1e-4 in float32), finite outputs, train step, exact save -> load."""
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


def _report_fields(rec: dict, report) -> None:
    rec["converted"] = len(report.converted) + sum(len(c.aliases) for c in report.converted)
    rec["converted_by_class"] = dict(Counter(c.source for c in report.converted))
    skipped = Counter((s.source, s.reason) for s in report.skipped)
    rec["skipped"] = [{"source": s, "reason": r, "count": n} for (s, r), n in skipped.items()]
    rec["params_before"], rec["params_after"] = report.params_before, report.params_after
    rec["increase_pct"] = report.increase_percent


# ------------------------------------------------------------------------------------ Proxy Norm
def _proxy_stops_on_meta(meta, rec: dict, clock: _StageClock) -> bool:
    """Proxy Norm on the meta-device network (cheap): True, with the status in ``rec``, when the
    architecture has no GroupNorm / LayerNorm (``no_gn_ln``) or no norm -> activation pair
    (``no_pair``, with every norm's reason); else its report is in ``rec`` and the checks go on."""
    if not any(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in meta.modules()):
        rec["status"] = "no_gn_ln"
        return True
    clock.enter("meta-convert")
    try:
        _timed_convert(meta, rec, method="proxy")
    except ilmconvert.ConversionError as err:
        rec["status"] = "no_pair"
        rec["no_pair_reason"] = first_line(err)
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
    from ilmconvert import swap_module
    from ilmconvert.convert import proxy_mapping
    from ilmconvert.nn import UnsupportedNormError
    from ilmconvert.pairing import find_activation_pairs

    mapping = proxy_mapping()
    pairing = find_activation_pairs(model, tuple(t for t, a in mapping.items() if a.needs_activation))
    out = Counter()
    for m in model.modules():
        if not isinstance(m, INSTANCE_NORMS):
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
        out[(class_path(type(m)), reason[:300])] += 1
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
