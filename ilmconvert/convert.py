"""Model surgery: replace a network's instance-level norms by ILM layers (or Proxy Norm), in place.

The pattern is ``torch.ao.quantization.convert``: a *mapping* from each exact source class to a
:class:`NormAdapter` whose target class has a ``from_norm`` constructor. :func:`convert` walks
the network and plans every replacement, :func:`swap_module` builds one, and nothing is assigned
until every replacement is built, so a failure leaves the network untouched (docs/design.md §3).
The walker knows nothing about particular norms. Classes that merely subclass ``nn.GroupNorm`` /
``nn.LayerNorm`` / ``_InstanceNorm`` may override ``forward`` with other semantics, so they are
skipped and reported, never guessed at; add them to a mapping to convert them. Each method (ILM
Norm, Proxy Norm, ...; :mod:`ilmconvert.methods`) is another mapping for the same walker, which
never branches on a method's name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from . import methods
from .batchnorm_modes import BATCHNORM_MODES, batchnorm_mapping, check_batchnorm  # noqa: F401
from .errors import IlmconvertError
from .methods import (  # noqa: F401  (the mapping API, re-exported where it used to live)
    ADAPTER_KINDS,
    NORM_KINDS,
    ConversionMapping,
    Method,
    NormAdapter,
    default_mapping,
    ilm_proxy_mapping,
    proxy_mapping,
    register,
)
from .nn import ILMNorm
from .nn.core import INITS
from .nn.from_norm import NoActivationError, UnsupportedNormError, describe_replacement, factory_kwargs

if TYPE_CHECKING:
    from .pairing import Unshared



class ConversionError(IlmconvertError):
    """The conversion cannot proceed (bad settings, or nothing to convert)."""


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


def _skip_reason(
    adapter: NormAdapter | None, module: nn.Module, norms: tuple[str, ...], batchnorm: str | None, method: Method
) -> str | None:
    """Why a norm-like module is not converted, or None when it is selected."""
    if adapter is None and method.counterpart and type(module) in methods.known_sources():
        return f"{type(module).__name__} has no {method.counterpart}"
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
) -> tuple[tuple[str, ...], Method]:
    """Validate :func:`convert`'s settings; returns the selected norm kinds and the method.

    Raises:
        ConversionError: for any setting out of its domain.
    """
    kinds = _normalize_norms(norms)
    try:
        spec = methods.get_method(method)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    if init not in INITS:
        raise ConversionError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    problem = check_batchnorm(batchnorm, method)
    if problem:
        raise ConversionError(problem)
    if key_group_size < 1 or reduction < 1:
        raise ConversionError(f"key_group_size ({key_group_size}) and reduction ({reduction}) must be >= 1")
    return kinds, spec


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
    reduction=, **adapter.layout)`` (or ``adapter.fallback``'s when the target finds no activation
    to take over), its report row from its ``describe()``, and it takes over ``module``'s device and dtype (of its own
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
    kwargs = {"init": init, "key_group_size": key_group_size, "reduction": reduction}
    try:
        new = adapter.construct(module, **kwargs, **extra)
    except NoActivationError:
        if adapter.fallback is None:
            raise
        adapter = adapter.fallback
        new = adapter.construct(module, **kwargs)
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
        params_added=sum(p.numel() for p in new.parameters()) - old_params,
        function_changing=adapter.function_changing and not getattr(adapter.target, "preserves_function", False),
        **_row_fields(new),
    )
    return new, row


def _row_fields(new: nn.Module) -> dict[str, Any]:
    """The replacement's report row fields: its ``describe()``, or, for a class without one (the
    plain ``nn.GroupNorm`` of an adapter's fallback, a user's target), what its attributes say."""
    return new.describe() if callable(getattr(new, "describe", None)) else describe_replacement(new)


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
    method: Method,
    report: ConversionReport,
) -> list[_Planned]:
    """Decide, for every norm-like module object, convert or skip; skipped ones go to ``report``.

    Adapters that ``needs_activation`` get the activation module that ``torch.fx`` proves to be
    the norm's only consumer (:mod:`ilmconvert.pairing`); a norm without one is skipped with the
    reason, unless its adapter has a ``fallback`` (an opted-in BatchNorm becomes plain GroupNorm).
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
            if activation is None and adapter.fallback is None:
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
    method: str = methods.DEFAULT,
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
        mapping: exact source class -> :class:`NormAdapter`; ``None`` for the method's mapping
            (:func:`ilmconvert.methods.mapping`: built in, plus what :func:`register` added).
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
        method: a method of the registry (:mod:`ilmconvert.methods`): ``ilm`` (ILM Norm, the
            default); ``proxy``: Proxy Norm, norm + activation pairs become standardization +
            PN-Act (``init="preserve"`` adds the output affine that keeps the function; ``"paper"``
            is the authors' layer); ``ilm+proxy``: GroupNorm (and opt-in BatchNorm) + activation
            pairs become ILM on GN whose per-instance omega, beta drive PN-Act
            (:class:`~ilmconvert.nn.ILMProxyGroupNormAct`); ``none``: the unconverted baseline,
            nothing is replaced and the (empty) report is attached all the same, so that the
            network as built saves, loads and fine-tunes through the same code as a converted one.
            Selects the method's mapping when ``mapping`` is None.

    Returns:
        The :class:`ConversionReport`.

    Raises:
        ConversionError: for bad settings, or when no module is converted (the message lists
            what was found and why it was skipped); ``model`` is then unchanged.
        Exception: whatever building a replacement raises (other than ``UnsupportedNormError``,
            which skips that module); ``model`` is then unchanged.
    """
    kinds, spec = _check_settings(norms, init, key_group_size, reduction, batchnorm, method)
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
    if not spec.converts and batchnorm is None:  # the unconverted baseline: nothing replaced, the report attached
        report.params_after = report.params_before
        model.ilm_conversion = report
        return report
    if mapping is None:
        mapping = batchnorm_mapping(methods.mapping(method), method, batchnorm, NormAdapter)
    unshared = _unshare(model, mapping)
    try:
        planned = _plan(model, mapping, kinds, include, exclude, batchnorm, spec, report)
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
