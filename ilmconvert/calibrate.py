"""Calibration: fit the layers that replaced BatchNorm so the network reproduces the original.

``convert(model, batchnorm="gn")`` replaces BatchNorm's standardization by GroupNorm's and keeps
BN's affine, which throws away what BN's running statistics encoded. :func:`calibrate` takes the
converted network, the original and unlabeled images and fits the new layers' parameters in two
stages (docs/calibration.md):

1. **Closed form, in forward order, in one pass over the images.** For every replaced layer the
   target is the original's BatchNorm output (before its activation) and the regressor the
   GroupNorm-standardized input *of the converted network*, so each layer is fit on inputs that
   arrive through the layers already fitted. Per channel the affine ``(w, b)`` minimizing
   ``sum (w z + b - t)^2`` follows from five running sums. They are accumulated over micro-batches:
   both networks run on a micro-batch, and a forward pre-hook on each new layer adds the
   micro-batch's sums and sets the layer's affine to the least-squares solution of everything seen
   so far *before* the layer runs, so the layers after it see the refit output. The sums come
   from per-(sample, channel) moments of ``x`` and ``t`` (mean, biased variance, covariance),
   combined per group exactly as GroupNorm groups them, so every group count G (``groups="auto"``:
   every divisor of C) is scored on the same pass at the cost of ``(B, C)`` tensors; the G with
   the smallest fit error (``1 - R^2`` over the layer's channels) is used.
2. **Distillation.** The new layers' parameters (affine; for ILM also W1..W3; for Proxy Norm also
   the proxy and output affines), and by default nothing else (``train="all"``: every parameter),
   are trained with Adam on :func:`distillation_loss` (tempered KL of the logits plus the layers'
   relative output error), in eval mode (no dropout, batch-independent), seeded, for ``epochs`` or
   until ``time_budget`` seconds have passed.

The report gives, on held-out images that the fit never sees, the relative output change
``||f' - f|| / ||f||`` (Frobenius norm over all held-out logits) and the top-1 agreement with the
original, before calibration, after the closed form and after distillation, and each layer's fit
error and chosen G.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .calibration_images import CalibrationError, as_batches
from .nn import ILMProxyGroupNormAct, ProxyNormAct

STAGES = ("before", "closed_form", "distilled")


@dataclass
class StageFigures:
    """Held-out figures of one stage: ``relative_change = ||f' - f||_F / ||f||_F`` over all held-out
    outputs, ``top1_agreement`` the fraction of held-out images whose arg-max class is the original's."""

    relative_change: float
    top1_agreement: float


@dataclass
class LayerFit:
    """One calibrated layer: its G and the closed-form fit error ``1 - R^2`` (residual over total
    sum of squares of the original BN output, summed over channels, on the fit images).

    ``fit_error`` is measured on the inputs that arrive through the converted layers before it (what
    the network computes); ``isolated_error`` on the original network's own input to that BN, at
    its best G: what GroupNorm standardization with a per-channel affine cannot reproduce at that
    layer even with exact inputs (the layer's own limit, errors upstream aside).
    """

    name: str
    channels: int
    groups: int
    fit_error: float
    isolated_error: float = math.nan


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did and measured (stored in a checkpoint's ``config.json``); ``seconds``:
    wall time per stage (``reference``: the original on the held-out images, 0 when given;
    ``before``, ``closed_form_heldout``, ``distilled_heldout``: the held-out evaluations;
    ``closed_form``, ``distillation``: the two stages)."""

    images_fit: int
    images_heldout: int
    stages: dict[str, StageFigures] = field(default_factory=dict)
    layers: list[LayerFit] = field(default_factory=list)
    distillation: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    heldout_indices: list[int] | None = None

    def worst_layers(self, count: int = 5) -> list[LayerFit]:
        """The ``count`` layers with the largest fit error, largest first."""
        return sorted(self.layers, key=lambda layer: -layer.fit_error)[:count]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (without ``heldout_indices``), with ``worst_layers``."""
        out = asdict(self)
        out.pop("heldout_indices")
        out["worst_layers"] = [asdict(layer) for layer in self.worst_layers()]
        return out


# ------------------------------------------------------------------------------------- layers
@dataclass
class _Sums:
    """Running sums of the least-squares fit, per channel: ``t``, ``tt`` and, per candidate G,
    ``z{G}``, ``zz{G}``, ``zt{G}`` (float64 ``(C,)``); ``count`` = values per channel."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: float = 0.0


@dataclass
class _Layer:
    """A layer to calibrate: the new module, the original BatchNorm and the running sums."""

    name: str
    new: nn.Module
    bn: _BatchNorm
    candidates: list[int]
    targets: list[torch.Tensor] = field(default_factory=list)
    sums: _Sums = field(default_factory=lambda: _Sums())
    isolated: _Sums = field(default_factory=lambda: _Sums())
    groups: int = 0
    fit_error: float = math.nan

    def isolated_error(self) -> float:
        return min(_solve(self.isolated, g)[2] for g in self.candidates) if self.isolated.count else math.nan


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _candidates(channels: int, groups: str | int | None, current: int) -> list[int]:
    if groups in (None, "keep"):
        return [current]
    if groups == "auto":
        return _divisors(channels)
    wanted = int(groups)
    return [max(d for d in _divisors(channels) if d <= max(wanted, 1))]


def calibrated_layers(model: nn.Module, original: nn.Module, groups: str | int | None = "auto") -> list[_Layer]:
    """The layers of ``model`` that replaced a BatchNorm of ``original``, in the conversion's order.

    Raises:
        CalibrationError: ``model`` was not converted with ``batchnorm="gn"`` and ``init="preserve"``,
            or a replaced module has no affine or group count to fit.
    """
    report = getattr(model, "ilm_conversion", None)
    rows = [r for r in getattr(report, "converted", []) if r.function_changing]
    if not rows:
        raise CalibrationError(
            "nothing to calibrate: the network has no layer that replaced a BatchNorm; convert it with "
            "batchnorm='gn' (CLI: --batchnorm gn)"
        )
    if report.settings.get("init", "preserve") != "preserve":
        raise CalibrationError(
            "calibration fits preserve-initialized layers (W2 = W3 = 0); convert with init='preserve'"
        )
    layers = []
    for row in rows:
        new, bn = model.get_submodule(row.name), original.get_submodule(row.name)
        if not isinstance(bn, _BatchNorm) or bn.running_mean is None:
            raise CalibrationError(f"{row.name}: the original is not a BatchNorm with running statistics")
        if getattr(new, "weight", None) is None or not hasattr(new, "num_groups"):
            raise CalibrationError(f"{row.name}: {type(new).__name__} has no affine and group count to fit")
        layers.append(_Layer(row.name, new, bn, _candidates(bn.num_features, groups, new.num_groups)))
    return layers


def _bn_output(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm's eval output before any activation (timm's BatchNormAct2d included)."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _channel_moments(x: torch.Tensor, t: torch.Tensor, target: tuple | None = None) -> tuple:
    """Per (sample, channel): means and biased variances of ``x`` and ``t`` and their covariance,
    over the positions, returned in float64; and the number of positions. Centred two-pass sums in
    the input's dtype (float32 reductions are pairwise), so the float64 cast touches ``(B, C)``
    tensors only; ``target``: ``t``'s ``(mean, variance, centred t)`` when already computed."""
    b, c = x.shape[:2]
    x = x.detach().reshape(b, c, -1)
    xm = x.mean(-1)
    xc = x - xm[..., None]
    tm, tv, tc = target if target is not None else _target_moments(t)
    cov = (xc * tc).mean(-1)
    xv = xc.square().mean(-1)
    return xm.double(), xv.double(), tm.double(), tv.double(), cov.double(), x.shape[-1]


def _target_moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``t``'s per-(sample, channel) mean and biased variance over the positions, and ``t`` centred."""
    t = t.detach().reshape(*t.shape[:2], -1)
    tm = t.mean(-1)
    tc = t - tm[..., None]
    return tm, tc.square().mean(-1), tc


def _accumulate(layer: _Layer, into: _Sums, x: torch.Tensor, t: torch.Tensor, target: tuple | None = None) -> None:
    """Add one micro-batch's sums for every candidate G (GroupNorm's grouping of the moments)."""
    xm, xv, tm, tv, cov, positions = _channel_moments(x, t, target)
    eps = float(getattr(layer.new, "norm_eps", getattr(layer.new, "eps", 1e-5)))
    b, c = xm.shape
    sums = into.sums
    sums["t"] = sums.get("t", 0) + positions * tm.sum(0)
    sums["tt"] = sums.get("tt", 0) + positions * (tv + tm**2).sum(0)
    for g in layer.candidates:
        mg = xm.reshape(b, g, -1).mean(-1, keepdim=True)
        vg = (xv.reshape(b, g, -1) + (xm.reshape(b, g, -1) - mg) ** 2).mean(-1, keepdim=True)
        r = torch.rsqrt(vg + eps).expand(b, g, c // g).reshape(b, c)
        d = xm - mg.expand(b, g, c // g).reshape(b, c)
        sums[f"z{g}"] = sums.get(f"z{g}", 0) + positions * (r * d).sum(0)
        sums[f"zz{g}"] = sums.get(f"zz{g}", 0) + positions * (r**2 * (xv + d**2)).sum(0)
        sums[f"zt{g}"] = sums.get(f"zt{g}", 0) + positions * (r * (cov + d * tm)).sum(0)
    into.count += b * positions


def _solve(into: _Sums, g: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Least-squares ``(w, b)`` per channel for G = ``g`` and the layer's fit error ``1 - R^2``."""
    s, n = into.sums, into.count
    mz, mt = s[f"z{g}"] / n, s["t"] / n
    var_z = (s[f"zz{g}"] / n - mz**2).clamp_min(0)
    cov = s[f"zt{g}"] / n - mz * mt
    var_t = (s["tt"] / n - mt**2).clamp_min(0)
    usable = var_z > 1e-12
    w = torch.where(usable, cov / var_z.where(usable, torch.ones_like(var_z)), torch.zeros_like(cov))
    b = mt - w * mz
    residual = (var_t - w * cov).clamp_min(0)
    total = float(var_t.sum())
    return w, b, float(residual.sum()) / total if total > 0 else 0.0


@torch.no_grad()
def set_affine(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Give a layer that replaced a BatchNorm the pre-activation affine ``(weight, bias)``, each ``(C,)``.

    ILM layers at preserve init (W2 = W3 = 0) and plain GroupNorm compute ``w x_hat + b`` with
    ``weight``, ``bias`` as given; Proxy Norm layers also get the output affine that undoes the
    proxy normalization at the new affine (their ``init_preserve``), so they compute
    ``phi(w x_hat + b)``. ILM + PN keeps its encoder W1.
    """
    weight, bias = weight.to(layer.weight), bias.to(layer.weight)
    if isinstance(layer, ProxyNormAct):
        layer.init_preserve(weight, bias)
    elif isinstance(layer, ILMProxyGroupNormAct):
        encoder = layer.encoder.weight.clone()
        layer.init_preserve(weight, bias)
        layer.encoder.weight.copy_(encoder)
    else:
        layer.weight.copy_(weight)
        if layer.bias is not None:
            layer.bias.copy_(bias)


def _refit(layer: _Layer) -> None:
    """Pick the best G on the sums so far and set the layer's G and affine."""
    fits = {g: _solve(layer.sums, g) for g in layer.candidates}
    best = min(layer.candidates, key=lambda g: fits[g][2])
    layer.groups, layer.fit_error = best, fits[best][2]
    layer.new.num_groups = best
    set_affine(layer.new, fits[best][0], fits[best][1])


def closed_form(
    model: nn.Module, original: nn.Module, layers: list[_Layer], images: torch.Tensor, micro_batch: int, progress: Any
) -> torch.Tensor:
    """Stage 1 (module docstring) in one pass over ``images``; returns the original's outputs on them."""
    handles = []
    for layer in layers:

        def capture(module: nn.Module, args: tuple, layer: _Layer = layer) -> None:
            t = _bn_output(module, args[0])
            layer.targets.append(_target_moments(t))
            _accumulate(layer, layer.isolated, args[0], t, layer.targets[-1])

        def fit(module: nn.Module, args: tuple, layer: _Layer = layer) -> None:
            _accumulate(layer, layer.sums, args[0], None, layer.targets.pop(0))
            _refit(layer)

        handles += [layer.bn.register_forward_pre_hook(capture), layer.new.register_forward_pre_hook(fit)]
    reference = []
    task = progress.add_task("closed-form fit", total=len(images)) if progress else None
    try:
        with torch.no_grad():
            for start in range(0, len(images), micro_batch):
                x = images[start : start + micro_batch]
                reference.append(original(x).detach())
                model(x)
                for layer in layers:
                    layer.targets.clear()
                if progress:
                    progress.advance(task, len(x))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(reference)


# ------------------------------------------------------------------------------------- distillation
TRAINED = {
    "norms": "the new layers' parameters only (affine; ILM W1..W3; Proxy Norm proxy / output affines)",
    "all": "every parameter of the converted network (convolutions, classifier and the new layers)",
}


def distilled_parameters(
    layers: list[_Layer], model: nn.Module | None = None, train: str = "norms"
) -> list[nn.Parameter]:
    """The parameters distillation trains (:data:`TRAINED`): for ``train="norms"`` every parameter
    of the new layers except their activation's and dropout's (affine; ILM's W1..W3; Proxy Norm's
    proxy and output affines); for ``train="all"`` every parameter of ``model``.

    Raises:
        CalibrationError: ``train`` is neither, or ``"all"`` without ``model``.
    """
    if train not in TRAINED:
        raise CalibrationError(f"distillation trains 'norms' or 'all', not {train!r}")
    if train == "all":
        if model is None:
            raise CalibrationError("train='all' needs the model whose parameters to train")
        return list(model.parameters())
    seen: dict[int, nn.Parameter] = {}
    for layer in layers:
        for name, p in layer.new.named_parameters():
            if not name.startswith(("act.", "drop.")):
                seen.setdefault(id(p), p)
    return list(seen.values())


def _gradient_norms(layers: list[_Layer], model: nn.Module | None = None) -> dict[str, float]:
    """Norm of the current gradient per kind of trained parameter (``affine``, ``encoder`` W1,
    ``decoders`` W2 / W3, ``proxy``; with ``model``, ``network``: its other parameters): shows which
    of them distillation actually moves."""
    kinds: dict[str, float] = {}
    if model is not None:
        own = {id(p) for layer in layers for p in layer.new.parameters()}
        rest = [p for p in model.parameters() if p.grad is not None and id(p) not in own]
        if rest:
            kinds["network"] = sum(float(p.grad.double().square().sum()) for p in rest)
    for layer in layers:
        for name, p in layer.new.named_parameters():
            if p.grad is None or name.startswith(("act.", "drop.")):
                continue
            kind = (
                "encoder"
                if name.startswith("encoder.")
                else "decoders"
                if name.startswith("decoder")
                else "affine"
                if name in ("weight", "bias")
                else "proxy"
            )
            kinds[kind] = kinds.get(kind, 0.0) + float(p.grad.double().square().sum())
    return {kind: math.sqrt(v) for kind, v in sorted(kinds.items())}


def distillation_loss(
    out: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    features: list[tuple[torch.Tensor, torch.Tensor]],
    feature_weight: float,
) -> torch.Tensor:
    """``T^2 KL(softmax(target / T) || softmax(out / T))`` (Hinton et al. 2015, logits ``(B, classes)``)
    plus ``feature_weight`` times the mean over layers of ``||s - t||^2 / ||t||^2`` for each pair of
    a new layer's output ``s`` and the original BatchNorm module's output ``t`` (activation included
    where the module has one)."""
    log_p = F.log_softmax(out / temperature, -1)
    log_q = F.log_softmax(target / temperature, -1)
    loss = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2
    if features and feature_weight > 0:
        matched = sum((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12) for s, t in features)
        loss = loss + feature_weight * matched / len(features)
    return loss


def _feature_hooks(layers: list[_Layer], student: list, teacher: list) -> list:
    """Hooks appending each new layer's output to ``student`` and each original BN module's output
    (detached) to ``teacher``, in forward order."""
    handles = []
    for layer in layers:
        handles.append(layer.new.register_forward_hook(lambda m, a, out: student.append(out)))
        handles.append(layer.bn.register_forward_hook(lambda m, a, out: teacher.append(out.detach())))
    return handles


def distill(
    model: nn.Module,
    layers: list[_Layer],
    images: torch.Tensor,
    reference: torch.Tensor,
    *,
    original: nn.Module | None = None,
    epochs: int,
    time_budget: float,
    batch_size: int,
    lr: float,
    temperature: float = 2.0,
    feature_weight: float = 1.0,
    seed: int,
    progress: Any,
    train: str = "norms",
) -> dict[str, Any]:
    """Stage 2 (module docstring): Adam with a cosine schedule from ``lr`` to 0 over ``epochs``, on
    :func:`distillation_loss` (logits against the cached ``reference``; the feature term runs
    ``original`` once per step without gradient, when given and ``feature_weight > 0``), training
    :func:`distilled_parameters` (``train``). Returns steps, epochs, seconds, whether time cut it
    short and the first step's gradient norms."""
    params = distilled_parameters(layers, model, train)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in {id(q) for q in params})
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / total)))
    generator = torch.Generator().manual_seed(seed)
    task = progress.add_task("distillation", total=total) if progress else None
    use_features = original is not None and feature_weight > 0
    student: list[torch.Tensor] = []
    teacher: list[torch.Tensor] = []
    handles = _feature_hooks(layers, student, teacher) if use_features else []
    start, steps, stopped, gradients = time.perf_counter(), 0, False, {}
    model.eval()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for i in range(steps_per_epoch):
                if time.perf_counter() - start > time_budget:
                    stopped = True
                    break
                index = order[i * batch_size : (i + 1) * batch_size]
                student.clear()
                teacher.clear()
                if use_features:
                    with torch.no_grad():
                        original(images[index])
                out = model(images[index])
                loss = distillation_loss(
                    out, reference[index], temperature, list(zip(student, teacher)), feature_weight
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if steps == 0:
                    gradients = _gradient_norms(layers, model if train == "all" else None)
                optimizer.step()
                schedule.step()
                steps += 1
                if progress:
                    progress.advance(task)
            if stopped:
                break
    finally:
        student.clear()
        teacher.clear()
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    return {
        "steps": steps,
        "epochs_completed": steps / steps_per_epoch,
        "seconds": round(time.perf_counter() - start, 1),
        "stopped_by_time_budget": stopped,
        "parameters": sum(p.numel() for p in params),
        "trained": TRAINED[train],
        "objective": f"T^2 KL(T={temperature}) on logits"
        + (f" + {feature_weight} x mean relative squared error of the layer outputs" if use_features else ""),
        "first_step_gradient_norms": gradients,
    }


# ------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def outputs(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``model``'s outputs on ``images`` in eval mode (restoring its mode), batch by batch."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(images[i : i + batch_size]).detach() for i in range(0, len(images), batch_size)])
    finally:
        model.train(was)


def figures(out: torch.Tensor, reference: torch.Tensor) -> StageFigures:
    """Relative output change and top-1 agreement of ``out`` against ``reference`` (both ``(N, classes)``)."""
    change = float((out.double() - reference.double()).norm() / reference.double().norm())
    agreement = float((out.argmax(-1) == reference.argmax(-1)).double().mean())
    return StageFigures(change, agreement)


def split_heldout(count: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(count)`` into (fit, held-out) indices, at least one of each.

    Raises:
        CalibrationError: fewer than 2 images.
    """
    if count < 2:
        raise CalibrationError(f"calibration needs at least 2 images (fit and held out), got {count}")
    held = min(count - 1, max(1, round(count * fraction)))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[held:].sort().values, order[:held].sort().values


def calibrate(
    model: nn.Module,
    original: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    heldout: torch.Tensor | Iterable[torch.Tensor] | None = None,
    heldout_fraction: float = 0.125,
    heldout_reference: torch.Tensor | None = None,
    groups: str | int | None = "auto",
    epochs: int = 4,
    time_budget: float = 300.0,
    batch_size: int = 32,
    micro_batch: int = 16,
    lr: float = 1e-3,
    temperature: float = 2.0,
    feature_weight: float = 1.0,
    seed: int = 0,
    progress: Any = None,
    train: str = "norms",
) -> CalibrationReport:
    """Fit ``model``'s layers that replaced BatchNorm so that it reproduces ``original`` (in place).

    Args:
        model: the network converted with ``batchnorm="gn"`` (any method: ``ilm``, ``proxy``,
            ``ilm+proxy``, ``none`` for plain GroupNorm), float32 or float64, on ``original``'s device.
        original: the network before conversion (BatchNorm with running statistics), unchanged.
        images: preprocessed images ``(N, C, H, W)``, or an iterable of such batches (or of
            ``(images, labels)``); see :func:`ilmconvert.calibration_images.load_images`.
        heldout: images to measure on; by default ``heldout_fraction`` of ``images`` is split off
            (seeded) and never used in the fit.
        heldout_reference: ``original``'s outputs on ``heldout``, when already computed.
        groups: ``"auto"`` (each layer's G among the divisors of C, by fit error), a number (the
            largest divisor of C not above it), or ``None`` (keep each layer's G).
        epochs: distillation epochs over the fit images (0: closed form only).
        time_budget: distillation stops after this many seconds (wall clock).
        batch_size: distillation batch size; micro_batch: closed-form micro-batch size.
        lr: Adam's peak learning rate for distillation (cosine schedule to 0 over ``epochs``).
        temperature: the KL term's temperature T; feature_weight: weight of the layer-output term
            (0: logits only, no extra forward pass of ``original`` per step).
        seed: seed of the split and of the distillation order.
        train: what distillation trains: ``"norms"`` (the new layers' parameters) or ``"all"``
            (every parameter: fine-tuning towards the original's outputs; :data:`TRAINED`).
        progress: where to show progress, e.g. a started ``rich.progress.Progress`` (anything with
            ``add_task(description, total=)`` and ``advance(task, amount)``); None: silent.

    Returns:
        The :class:`CalibrationReport` (also stored as ``model.ilm_calibration``); the conversion
        report's rows get each layer's chosen G (``norm_groups``), which :func:`ilmconvert.load`
        restores.

    Raises:
        CalibrationError: nothing to calibrate, too few images, bad settings.
    """
    if train not in TRAINED:
        raise CalibrationError(f"distillation trains 'norms' or 'all', not {train!r}")
    data = as_batches(images)
    heldout_indices = None
    if heldout is None:
        fit_index, held_index = split_heldout(len(data), heldout_fraction, seed)
        fit_images, held_images = data[fit_index], data[held_index]
        heldout_indices = held_index.tolist()
    else:
        fit_images, held_images = data, as_batches(heldout)
    param = next(model.parameters())
    fit_images, held_images = (t.to(param.device, param.dtype) for t in (fit_images, held_images))
    layers = calibrated_layers(model, original, groups)
    original.eval()
    report = CalibrationReport(len(fit_images), len(held_images), heldout_indices=heldout_indices)
    report.settings = {
        "groups": groups,
        "epochs": epochs,
        "time_budget": time_budget,
        "batch_size": batch_size,
        "micro_batch": micro_batch,
        "lr": lr,
        "temperature": temperature,
        "feature_weight": feature_weight,
        "seed": seed,
        "train": train,
    }
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report.seconds[stage] = round(now - clock, 1)
        clock = now

    reference = heldout_reference if heldout_reference is not None else outputs(original, held_images)
    lap("reference")
    report.stages["before"] = figures(outputs(model, held_images), reference)
    lap("before")
    was = model.training
    model.eval()
    fit_reference = closed_form(model, original, layers, fit_images, micro_batch, progress)
    lap("closed_form")
    report.stages["closed_form"] = figures(outputs(model, held_images), reference)
    lap("closed_form_heldout")
    report.layers = [
        LayerFit(layer.name, layer.bn.num_features, layer.groups, layer.fit_error, layer.isolated_error())
        for layer in layers
    ]
    if epochs > 0:
        report.distillation = distill(
            model,
            layers,
            fit_images,
            fit_reference,
            original=original,
            epochs=epochs,
            time_budget=time_budget,
            batch_size=batch_size,
            lr=lr,
            temperature=temperature,
            feature_weight=feature_weight,
            seed=seed,
            progress=progress,
            train=train,
        )
        lap("distillation")
        report.stages["distilled"] = figures(outputs(model, held_images), reference)
        lap("distilled_heldout")
    model.train(was)
    rows = {row.name: row for row in model.ilm_conversion.converted}
    for layer in layers:
        rows[layer.name].norm_groups = layer.groups
    model.ilm_calibration = report
    return report
