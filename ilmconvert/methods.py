"""Conversion methods: what each method converts, into what, and how the package names it.

A method is one :class:`Method` entry in a process-wide registry: its name, its *mapping* from
exact source class to :class:`NormAdapter` (the pattern of ``torch.ao.quantization``'s module
mappings), the standard adapter per norm kind (what :func:`register` uses when no target is
given), and the words the CLI, recipes, model card and report use for it. The walker
(:func:`ilmconvert.convert`) asks the registry and never branches on a method name; the CLI's
``--method`` choices and help, the recipe schema's allowed values and the model card are
generated from it (docs/design.md §3).

Built in: ``ilm`` (ILM Norm, the default), ``proxy`` (Proxy Norm, docs/design.md §8), ``ilm+proxy``
(ILM whose per-instance rescaling drives Proxy Norm) and ``none`` (the unconverted baseline).
Adding a method is a module with its target classes (each with ``from_norm``, see
:class:`ilmconvert.nn.from_norm.FromNorm`) and one :func:`add_method` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .nn import ILMProxyGroupNormAct, ProxyGroupNormAct, ProxyLayerNormAct, layers
from .nn.from_norm import group_norm_of_batchnorm

#: The built-in method names (the only place they are spelled out).
ILM, PROXY, ILM_PROXY, NONE = "ilm", "proxy", "ilm+proxy", "none"
#: The method :func:`ilmconvert.convert` uses unless told otherwise.
DEFAULT = ILM

#: Norm kinds a user can select (``norms=``), with their long names.
NORM_KINDS: dict[str, str] = {"gn": "GroupNorm", "in": "InstanceNorm", "ln": "LayerNorm"}
#: Adapter kinds: the selectable norm kinds and ``"bn"`` (BatchNorm, opt-in, function-changing).
ADAPTER_KINDS: tuple[str, ...] = (*NORM_KINDS, "bn")
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class NormAdapter:
    """How to convert one exact source class.

    Attributes:
        kind: ``"gn"``, ``"in"``, ``"ln"`` or ``"bn"`` (BatchNorm, opt-in, function-changing);
            selects the adapter through ``convert(norms=..., batchnorm=...)``.
        target: the replacement class; ``target.from_norm(module, init=, key_group_size=,
            reduction=, **layout)`` builds the replacement (see :class:`ilmconvert.nn.from_norm.FromNorm`).
        layout: extra keyword arguments for ``from_norm`` (e.g. ``channels_first=True``).
        needs_activation: the source is a plain norm and the target also takes over the activation
            module that follows it (Proxy Norm); :func:`ilmconvert.convert` pairs them with
            :func:`ilmconvert.pairing.find_activation_pairs`, passes the activation to ``from_norm``
            as ``act_layer`` and puts an ``nn.Identity`` where the activation was.
        fallback: the adapter used instead when the target finds no activation to take over
            (:class:`~ilmconvert.nn.from_norm.NoActivationError`): an opted-in BatchNorm that no
            activation follows becomes a plain ``nn.GroupNorm`` under the Proxy Norm methods. A
            norm whose adapter has no fallback is then skipped with the reason.
        build: the constructor, when it is not ``target.from_norm`` (same keyword arguments).

    Raises:
        ValueError: for an unknown ``kind``, or a ``target`` without ``from_norm`` (and no ``build``).
    """

    kind: str
    target: type[nn.Module]
    layout: Mapping[str, Any] = field(default_factory=dict)
    needs_activation: bool = False
    fallback: NormAdapter | None = None
    build: Callable[..., nn.Module] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"kind must be one of {', '.join(ADAPTER_KINDS)}; got {self.kind!r}")
        if self.build is None and not callable(getattr(self.target, "from_norm", None)):
            raise ValueError(f"target {self.target!r} has no from_norm(module, ...) classmethod")

    @property
    def function_changing(self) -> bool:
        return self.kind == "bn"

    def construct(self, module: nn.Module, **kwargs: Any) -> nn.Module:
        """The replacement of ``module``: ``build`` or ``target.from_norm`` with ``kwargs`` and ``layout``."""
        return (self.build or self.target.from_norm)(module, **kwargs, **self.layout)


#: A conversion mapping: exact source class -> adapter (what ``convert(mapping=...)`` takes).
ConversionMapping = Mapping[type[nn.Module], NormAdapter]


@dataclass(frozen=True)
class Method:
    """One conversion method: its mapping and how the package speaks of it.

    Attributes:
        name: what ``convert(method=)``, ``--method`` and recipes take, and ``config.json`` records.
        label: short name in listings (``finetune``'s network line: ``"ILM init=paper"``).
        title: the model card's title suffix (``"resnet18 with ILM Norm"``); "" for none.
        description: the model card's line for it.
        summary: its part of the CLI's ``--method`` help.
        built_in: returns the built-in mapping (imports timm / torchvision); None: the method
            converts nothing (the report is attached all the same).
        standard: kind -> adapter that :func:`register` uses without a target (its ``layout``
            is replaced by the registration's).
        counterpart: for the skip reason of a norm other methods convert and this one does not
            (``"X has no <counterpart>"``); "" for the generic "not in the mapping" reason.
        tags: the model card's Hub tags.
        report_columns: the per-module columns of the CLI report besides C, groups and +params:
            ``"K"``, ``"N"``, ``"M"`` (ILM's key groups, also the model card's K / r line) and
            ``"activation"`` (what a Proxy Norm layer normalizes).
    """

    name: str
    label: str
    title: str
    description: str
    summary: str
    built_in: Callable[[], dict[type[nn.Module], NormAdapter]] | None = None
    standard: Mapping[str, NormAdapter] = field(default_factory=dict)
    counterpart: str = ""
    tags: tuple[str, ...] = ()
    report_columns: tuple[str, ...] = ()

    @property
    def converts(self) -> bool:
        return self.built_in is not None


_METHODS: dict[str, Method] = {}
#: The live mapping of each method that has been used: built in, plus what :func:`register` added.
_MAPPINGS: dict[str, dict[type[nn.Module], NormAdapter]] = {}


def add_method(method: Method, *, replace_existing: bool = False) -> Method:
    """Register a conversion method (then ``convert(method=method.name)`` uses it).

    Raises:
        ValueError: the name is taken (unless ``replace_existing``).
    """
    if method.name in _METHODS and not replace_existing:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    _MAPPINGS.pop(method.name, None)
    return method


def names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_METHODS)


def find_method(name: str) -> Method | None:
    """The method called ``name``, or None."""
    return _METHODS.get(name)


def get_method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        ValueError: no such method (the message lists the registered ones).
    """
    if name not in _METHODS:
        raise ValueError(
            f"method must be one of {', '.join(_METHODS)}; got {name!r} (a method of your own: "
            "ilmconvert.methods.add_method it first)"
        )
    return _METHODS[name]


def _live_mapping(name: str) -> dict[type[nn.Module], NormAdapter]:
    if name not in _MAPPINGS:
        method = get_method(name)
        _MAPPINGS[name] = method.built_in() if method.built_in is not None else {}
    return _MAPPINGS[name]


def mapping(name: str = DEFAULT) -> dict[type[nn.Module], NormAdapter]:
    """A fresh copy of method ``name``'s mapping (built in, plus what :func:`register` added).

    Raises:
        ValueError: no such method.
    """
    return dict(_live_mapping(name))


def known_sources() -> set[type[nn.Module]]:
    """Every source class that some registered method converts."""
    return {source for name in _METHODS for source in _live_mapping(name)}


def register(
    source: type[nn.Module],
    kind: str,
    target: type[nn.Module] | None = None,
    *,
    method: str = DEFAULT,
    needs_activation: bool | None = None,
    **layout: Any,
) -> NormAdapter:
    """Add ``source`` (matched by exact type) to method ``method``'s process-wide mapping.

    Every later conversion with that method converts ``source``, and :func:`ilmconvert.load`
    rebuilds checkpoints of networks with it (``load`` re-applies the recorded conversion with
    the method's mapping, docs/design.md §5).

    Args:
        source: the user's norm class; it must standardize exactly like the kind's torch norm.
        kind: ``"gn"``, ``"in"``, ``"ln"`` or ``"bn"``.
        target: the replacement class (with ``from_norm``); None: the method's standard target
            for ``kind`` (``ilm``: the ILM front-end; ``proxy``: GN / LN + PN, ``ilm+proxy``: ILM +
            PN on GN, which pair a plain norm with the activation module after it).
        method: the method whose mapping gets the entry.
        needs_activation: whether the target takes over the activation module after a plain norm;
            None: as the method's standard adapter for ``kind`` (False where it has none). Pass
            False for a class that carries its activation as ``act``, like timm's ``GroupNormAct``.
        layout: extra ``from_norm`` arguments (e.g. ``channels_first=True`` for a LayerNorm2d).

    Returns:
        The adapter now in the mapping.

    Raises:
        ValueError: an unknown ``method`` or ``kind``, a method that converts nothing, no
            standard target for ``kind``, or a ``target`` without ``from_norm``.
    """
    spec = get_method(method)
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"kind must be one of {', '.join(ADAPTER_KINDS)}; got {kind!r}")
    if not spec.converts:
        raise ValueError(f"method {method!r} converts nothing; register with one of {', '.join(_converting())}")
    standard = spec.standard.get(kind)
    if target is None and standard is None:
        raise ValueError(f"method {method!r} has no standard target for kind {kind!r}; pass target=")
    pairs = needs_activation if needs_activation is not None else bool(standard and standard.needs_activation)
    if target is None:
        adapter = replace(standard, layout=dict(layout), needs_activation=pairs)
    else:
        adapter = NormAdapter(kind, target, dict(layout), pairs, standard.fallback if standard else None)
    _live_mapping(method)[source] = adapter
    return adapter


def _converting() -> list[str]:
    return [name for name, m in _METHODS.items() if m.converts]


@contextmanager
def isolated() -> Iterator[None]:
    """Restore the registry (methods and mappings) on exit, whatever was added or registered
    inside: for tests and experiments that must not leak into the rest of the process."""
    methods, mappings = dict(_METHODS), {name: dict(m) for name, m in _MAPPINGS.items()}
    try:
        yield
    finally:
        _METHODS.clear()
        _METHODS.update(methods)
        _MAPPINGS.clear()
        _MAPPINGS.update(mappings)


# ------------------------------------------------------------------------------ the built-in methods
def _ilm_mapping() -> dict[type[nn.Module], NormAdapter]:
    """torch's, timm's and torchvision's GN / IN / LN classes (and BatchNorm, opt-in)."""
    from timm.layers import norm as timm_norm
    from timm.layers import norm_act as timm_norm_act
    from timm.models import metaformer as timm_metaformer
    from torchvision.models import convnext as tv_convnext

    first = {"channels_first": True}
    entries: list[tuple[type[nn.Module], str, type[nn.Module], dict[str, Any]]] = [
        (nn.GroupNorm, "gn", layers.ILMGroupNorm, {}),
        (nn.InstanceNorm1d, "in", layers.ILMInstanceNorm, {}),
        (nn.InstanceNorm2d, "in", layers.ILMInstanceNorm, {}),
        (nn.InstanceNorm3d, "in", layers.ILMInstanceNorm, {}),
        (nn.LayerNorm, "ln", layers.ILMLayerNorm, {}),
        (nn.BatchNorm1d, "bn", layers.ILMGroupNorm, {}),
        (nn.BatchNorm2d, "bn", layers.ILMGroupNorm, {}),
        (nn.BatchNorm3d, "bn", layers.ILMGroupNorm, {}),
        (timm_norm.GroupNorm, "gn", layers.ILMGroupNorm, {}),
        (timm_norm.GroupNorm1, "gn", layers.ILMGroupNorm, {}),
        (timm_norm.LayerNorm, "ln", layers.ILMLayerNorm, {}),
        (timm_norm.LayerNorm2d, "ln", layers.ILMLayerNorm, first),
        (timm_norm_act.GroupNormAct, "gn", layers.ILMGroupNormAct, {}),
        (timm_norm_act.GroupNorm1Act, "gn", layers.ILMGroupNormAct, {}),
        (timm_norm_act.LayerNormAct, "ln", layers.ILMLayerNormAct, {}),
        (timm_norm_act.LayerNormAct2d, "ln", layers.ILMLayerNormAct, first),
        (timm_norm_act.BatchNormAct2d, "bn", layers.ILMGroupNormAct, {}),
        # timm's *Fp32 norms: statistics, standardization and affine in float32, output in x.dtype
        (timm_norm.LayerNormFp32, "ln", layers.ILMLayerNormFp32, {}),
        (timm_norm.LayerNorm2dFp32, "ln", layers.ILMLayerNormFp32, first),
        (timm_norm_act.LayerNormActFp32, "ln", layers.ILMLayerNormActFp32, {}),
        (timm_norm_act.LayerNormAct2dFp32, "ln", layers.ILMLayerNormActFp32, first),
        # metaformer (PoolFormer v2, ConvFormer, CAFormer): weight but no bias (``self.bias = None``),
        # eps set as an attribute; B_beta is then absent and beta = D_mu (0 at preserve init)
        (timm_metaformer.GroupNorm1NoBias, "gn", layers.ILMGroupNorm, {}),
        (timm_metaformer.LayerNorm2dNoBias, "ln", layers.ILMLayerNorm, first),
        (timm_metaformer.LayerNormNoBias, "ln", layers.ILMLayerNorm, {}),
        (tv_convnext.LayerNorm2d, "ln", layers.ILMLayerNorm, first),
    ]
    return {source: NormAdapter(kind, target, dict(layout)) for source, kind, target, layout in entries}


#: An opted-in BatchNorm that no activation follows, under the Proxy Norm methods: plain GroupNorm
#: with the BatchNorm's affine, so that nothing depends on the batch (function-changing).
_BN_TO_GROUP_NORM = NormAdapter("bn", nn.GroupNorm, build=group_norm_of_batchnorm)


def _proxy_mapping() -> dict[type[nn.Module], NormAdapter]:
    """timm's norm + activation modules and the plain GN / LN norms torch.fx pairs with their activation."""
    from timm.layers import norm as timm_norm
    from timm.layers import norm_act as timm_norm_act

    first = {"channels_first": True}
    gn, ln = _PROXY_STANDARD["gn"], _PROXY_STANDARD["ln"]
    return {
        timm_norm_act.GroupNormAct: NormAdapter("gn", ProxyGroupNormAct),
        timm_norm_act.GroupNorm1Act: NormAdapter("gn", ProxyGroupNormAct),
        timm_norm_act.LayerNormAct: NormAdapter("ln", ProxyLayerNormAct),
        timm_norm_act.LayerNormAct2d: NormAdapter("ln", ProxyLayerNormAct, first),
        timm_norm_act.BatchNormAct2d: NormAdapter("bn", ProxyGroupNormAct, fallback=_BN_TO_GROUP_NORM),
        nn.GroupNorm: gn,
        timm_norm.GroupNorm: gn,
        timm_norm.GroupNorm1: gn,
        nn.LayerNorm: ln,
        timm_norm.LayerNorm: ln,
        timm_norm.LayerNorm2d: replace(ln, layout=first),
        **{bn: _PROXY_STANDARD["bn"] for bn in _BATCHNORMS},
    }


def _ilm_proxy_mapping() -> dict[type[nn.Module], NormAdapter]:
    """The GroupNorm (and opt-in BatchNorm) entries of the Proxy Norm mapping, with ILM + PN on GN."""
    return {
        source: replace(adapter, target=ILMProxyGroupNormAct)
        for source, adapter in _proxy_mapping().items()
        if adapter.target is ProxyGroupNormAct
    }


_ILM_STANDARD = {
    "gn": NormAdapter("gn", layers.ILMGroupNorm),
    "in": NormAdapter("in", layers.ILMInstanceNorm),
    "ln": NormAdapter("ln", layers.ILMLayerNorm),
    "bn": NormAdapter("bn", layers.ILMGroupNorm),
}
_PROXY_STANDARD = {
    "gn": NormAdapter("gn", ProxyGroupNormAct, needs_activation=True),
    "ln": NormAdapter("ln", ProxyLayerNormAct, needs_activation=True),
    "bn": NormAdapter("bn", ProxyGroupNormAct, needs_activation=True, fallback=_BN_TO_GROUP_NORM),
}

_BUILT_IN_METHODS = (
    Method(
        ILM,
        label="ILM",
        title="ILM Norm",
        description="ILM Norm (Instance-Level Meta Normalization; Jia, Chen & Chen, CVPR 2019)",
        summary="ILM Norm",
        built_in=_ilm_mapping,
        standard=_ILM_STANDARD,
        tags=("ilm-norm",),
        report_columns=("K", "N", "M"),
    ),
    Method(
        PROXY,
        label="Proxy Norm",
        title="Proxy Norm",
        description="Proxy Norm (Labatie et al., NeurIPS 2021)",
        summary="Proxy Norm, timm's norm + activation modules become GN / LN + PN-Act",
        built_in=_proxy_mapping,
        standard=_PROXY_STANDARD,
        counterpart="Proxy Norm counterpart (GroupNorm / LayerNorm / BatchNorm + activation)",
        tags=("proxy-norm",),
        report_columns=("activation",),
    ),
    Method(
        ILM_PROXY,
        label="ILM + Proxy Norm",
        title="ILM + Proxy Norm",
        description=(
            "ILM Norm whose per-instance rescaling drives Proxy Norm (an ilmconvert combination, not published)"
        ),
        summary="GN + activation pairs become ILM whose per-instance rescaling drives PN-Act",
        built_in=_ilm_proxy_mapping,
        standard={k: replace(_PROXY_STANDARD[k], target=ILMProxyGroupNormAct) for k in ("gn", "bn")},
        counterpart=(
            "ILM + Proxy Norm counterpart (GroupNorm / BatchNorm + activation; a LayerNorm instance is one token)"
        ),
        tags=("ilm-norm", "proxy-norm"),
        report_columns=("K", "N", "M", "activation"),
    ),
    Method(
        NONE,
        label="unconverted",
        title="",
        description="no norm conversion (the unconverted baseline)",
        summary="leave the network as it is (a baseline checkpoint)",
    ),
)
for _method in _BUILT_IN_METHODS:
    add_method(_method)


# ------------------------------------------------------------------------------ the public mappings
def default_mapping() -> dict[type[nn.Module], NormAdapter]:
    """A fresh copy of the default (ILM Norm) conversion mapping (as ``get_default_qat_module_mappings()``).

    Change the copy and pass it to :func:`ilmconvert.convert` to convert other classes, or fewer,
    without touching global state::

        mapping = ilmconvert.default_mapping()
        mapping[MyGroupNorm] = NormAdapter("gn", ILMGroupNorm)
        del mapping[torch.nn.LayerNorm]
        ilmconvert.convert(model, mapping)

    Returns:
        ``{exact source class: NormAdapter}``, including what :func:`register` added.
    """
    return mapping(DEFAULT)


def proxy_mapping() -> dict[type[nn.Module], NormAdapter]:
    """A fresh copy of the Proxy Norm mapping: norm + activation pairs become standardization +
    :class:`~ilmconvert.nn.ProxyNormAct`.

    timm's ``GroupNormAct`` / ``GroupNorm1Act`` -> :class:`~ilmconvert.nn.ProxyGroupNormAct`,
    ``LayerNormAct`` / ``LayerNormAct2d`` -> :class:`~ilmconvert.nn.ProxyLayerNormAct` (they carry
    their activation); plain GroupNorm / LayerNorm modules of torch and timm where ``torch.fx``
    pairs them with the activation module after them (``needs_activation``); and (opt-in,
    function-changing) ``BatchNormAct2d`` and ``BatchNorm1d/2d/3d`` -> GN + PN, or plain GN where
    no activation follows (``fallback``). Includes what :func:`register` added to it.
    """
    return mapping(PROXY)


def ilm_proxy_mapping() -> dict[type[nn.Module], NormAdapter]:
    """A fresh copy of the ILM + Proxy Norm mapping: the GroupNorm (and opt-in BatchNorm) entries
    of :func:`proxy_mapping`, each becoming :class:`~ilmconvert.nn.ILMProxyGroupNormAct` (ILM's
    per-instance omega, beta feed PN-Act; docs/design.md §8). LayerNorms are left alone: their
    instance is a token. Includes what :func:`register` added to it."""
    return mapping(ILM_PROXY)
