"""Which norm modules feed an activation module and nothing else, proved with ``torch.fx``.

Proxy Norm replaces a norm *and* the activation after it (docs/design.md §8). timm's norm +
activation modules carry their activation; a plain norm module is paired with a separate
activation module only where the traced graph shows that the activation, reached through
``nn.Identity`` modules (or dropouts with ``p = 0``), is the norm output's only user, and that
the activation module is called nowhere else (torchvision's ResNet calls one ``self.relu`` at
three places: its pairs are reported, not guessed).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx
from torch import nn

#: Elementwise activations that can move into PN-Act (those of torch.nn; timm's are added lazily).
_TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.CELU,
    nn.SELU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh,
)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def activation_types() -> tuple[type[nn.Module], ...]:
    """The activation module classes a norm can be paired with: torch.nn's and timm's elementwise ones."""
    from timm.layers import activations as timm_act

    extra = [getattr(timm_act, name) for name in (
        "Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish", "GELU", "GELUTanh", "QuickGELU",
    ) if hasattr(timm_act, name)]
    return (*_TORCH_ACTIVATIONS, *extra)


def _passes_through(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, _DROPOUTS) and module.p == 0)


@dataclass
class Pairing:
    """The result of :func:`find_activation_pairs`.

    Attributes:
        activations: ``id(norm)`` -> the activation module that alone consumes its output.
        reasons: ``id(norm)`` -> why a candidate norm has no activation to pair with.
    """

    activations: dict[int, nn.Module] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)


class _LeafTracer(torch.fx.Tracer):
    """Stops at the candidate norms and at activation / pass-through modules, wherever they live."""

    def __init__(self, leaves: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)


def find_activation_pairs(model: nn.Module, norm_types: tuple[type[nn.Module], ...]) -> Pairing:
    """Pair every module of an exact class in ``norm_types`` with the activation module after it.

    The whole network is traced with ``torch.fx``; where that fails, each child that holds a
    candidate norm is traced on its own, recursively, so that one untraceable spot (a data-dependent
    branch in an attention block, say) does not hide the pairs elsewhere. Inside a traced
    submodule, an activation module also registered outside it is not moved (it may be called
    there too).

    Args:
        model: the network (not modified; traced symbolically with ``torch.fx``).
        norm_types: the norm classes to pair (exact types).

    Returns:
        A :class:`Pairing`; every candidate norm is in ``activations`` or in ``reasons``. A norm
        whose smallest enclosing module ``torch.fx`` cannot trace gets the tracing error as reason.
    """
    result = Pairing()
    candidates = [m for m in model.modules() if type(m) in norm_types]
    if not candidates:
        return result
    registrations = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    _pair_within(model, norm_types, activation_types(), registrations, result)
    for m in candidates:
        if id(m) not in result.activations:
            result.reasons.setdefault(id(m), "the norm is never called in the traced forward")
    return result


def _pair_within(
    module: nn.Module,
    norm_types: tuple[type[nn.Module], ...],
    activations: tuple[type[nn.Module], ...],
    registrations: Counter,
    result: Pairing,
) -> None:
    """Trace ``module`` and pair its norms; where it cannot be traced, recurse into its children."""
    try:
        graph = _LeafTracer((*norm_types, *activations, nn.Identity, *_DROPOUTS)).trace(module)
    except Exception as err:  # torch.fx raises many types for untraceable code
        reason = f"torch.fx cannot trace {type(module).__name__} ({type(err).__name__}), so its norms are not paired"
        for child in module.children():
            if type(child) in norm_types:  # called by the module that cannot be traced
                result.reasons.setdefault(id(child), reason)
            elif any(type(m) in norm_types for m in child.modules()):
                _pair_within(child, norm_types, activations, registrations, result)
        return
    modules = dict(module.named_modules(remove_duplicate=False))
    inside = Counter(id(m) for m in modules.values())
    calls = Counter(id(modules[n.target]) for n in graph.nodes if n.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in norm_types:
            continue
        norm = modules[node.target]
        found, reason = _follow(node, modules, activations, calls)
        if calls[id(norm)] > 1:
            found, reason = None, f"the norm module is called at {calls[id(norm)]} places"
        elif found is not None and registrations[id(found)] > inside[id(found)]:
            found, reason = None, f"its activation module is also registered outside {type(module).__name__}"
        if found is not None:
            result.activations[id(norm)] = found
        else:
            result.reasons.setdefault(id(norm), reason)


def _follow(
    node: torch.fx.Node, modules: dict[str, nn.Module], activations: tuple[type[nn.Module], ...], calls: Counter
) -> tuple[nn.Module | None, str]:
    """The activation module that alone consumes ``node``'s output, or ``(None, reason)``."""
    current = node
    while True:
        users = list(current.users)
        if len(users) != 1:
            return None, f"its output has {len(users)} users, not one activation"
        user = users[0]
        module = modules.get(user.target) if user.op == "call_module" else None
        if module is None:
            what = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", str(user.target))
            return None, f"no activation module follows (its output goes to {what})"
        if _passes_through(module):
            current = user
            continue
        if not isinstance(module, activations):
            return None, f"no activation module follows (its output goes to {type(module).__name__})"
        if calls[id(module)] > 1:
            return None, (
                f"its activation module {user.target} ({type(module).__name__}) is shared: called at "
                f"{calls[id(module)]} places, so it cannot move into the norm"
            )
        if len(user.args) != 1 or user.kwargs:
            return None, f"the activation {user.target} takes more than the norm's output"
        return module, ""
