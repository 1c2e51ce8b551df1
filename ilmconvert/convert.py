"""Model surgery: replace a network's instance-level norms by ILM layers (or Proxy Norm), in place.

The pattern is ``torch.ao.quantization.convert``: a *mapping* from each exact source class to a
:class:`NormAdapter` whose target class has a ``from_norm`` constructor. :func:`convert` walks
the network and plans every replacement, :func:`swap_module` builds one, and nothing is assigned
until every replacement is built, so a failure leaves the network untouched (docs/design.md §3).
The walker knows nothing about particular norms. Classes that merely subclass ``nn.GroupNorm`` /
``nn.LayerNorm`` / ``_InstanceNorm`` may override ``forward`` with other semantics, so they are
skipped and reported, never guessed at; add them to a mapping to convert them. The second method,
Proxy Norm (``method="proxy"``, docs/design.md §8), is another mapping for the same walker.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .batchnorm_modes import batchnorm_mapping, check_batchnorm
from .errors import IlmconvertError
from .nn import (
    ILMGroupNorm,
    ILMGroupNormAct,
    ILMInstanceNorm,
    ILMLayerNorm,
    ILMLayerNormAct,
    ILMLayerNormActFp32,
    ILMLayerNormFp32,
    ILMNorm,
    ILMProxyGroupNormAct,
    ProxyGroupNormAct,
    ProxyLayerNormAct,
    ProxyNormAct,
    UnsupportedNormError,
)
from .nn.core import INITS
from .nn.layers import factory_kwargs

if TYPE_CHECKING:
    from .pairing import Unshared

#: Norm kinds a user can select (``norms=``), with their long names.
NORM_KINDS: dict[str, str] = {"gn": "GroupNorm", "in": "InstanceNorm", "ln": "LayerNorm"}
#: Adapter kinds: the selectable norm kinds and ``"bn"`` (BatchNorm, opt-in, function-changing).
ADAPTER_KINDS: tuple[str, ...] = (*NORM_KINDS, "bn")
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Conversion methods: ILM Norm (the default), Proxy Norm (GN / LN + PN-Act, docs/design.md §8) and
#: ``none``, the unconverted baseline (nothing is replaced; only the report is attached).
METHODS: tuple[str, ...] = ("ilm", "proxy", "ilm+proxy", "none")


class ConversionError(IlmconvertError):
    """The conversion cannot proceed (bad settings, or nothing to convert)."""


@dataclass(frozen=True)
class NormAdapter:
    """How to convert one exact source class.

    Attributes:
        kind: ``"gn"``, ``"in"``, ``"ln"`` or ``"bn"`` (BatchNorm, opt-in, function-changing);
            selects the adapter through ``convert(norms=..., batchnorm=...)``.
        target: the replacement class; ``target.from_norm(module, init=, key_group_size=,
            reduction=, **layout)`` builds the replacement (see :class:`ilmconvert.nn.ILMGroupNorm`).
        layout: extra keyword arguments for ``from_norm`` (e.g. ``channels_first=True``).
        needs_activation: the source is a plain norm and the target also takes over the activation
            module that follows it (Proxy Norm); :func:`convert` pairs them with
            :func:`ilmconvert.pairing.find_activation_pairs`, passes the activation to ``from_norm``
            as ``act_layer`` and puts an ``nn.Identity`` where the activation was.

    Raises:
        ValueError: for an unknown ``kind``, or a ``target`` without ``from_norm``.
    """

    kind: str
    target: type[nn.Module]
    layout: Mapping[str, Any] = field(default_factory=dict)
    needs_activation: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"kind must be one of {', '.join(ADAPTER_KINDS)}; got {self.kind!r}")
        if not callable(getattr(self.target, "from_norm", None)):
            raise ValueError(f"target {self.target!r} has no from_norm(module, ...) classmethod")

    @property
    def function_changing(self) -> bool:
        return self.kind == "bn"


#: A conversion mapping: exact source class -> adapter (what ``convert(mapping=...)`` takes).
ConversionMapping = Mapping[type[nn.Module], NormAdapter]

_DEFAULT_MAPPING: dict[type[nn.Module], NormAdapter] = {}


def _built_in_mapping() -> dict[type[nn.Module], NormAdapter]:
    """torch's, timm's and torchvision's GN / IN / LN classes (and BatchNorm, opt-in)."""
    from timm.layers import norm as timm_norm
    from timm.layers import norm_act as timm_norm_act
    from timm.models import metaformer as timm_metaformer
    from torchvision.models import convnext as tv_convnext

    first = {"channels_first": True}
    entries: list[tuple[type[nn.Module], str, type[ILMNorm], dict[str, Any]]] = [
        (nn.GroupNorm, "gn", ILMGroupNorm, {}),
        (nn.InstanceNorm1d, "in", ILMInstanceNorm, {}),
        (nn.InstanceNorm2d, "in", ILMInstanceNorm, {}),
        (nn.InstanceNorm3d, "in", ILMInstanceNorm, {}),
        (nn.LayerNorm, "ln", ILMLayerNorm, {}),
        (nn.BatchNorm1d, "bn", ILMGroupNorm, {}),
        (nn.BatchNorm2d, "bn", ILMGroupNorm, {}),
        (nn.BatchNorm3d, "bn", ILMGroupNorm, {}),
        (timm_norm.GroupNorm, "gn", ILMGroupNorm, {}),
        (timm_norm.GroupNorm1, "gn", ILMGroupNorm, {}),
        (timm_norm.LayerNorm, "ln", ILMLayerNorm, {}),
        (timm_norm.LayerNorm2d, "ln", ILMLayerNorm, first),
        (timm_norm_act.GroupNormAct, "gn", ILMGroupNormAct, {}),
        (timm_norm_act.GroupNorm1Act, "gn", ILMGroupNormAct, {}),
        (timm_norm_act.LayerNormAct, "ln", ILMLayerNormAct, {}),
        (timm_norm_act.LayerNormAct2d, "ln", ILMLayerNormAct, first),
        (timm_norm_act.BatchNormAct2d, "bn", ILMGroupNormAct, {}),
        # timm's *Fp32 norms: statistics, standardization and affine in float32, output in x.dtype
        (timm_norm.LayerNormFp32, "ln", ILMLayerNormFp32, {}),
        (timm_norm.LayerNorm2dFp32, "ln", ILMLayerNormFp32, first),
        (timm_norm_act.LayerNormActFp32, "ln", ILMLayerNormActFp32, {}),
        (timm_norm_act.LayerNormAct2dFp32, "ln", ILMLayerNormActFp32, first),
        # metaformer (PoolFormer v2, ConvFormer, CAFormer): weight but no bias (``self.bias = None``),
        # eps set as an attribute; B_beta is then absent and beta = D_mu (0 at preserve init)
        (timm_metaformer.GroupNorm1NoBias, "gn", ILMGroupNorm, {}),
        (timm_metaformer.LayerNorm2dNoBias, "ln", ILMLayerNorm, first),
        (timm_metaformer.LayerNormNoBias, "ln", ILMLayerNorm, {}),
        (tv_convnext.LayerNorm2d, "ln", ILMLayerNorm, first),
    ]
    return {source: NormAdapter(kind, target, dict(layout)) for source, kind, target, layout in entries}


def _default() -> dict[type[nn.Module], NormAdapter]:
    """The process-wide default mapping, built on first use (it imports timm and torchvision)."""
    if not _DEFAULT_MAPPING:
        _DEFAULT_MAPPING.update(_built_in_mapping())
    return _DEFAULT_MAPPING


def default_mapping() -> dict[type[nn.Module], NormAdapter]:
    """A fresh copy of the default conversion mapping (as ``get_default_qat_module_mappings()``).

    Change the copy and pass it to :func:`convert` to convert other classes, or fewer, without
    touching global state::

        mapping = ilmconvert.default_mapping()
        mapping[MyGroupNorm] = NormAdapter("gn", ILMGroupNorm)
        del mapping[torch.nn.LayerNorm]
        ilmconvert.convert(model, mapping)

    Returns:
        ``{exact source class: NormAdapter}``, including what :func:`register` added.
    """
    return dict(_default())


def proxy_mapping() -> dict[type[nn.Module], NormAdapter]:
    """A fresh copy of the Proxy Norm mapping (``convert(method="proxy")``): norm + activation pairs
    become standardization + :class:`~ilmconvert.nn.ProxyNormAct`.

    timm's ``GroupNormAct`` / ``GroupNorm1Act`` -> :class:`~ilmconvert.nn.ProxyGroupNormAct`,
    ``LayerNormAct`` / ``LayerNormAct2d`` -> :class:`~ilmconvert.nn.ProxyLayerNormAct` (they carry
    their activation); plain GroupNorm / LayerNorm modules of torch and timm where ``torch.fx``
    pairs them with the activation module after them (``needs_activation``); and (opt-in,
    function-changing) ``BatchNormAct2d`` and ``BatchNorm1d/2d/3d`` -> GN + PN, or plain GN where
    no activation follows.
    """
    from timm.layers import norm as timm_norm
    from timm.layers import norm_act as timm_norm_act

    first = {"channels_first": True}
    return {
        timm_norm_act.GroupNormAct: NormAdapter("gn", ProxyGroupNormAct),
        timm_norm_act.GroupNorm1Act: NormAdapter("gn", ProxyGroupNormAct),
        timm_norm_act.LayerNormAct: NormAdapter("ln", ProxyLayerNormAct),
        timm_norm_act.LayerNormAct2d: NormAdapter("ln", ProxyLayerNormAct, first),
        timm_norm_act.BatchNormAct2d: NormAdapter("bn", ProxyGroupNormAct),
        nn.GroupNorm: NormAdapter("gn", ProxyGroupNormAct, needs_activation=True),
        timm_norm.GroupNorm: NormAdapter("gn", ProxyGroupNormAct, needs_activation=True),
        timm_norm.GroupNorm1: NormAdapter("gn", ProxyGroupNormAct, needs_activation=True),
        nn.LayerNorm: NormAdapter("ln", ProxyLayerNormAct, needs_activation=True),
        timm_norm.LayerNorm: NormAdapter("ln", ProxyLayerNormAct, needs_activation=True),
        timm_norm.LayerNorm2d: NormAdapter("ln", ProxyLayerNormAct, first, needs_activation=True),
        **{bn: NormAdapter("bn", ProxyGroupNormAct, needs_activation=True) for bn in _BATCHNORMS},
    }


def ilm_proxy_mapping() -> dict[type[nn.Module], NormAdapter]:
    """A fresh copy of the ILM + Proxy Norm mapping (``convert(method="ilm+proxy")``): the GroupNorm
    (and opt-in BatchNorm) entries of :func:`proxy_mapping`, each becoming
    :class:`~ilmconvert.nn.ILMProxyGroupNormAct` (ILM's per-instance omega, beta feed PN-Act;
    docs/design.md §8). LayerNorms are left alone: their instance is a token."""
    return {
        source: NormAdapter(adapter.kind, ILMProxyGroupNormAct, dict(adapter.layout), adapter.needs_activation)
        for source, adapter in proxy_mapping().items()
        if adapter.target is ProxyGroupNormAct
    }


def register(source: type[nn.Module], kind: str, target: type[nn.Module], **layout: Any) -> None:
    """Add ``source`` (matched by exact type) to the process-wide default mapping.

    A convenience over :func:`default_mapping` for code that converts with the default mapping
    everywhere (checkpoints written by :func:`ilmconvert.save` are rebuilt with it on load).

    Raises:
        ValueError: for an unknown ``kind`` or a ``target`` without ``from_norm``.
    """
    _default()[source] = NormAdapter(kind, target, dict(layout))


@dataclass
class ConvertedModule:
    """One replaced module (``aliases``: its other names when the object is shared).

    ``key_group_size`` / ``num_key_groups`` / ``embedding_size`` are ILM's K, N, M (0 for Proxy
    Norm); ``activation`` is the activation a Proxy Norm replacement normalizes ("" for ILM), and
    ``absorbed`` names the separate activation modules it took over (now ``nn.Identity``);
    ``note`` says why an opted-in BatchNorm got no Proxy Norm (it became a plain GroupNorm).
    """

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
    activation: str = ""
    absorbed: list[str] = field(default_factory=list)
    note: str = ""
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
        raise ConversionError(f"unknown norm kind {', '.join(bad) or '(none)'}; choose from {', '.join(NORM_KINDS)}")
    return out


def _matches(names: Sequence[str], patterns: Sequence[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns or ())


def _is_norm_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm, _InstanceNorm, _BatchNorm))


#: What the Proxy Norm methods take over, for the skip reason of the other norms.
_COUNTERPARTS = {
    "proxy": "Proxy Norm counterpart (GroupNorm / LayerNorm / BatchNorm + activation)",
    "ilm+proxy": "ILM + Proxy Norm counterpart (GroupNorm / BatchNorm + activation; a LayerNorm instance is one token)",
}


def _skip_reason(
    adapter: NormAdapter | None, module: nn.Module, norms: tuple[str, ...], batchnorm: str | None, method: str
) -> str | None:
    """Why a norm-like module is not converted, or None when it is selected."""
    if adapter is None and method in _COUNTERPARTS and type(module) in _default():
        return f"{type(module).__name__} has no {_COUNTERPARTS[method]}"
    if adapter is None:
        return (
            f"{type(module).__name__} is not in the mapping (a subclass may override forward with other "
            "semantics); add it to ilmconvert.default_mapping() and pass that to convert, or ilmconvert.register it"
        )
    if adapter.kind == "bn":
        if batchnorm is None:
            return (
                "BatchNorm is batch-level, not instance-level; opt in with --include-batchnorm "
                "(API: batchnorm='gn'), which changes the function"
            )
        return None
    if adapter.kind not in norms:
        return f"{NORM_KINDS[adapter.kind]} not selected (norms={','.join(norms)})"
    return None


def _check_settings(
    norms: str | Iterable[str], init: str, key_group_size: int, reduction: int, batchnorm: str | None, method: str
) -> tuple[str, ...]:
    """Validate :func:`convert`'s settings; returns the selected norm kinds.

    Raises:
        ConversionError: for any setting out of its domain.
    """
    kinds = _normalize_norms(norms)
    if method not in METHODS:
        raise ConversionError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if init not in INITS:
        raise ConversionError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if check_batchnorm(batchnorm, method):
        raise ConversionError(check_batchnorm(batchnorm, method))
    if key_group_size < 1 or reduction < 1:
        raise ConversionError(f"key_group_size ({key_group_size}) and reduction ({reduction}) must be >= 1")
    return kinds


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def swap_module(
    module: nn.Module,
    adapter: NormAdapter,
    *,
    init: str = "preserve",
    key_group_size: int = 16,
    reduction: int = 16,
    name: str = "",
    activation: nn.Module | None = None,
) -> tuple[nn.Module, ConvertedModule]:
    """Build the replacement of one module; ``module`` itself and its parents are not changed.

    The replacement comes from ``adapter.target.from_norm(module, init=, key_group_size=,
    reduction=, **adapter.layout)`` and takes over ``module``'s device and dtype (of its own
    parameters or buffers), its ``training`` flag and its forward hooks and pre-hooks, as
    ``torch.ao.quantization.quantize.swap_module`` does.

    Args:
        module: the norm to replace.
        adapter: how to convert it (see :func:`default_mapping`).
        init, key_group_size, reduction: as in :func:`convert`.
        name: the module's qualified name, for the report row.
        activation: for an adapter that ``needs_activation``, the activation module the
            replacement takes over (passed to ``from_norm`` as ``act_layer``).

    Returns:
        ``(replacement, report row)``.

    Raises:
        UnsupportedNormError: ``module``'s configuration cannot be taken over (the walker skips it).
        Exception: whatever ``from_norm`` raises otherwise.
    """
    extra = {"act_layer": activation} if activation is not None else {}
    new = adapter.target.from_norm(
        module, init=init, key_group_size=key_group_size, reduction=reduction, **adapter.layout, **extra
    )
    new.to(**factory_kwargs(module))
    new.train(module.training)
    for hooks in _HOOK_DICTS:
        if hasattr(module, hooks) and hasattr(new, hooks):
            getattr(new, hooks).update(getattr(module, hooks))
    old_params = sum(p.numel() for p in module.parameters())
    row = ConvertedModule(
        name=name,
        source=_qualified_class(module),
        target=type(new).__name__,
        channels=getattr(new, "num_channels", 0),
        norm_groups=getattr(new, "num_norm_groups", getattr(new, "num_groups", 0)),
        key_group_size=getattr(new, "key_group_size", 0),
        num_key_groups=getattr(new, "num_key_groups", 0),
        embedding_size=getattr(new, "embedding_size", 0),
        params_added=sum(p.numel() for p in new.parameters()) - old_params,
        function_changing=adapter.function_changing and not getattr(adapter.target, "preserves_function", False),
        key_group_size_adjusted=isinstance(new, ILMNorm) and new.key_group_size != key_group_size,
        activation=type(new.act).__name__ if isinstance(new, (ProxyNormAct, ILMProxyGroupNormAct)) else "",
    )
    return new, row


@dataclass
class _Planned:
    """One module object to replace, every (qualified name, parent, attribute) slot it occupies,
    the adapter that converts it, and the activation module it takes over (with its slots)."""

    module: nn.Module
    adapter: NormAdapter
    slots: list[tuple[str, nn.Module, str]]
    activation: nn.Module | None = None
    activation_slots: list[tuple[str, nn.Module, str]] = field(default_factory=list)
    note: str = ""


def _slots_of(model: nn.Module, target: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every (qualified name, parent, attribute) slot that holds the object ``target``."""
    return [
        (f"{parent_name}.{child_name}" if parent_name else child_name, parent, child_name)
        for parent_name, parent in model.named_modules(remove_duplicate=False)
        for child_name, child in parent._modules.items()
        if child is target
    ]


def _places(model: nn.Module, mapping: ConversionMapping) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every (qualified name, parent, attribute) slot of each candidate module object, by ``id``,
    in the order of ``named_modules`` (a shared object appears once, with all its slots).

    Candidates are the norm-like modules (GN / LN / IN / BN and their subclasses, reported when
    skipped) and any module whose exact class is a key of ``mapping``."""
    places: dict[int, list[tuple[str, nn.Module, str]]] = {}
    seen_slots: set[tuple[int, str]] = set()
    converted = (ILMNorm, *{adapter.target for adapter in mapping.values()})
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        if isinstance(parent, converted):  # an earlier conversion's act / drop are not candidates
            continue
        for child_name, child in parent._modules.items():
            if child is None or (id(parent), child_name) in seen_slots:
                continue
            if not _is_norm_like(child) and type(child) not in mapping:
                continue
            seen_slots.add((id(parent), child_name))
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            places.setdefault(id(child), []).append((qualified, parent, child_name))
    return places


def _plan(
    model: nn.Module,
    mapping: ConversionMapping,
    kinds: tuple[str, ...],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    batchnorm: str | None,
    method: str,
    report: ConversionReport,
) -> list[_Planned]:
    """Decide, for every norm-like module object, convert or skip; skipped ones go to ``report``.

    Adapters that ``needs_activation`` get the activation module that ``torch.fx`` proves to be
    the norm's only consumer (:mod:`ilmconvert.pairing`); a norm without one is skipped with the
    reason, except an opted-in BatchNorm, which is converted alone.
    """
    pairing = None
    planned = []
    for slots in _places(model, mapping).values():
        module = slots[0][1]._modules[slots[0][2]]
        names = [s[0] for s in slots]
        adapter = mapping.get(type(module))
        reason = _skip_reason(adapter, module, kinds, batchnorm, method)
        if reason is None and include and not _matches(names, include):
            reason = "not matched by include"
        if reason is None and exclude and _matches(names, exclude):
            reason = "matched by exclude"
        activation = None
        if reason is None and adapter.needs_activation:
            if pairing is None:
                from .pairing import find_activation_pairs

                pairing = find_activation_pairs(model, tuple(t for t, a in mapping.items() if a.needs_activation))
            activation = pairing.activations.get(id(module))
            unpaired = f"not paired with an activation: {pairing.reasons.get(id(module), 'not found')}"
            if activation is None and adapter.kind != "bn":
                reason = unpaired
        if reason is None:
            act_slots = _slots_of(model, activation) if activation is not None else []
            note = unpaired if adapter.needs_activation and activation is None else ""
            planned.append(_Planned(module, adapter, slots, activation, act_slots, note))
        else:
            report.skipped.append(SkippedModule(names[0], _qualified_class(module), reason))
    return planned


def _build(
    planned: list[_Planned],
    report: ConversionReport,
    init: str,
    key_group_size: int,
    reduction: int,
    unshared: list[Unshared],
) -> list[tuple[_Planned, nn.Module, ConvertedModule]]:
    """Build every planned replacement (nothing is assigned); ``UnsupportedNormError`` skips one."""
    built = []
    for item in planned:
        names = [s[0] for s in item.slots]
        try:
            new, row = swap_module(
                item.module,
                item.adapter,
                init=init,
                key_group_size=key_group_size,
                reduction=reduction,
                name=names[0],
                activation=item.activation,
            )
        except UnsupportedNormError as err:
            report.skipped.append(SkippedModule(names[0], _qualified_class(item.module), str(err)))
            continue
        row.aliases = names[1:]
        row.absorbed = [s[0] for s in item.activation_slots]
        retraced = [u.note() for u in unshared if any(parent is u.traced for _, parent, _ in item.activation_slots)]
        row.note = "; ".join([n for n in (item.note, *retraced) if n])
        built.append((item, new, row))
    return built


def _unshare(model: nn.Module, mapping: ConversionMapping) -> list[Unshared]:
    """:func:`~ilmconvert.pairing.unshare_activations` for the mapping's norms that take an activation."""
    needs = tuple(t for t, a in mapping.items() if a.needs_activation)
    if not needs:
        return []
    from .pairing import unshare_activations

    return unshare_activations(model, needs)


def _restore_unused(unshared: list[Unshared], planned: list[_Planned]) -> list[Unshared]:
    """Put back every re-traced module from which no planned replacement takes an activation (the
    planned slots that pointed into it then point into the original); return the others."""
    used = []
    for item in unshared:
        if any(parent is item.traced for plan in planned for _, parent, _ in plan.activation_slots):
            used.append(item)
            continue
        item.restore()
        for plan in planned:
            plan.slots = [(n, item.original if p is item.traced else p, a) for n, p, a in plan.slots]
    return used


def convert(
    model: nn.Module,
    mapping: ConversionMapping | None = None,
    *,
    norms: str | Iterable[str] = ("gn", "in", "ln"),
    init: str = "preserve",
    key_group_size: int = 16,
    reduction: int = 16,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    batchnorm: str | None = None,
    method: str = "ilm",
) -> ConversionReport:
    """Replace the instance-level norms of ``model`` by ILM layers (or Proxy Norm), in place.

    Every module whose exact class is in ``mapping`` and whose kind is selected is replaced by
    :func:`swap_module` (same device, dtype, ``training`` flag and forward hooks). A module object
    used at several places is converted once and stays shared. Checks come first and nothing is
    half-converted: every replacement is planned and built before any is assigned, so an
    exception leaves ``model`` exactly as it was. The report is also stored as
    ``model.ilm_conversion``.

    Args:
        model: the network; modified in place.
        mapping: exact source class -> :class:`NormAdapter`; ``None`` for the method's built-in
            mapping (:func:`default_mapping` or :func:`proxy_mapping`).
        norms: which kinds to convert, from ``"gn"``, ``"in"``, ``"ln"`` (or ``"gn,ln"``).
        init: ``"preserve"`` (same function as the original, docs/design.md §2) or ``"paper"``
            (B_omega = 1, B_beta = 0: the paper's from-scratch initialization).
        key_group_size: K, channels per key group (eq. 3).
        reduction: r in ``M = max(2, N // r)`` (eq. 4).
        include: qualified-name glob patterns (``fnmatch``, e.g. ``"stages.3.*"``); when given,
            only matching modules are converted.
        exclude: qualified-name glob patterns of modules to leave alone.
        batchnorm: ``None`` (BatchNorm is left alone) or ``"gn"``: convert BatchNorm1d/2d/3d and
            timm's BatchNormAct2d to ILM over GroupNorm standardization (32 groups or the largest
            divisor of C not above 32). This changes the function: fine-tune afterwards.
        method: ``"ilm"`` (ILM Norm) or ``"proxy"``: Proxy Norm, timm's norm + activation modules
            become standardization + PN-Act (``init="preserve"`` adds the output affine that keeps
            the function; ``"paper"`` is the authors' layer). ``"ilm+proxy"``: GroupNorm (and
            opt-in BatchNorm) + activation pairs become ILM on GN whose per-instance omega, beta
            drive PN-Act (:class:`~ilmconvert.nn.ILMProxyGroupNormAct`). Selects the built-in
            mapping when ``mapping`` is None. ``"none"``: the unconverted baseline; nothing is replaced, the
            (empty) report is attached all the same, so that the network as built saves, loads and
            fine-tunes through the same code as a converted one (``finetune --method none``).

    Returns:
        The :class:`ConversionReport`.

    Raises:
        ConversionError: for bad settings, or when no module is converted (the message lists
            what was found and why it was skipped); ``model`` is then unchanged.
        Exception: whatever building a replacement raises (other than ``UnsupportedNormError``,
            which skips that module); ``model`` is then unchanged.
    """
    kinds = _check_settings(norms, init, key_group_size, reduction, batchnorm, method)
    settings = {
        "norms": list(kinds),
        "init": init,
        "key_group_size": key_group_size,
        "reduction": reduction,
        "include": list(include) if include else None,
        "exclude": list(exclude) if exclude else None,
        "batchnorm": batchnorm,
        "method": method,
    }
    report = ConversionReport(settings=settings, params_before=_count_parameters(model))
    if method == "none" and batchnorm is None:
        report.params_after = report.params_before
        model.ilm_conversion = report
        return report
    if mapping is None:
        mapping = {"ilm": _default, "proxy": proxy_mapping, "ilm+proxy": ilm_proxy_mapping, "none": dict}[method]()
        mapping = batchnorm_mapping(dict(mapping), method, batchnorm, NormAdapter)
    unshared = _unshare(model, mapping)
    try:
        planned = _plan(model, mapping, kinds, include, exclude, batchnorm, method, report)
        built = _build(planned, report, init, key_group_size, reduction, unshared)
        unshared = _restore_unused(unshared, [item for item, _, _ in built])
        if not built:
            raise ConversionError(_nothing_converted_message(model, report, kinds))
    except BaseException:  # nothing assigned yet: put re-traced modules back, the model is as it was
        for item in reversed(unshared):
            item.restore()
        raise

    for item, new, row in built:  # then assign
        for _, parent, child_name in item.slots:
            parent._modules[child_name] = new
        for _, parent, child_name in item.activation_slots:  # the activation now runs inside `new`
            parent._modules[child_name] = nn.Identity()
        report.converted.append(row)
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
