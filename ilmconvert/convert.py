"""Model surgery: replace a network's instance-level norms by ILM layers, in place.

The pattern is ``torch.ao.quantization.convert``: an explicit registry maps each *exact* source
class to an ILM class with a ``from_norm`` constructor; the walker knows nothing about particular
norms. Classes that merely subclass ``nn.GroupNorm`` / ``nn.LayerNorm`` / ``_InstanceNorm`` may
override ``forward`` with other semantics, so they are skipped and reported, never guessed at.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .errors import IlmconvertError
from .nn import (
    ILMGroupNorm,
    ILMGroupNormAct,
    ILMInstanceNorm,
    ILMLayerNorm,
    ILMLayerNormAct,
    ILMNorm,
    UnsupportedNormError,
)
from .nn.core import INITS

#: Norm kinds a user can select (``norms=``), with their long names.
NORM_KINDS: dict[str, str] = {"gn": "GroupNorm", "in": "InstanceNorm", "ln": "LayerNorm"}
BATCHNORM_MODES: tuple[str, ...] = ("gn",)


class ConversionError(IlmconvertError):
    """The conversion cannot proceed (bad settings, or nothing to convert)."""


@dataclass(frozen=True)
class NormAdapter:
    """How to convert one exact source class.

    Attributes:
        kind: ``"gn"``, ``"in"``, ``"ln"`` or ``"bn"`` (BatchNorm, opt-in, function-changing).
        target: the ILM class; its ``from_norm(module, init=, key_group_size=, reduction=,
            **layout)`` builds the replacement.
        layout: extra keyword arguments for ``from_norm`` (e.g. ``channels_first=True``).
    """

    kind: str
    target: type[ILMNorm]
    layout: dict[str, Any] = field(default_factory=dict)

    @property
    def function_changing(self) -> bool:
        return self.kind == "bn"


REGISTRY: dict[type[nn.Module], NormAdapter] = {}


def register(source: type[nn.Module], kind: str, target: type[ILMNorm], **layout: Any) -> None:
    """Register ``source`` (matched by exact type) to be converted to ``target``.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    if kind not in (*NORM_KINDS, "bn"):
        raise ValueError(f"kind must be one of {', '.join((*NORM_KINDS, 'bn'))}; got {kind!r}")
    REGISTRY[source] = NormAdapter(kind, target, dict(layout))


def _register_defaults() -> None:
    register(nn.GroupNorm, "gn", ILMGroupNorm)
    for cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        register(cls, "in", ILMInstanceNorm)
    register(nn.LayerNorm, "ln", ILMLayerNorm)
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        register(cls, "bn", ILMGroupNorm)

    from timm.layers import norm as timm_norm
    from timm.layers import norm_act as timm_norm_act

    register(timm_norm.GroupNorm, "gn", ILMGroupNorm)
    register(timm_norm.GroupNorm1, "gn", ILMGroupNorm)
    register(timm_norm.LayerNorm, "ln", ILMLayerNorm)
    register(timm_norm.LayerNorm2d, "ln", ILMLayerNorm, channels_first=True)
    register(timm_norm_act.GroupNormAct, "gn", ILMGroupNormAct)
    register(timm_norm_act.GroupNorm1Act, "gn", ILMGroupNormAct)
    register(timm_norm_act.LayerNormAct, "ln", ILMLayerNormAct)
    register(timm_norm_act.LayerNormAct2d, "ln", ILMLayerNormAct, channels_first=True)
    register(timm_norm_act.BatchNormAct2d, "bn", ILMGroupNormAct)

    # timm's *Fp32 norms: statistics, standardization and affine in float32, output in x.dtype.
    from .nn.layers import ILMLayerNormActFp32, ILMLayerNormFp32

    register(timm_norm.LayerNormFp32, "ln", ILMLayerNormFp32)
    register(timm_norm.LayerNorm2dFp32, "ln", ILMLayerNormFp32, channels_first=True)
    register(timm_norm_act.LayerNormActFp32, "ln", ILMLayerNormActFp32)
    register(timm_norm_act.LayerNormAct2dFp32, "ln", ILMLayerNormActFp32, channels_first=True)

    # metaformer (PoolFormer v2, ConvFormer, CAFormer): weight but no bias (``self.bias = None``),
    # eps set as an attribute; B_beta is then absent and beta = D_mu (0 at preserve init).
    from timm.models import metaformer as timm_metaformer

    register(timm_metaformer.GroupNorm1NoBias, "gn", ILMGroupNorm)
    register(timm_metaformer.LayerNorm2dNoBias, "ln", ILMLayerNorm, channels_first=True)
    register(timm_metaformer.LayerNormNoBias, "ln", ILMLayerNorm)

    from torchvision.models import convnext as tv_convnext

    register(tv_convnext.LayerNorm2d, "ln", ILMLayerNorm, channels_first=True)


_register_defaults()


@dataclass
class ConvertedModule:
    """One replaced module (``aliases``: its other names when the object is shared)."""

    name: str
    source: str
    target: str
    channels: int
    norm_groups: int
    key_group_size: int
    num_key_groups: int
    embedding_size: int
    params_added: int
    function_changing: bool = False
    key_group_size_adjusted: bool = False
    aliases: list[str] = field(default_factory=list)


@dataclass
class SkippedModule:
    """A norm-like module left as it is, and why."""

    name: str
    source: str
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert` did: every converted and skipped module and the parameter totals.

    ``increase_percent`` is ``100 * (params_after - params_before) / params_before``, the figure
    of the paper's Table 8.
    """

    settings: dict[str, Any]
    converted: list[ConvertedModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def params_added(self) -> int:
        return self.params_after - self.params_before

    @property
    def increase_percent(self) -> float:
        return 100.0 * self.params_added / self.params_before if self.params_before else 0.0

    @property
    def function_changing(self) -> bool:
        """True when a converted module (BatchNorm) no longer computes the original function."""
        return any(c.function_changing for c in self.converted)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (also stored in a checkpoint's ``config.json``)."""
        out = asdict(self)
        out["params_added"] = self.params_added
        out["increase_percent"] = self.increase_percent
        out["function_changing"] = self.function_changing
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionReport:
        return cls(
            settings=dict(data["settings"]),
            converted=[ConvertedModule(**c) for c in data.get("converted", [])],
            skipped=[SkippedModule(**s) for s in data.get("skipped", [])],
            params_before=int(data.get("params_before", 0)),
            params_after=int(data.get("params_after", 0)),
        )


def _qualified_class(obj: nn.Module) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _normalize_norms(norms: str | Iterable[str]) -> tuple[str, ...]:
    items = norms.split(",") if isinstance(norms, str) else list(norms)
    out = tuple(dict.fromkeys(s.strip().lower() for s in items if s.strip()))
    bad = [s for s in out if s not in NORM_KINDS]
    if bad or not out:
        raise ConversionError(
            f"unknown norm kind {', '.join(bad) or '(none)'}; choose from {', '.join(NORM_KINDS)}"
        )
    return out


def _matches(names: Sequence[str], patterns: Sequence[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns or ())


def _is_norm_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm, _InstanceNorm, _BatchNorm))


def _skip_reason(adapter: NormAdapter | None, module: nn.Module, norms: tuple[str, ...], batchnorm: str | None) -> str | None:
    """Why a norm-like module is not converted, or None when it is selected."""
    if adapter is None:
        return (
            f"{type(module).__name__} is not in the registry (a subclass may override forward with "
            "other semantics); register it with ilmconvert.convert.register to convert it"
        )
    if adapter.kind == "bn":
        if batchnorm is None:
            return "BatchNorm is batch-level, not instance-level; opt in with --include-batchnorm (API: batchnorm='gn'), which changes the function"
        return None
    if adapter.kind not in norms:
        return f"{NORM_KINDS[adapter.kind]} not selected (norms={','.join(norms)})"
    return None


def convert(
    model: nn.Module,
    norms: str | Iterable[str] = ("gn", "in", "ln"),
    init: str = "preserve",
    key_group_size: int = 16,
    reduction: int = 16,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    batchnorm: str | None = None,
) -> ConversionReport:
    """Replace the instance-level norms of ``model`` by ILM layers, in place.

    Every module whose exact class is in :data:`REGISTRY` and whose kind is selected is replaced
    by ``adapter.target.from_norm(module, ...)``; the new module keeps the old one's device,
    dtype, ``training`` flag and forward (pre-)hooks. A module object used at several places is
    converted once and stays shared. The report is also stored as ``model.ilm_conversion``.

    Args:
        model: the network; modified in place.
        norms: which kinds to convert, from ``"gn"``, ``"in"``, ``"ln"`` (or ``"gn,ln"``).
        init: ``"preserve"`` (same function as the original, DESIGN.md §2) or ``"paper"``.
        key_group_size: K, channels per key group (eq. 3).
        reduction: r in ``M = max(2, N // r)``.
        include: qualified-name glob patterns (``fnmatch``, e.g. ``"stages.3.*"``); when given,
            only matching modules are converted.
        exclude: qualified-name glob patterns of modules to leave alone.
        batchnorm: ``None`` (BatchNorm is left alone) or ``"gn"``: convert BatchNorm1d/2d/3d and
            timm's BatchNormAct2d to ILM over GroupNorm standardization (32 groups or the largest
            divisor of C not above 32). This changes the function: fine-tune afterwards.

    Returns:
        The :class:`ConversionReport`.

    Raises:
        ConversionError: for bad settings, or when no module is converted (the message lists
            what was found and why it was skipped).
    """
    kinds = _normalize_norms(norms)
    if init not in INITS:
        raise ConversionError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if batchnorm is not None and batchnorm not in BATCHNORM_MODES:
        raise ConversionError(f"batchnorm must be None or one of {', '.join(BATCHNORM_MODES)}; got {batchnorm!r}")
    if key_group_size < 1 or reduction < 1:
        raise ConversionError(f"key_group_size ({key_group_size}) and reduction ({reduction}) must be >= 1")

    settings = {
        "norms": list(kinds),
        "init": init,
        "key_group_size": key_group_size,
        "reduction": reduction,
        "include": list(include) if include else None,
        "exclude": list(exclude) if exclude else None,
        "batchnorm": batchnorm,
    }
    report = ConversionReport(settings=settings, params_before=_count_parameters(model))

    # Collect every (parent, attribute) place a norm-like module occupies, then decide once per object.
    places: dict[int, list[tuple[str, nn.Module, str]]] = {}
    modules: dict[int, nn.Module] = {}
    seen_slots: set[tuple[int, str]] = set()
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        if isinstance(parent, ILMNorm):
            continue
        for child_name, child in parent._modules.items():
            if child is None or not _is_norm_like(child) or (id(parent), child_name) in seen_slots:
                continue
            seen_slots.add((id(parent), child_name))
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            places.setdefault(id(child), []).append((qualified, parent, child_name))
            modules[id(child)] = child

    for key, slots in places.items():
        module = modules[key]
        names = [s[0] for s in slots]
        adapter = REGISTRY.get(type(module))
        reason = _skip_reason(adapter, module, kinds, batchnorm)
        if reason is None and include and not _matches(names, include):
            reason = "not matched by include"
        if reason is None and exclude and _matches(names, exclude):
            reason = "matched by exclude"
        new: ILMNorm | None = None
        if reason is None:
            try:
                new = adapter.target.from_norm(
                    module, init=init, key_group_size=key_group_size, reduction=reduction, **adapter.layout
                )
            except UnsupportedNormError as err:
                reason = str(err)
        if new is None:
            report.skipped.append(SkippedModule(names[0], _qualified_class(module), reason))
            continue
        new._forward_pre_hooks.update(module._forward_pre_hooks)
        new._forward_hooks.update(module._forward_hooks)
        for _, parent, child_name in slots:
            parent._modules[child_name] = new
        old_params = sum(p.numel() for p in module.parameters())
        report.converted.append(
            ConvertedModule(
                name=names[0],
                source=_qualified_class(module),
                target=type(new).__name__,
                channels=new.num_channels,
                norm_groups=new.num_norm_groups,
                key_group_size=new.key_group_size,
                num_key_groups=new.num_key_groups,
                embedding_size=new.embedding_size,
                params_added=sum(p.numel() for p in new.parameters()) - old_params,
                function_changing=adapter.function_changing,
                key_group_size_adjusted=new.key_group_size != key_group_size,
                aliases=names[1:],
            )
        )

    if not report.converted:
        raise ConversionError(_nothing_converted_message(model, report, kinds))
    report.params_after = _count_parameters(model)
    model.ilm_conversion = report
    return report


def _nothing_converted_message(model: nn.Module, report: ConversionReport, kinds: tuple[str, ...]) -> str:
    arch = type(model).__name__
    if not report.skipped:
        return (
            f"{arch} has no GroupNorm / InstanceNorm / LayerNorm (nor BatchNorm) layer to convert; "
            "ILM Norm augments instance-level norms"
        )
    counts: dict[str, int] = {}
    for s in report.skipped:
        short = s.source.rsplit(".", 1)[-1]
        counts[short] = counts.get(short, 0) + 1
    found = ", ".join(f"{n} {c}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    hint = report.skipped[0].reason
    return f"nothing to convert in {arch} (norms={','.join(kinds)}): found {found}; {hint}"
