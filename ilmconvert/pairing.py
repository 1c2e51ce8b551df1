"""Which norm modules feed an activation module and nothing else, proved with ``torch.fx``.

Proxy Norm replaces a norm *and* the activation after it (docs/design.md §8). timm's norm +
activation modules carry their activation; a plain norm module is paired with a separate
activation module only where the traced graph shows that the activation, reached through
``nn.Identity`` modules (or dropouts with ``p = 0``), is the norm output's only user, and that
the activation module is called nowhere else. Where one activation module is called at several
places (torchvision's ResNet blocks call one ``self.relu`` three times), :func:`unshare_activations`
first re-traces that module so that each call has its own copy.
"""

from __future__ import annotations

import copy
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


@dataclass
class Unshared:
    """A module that :func:`unshare_activations` replaced by a ``torch.fx`` trace of itself in which
    each call of a shared activation module has its own module.

    Attributes:
        name: the module's qualified name (``"layer1.0"``).
        parent, attribute: where it sits (``parent._modules[attribute]``).
        original: the module as it was; traced: the ``torch.fx.GraphModule`` in its place, which
            holds the same child objects (so the same parameters) plus the copies.
        activations: the attribute names of the activation modules, one per call site, in call
            order, for each shared activation (``{"relu": ["relu", "relu_1", "relu_2"]}``).
    """

    name: str
    parent: nn.Module
    attribute: str
    original: nn.Module
    traced: torch.fx.GraphModule
    activations: dict[str, list[str]]

    def restore(self) -> None:
        """Put the original module back."""
        self.parent._modules[self.attribute] = self.original

    def note(self) -> str:
        shared = ", ".join(f"{name} -> {', '.join(copies)}" for name, copies in self.activations.items())
        return f"{self.name} re-traced with torch.fx so that each activation call has its own module: {shared}"


class _ChildTracer(torch.fx.Tracer):
    """Traces one module with every direct child as a leaf, so that the trace keeps the module's
    own structure (the ``GraphModule`` holds the same children, under the same names)."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._children = {id(m) for m in root.children()}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._children


def unshare_activations(model: nn.Module, norm_types: tuple[type[nn.Module], ...]) -> list[Unshared]:
    """Give each call of a shared activation module its own module where a norm feeds one of the calls.

    torchvision's ResNet blocks call one ``self.relu`` after ``bn1``, after ``bn2`` and after the
    residual addition, so no BN -> ReLU pair can take the ReLU over. Every module below the root
    (and not inside one already re-traced) that ``torch.fx`` can trace (direct children as leaves),
    that is registered once, has no hooks, reads exactly its own parameters and buffers, and calls
    a parameter-free activation child (registered nowhere else) at several places, one of them on
    the output of a direct child of a class in ``norm_types`` (through ``nn.Identity`` / ``p = 0``
    dropouts), is replaced in its parent by a ``torch.fx.GraphModule`` of its trace (class name and
    ``training`` flag kept) whose first call keeps the activation and whose other calls get copies
    named ``relu_1``, ``relu_2``, ... Parameters and buffers are the same objects, so state-dict
    keys and values do not change.

    Modifies ``model`` in place; :meth:`Unshared.restore` undoes one replacement.

    Returns:
        One :class:`Unshared` per replaced module, in ``named_modules`` order.
    """
    registrations = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    activations = activation_types()
    done = []
    for name, module in list(model.named_modules()):
        if (
            not name or registrations[id(module)] > 1 or isinstance(module, torch.fx.GraphModule)
            or module._forward_hooks or module._forward_pre_hooks
            or any(name.startswith(f"{outer.name}.") for outer in done)  # one level: restoring stays simple
        ):
            continue
        candidates = {
            attribute for attribute, child in module._modules.items()
            if isinstance(child, activations) and registrations[id(child)] == 1
            and next(child.parameters(), None) is None and next(child.buffers(), None) is None
        }
        if not candidates or not any(type(child) in norm_types for child in module.children()):
            continue  # trace only where a norm child may feed a shared activation
        try:
            graph = _ChildTracer(module).trace(module)
        except Exception:  # torch.fx raises many types for untraceable code
            continue
        own = {n for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None}
        if set(_attributes_used(graph)) != own:  # reads something else, or leaves a tensor unused
            continue
        calls: dict[str, list[torch.fx.Node]] = {a: [] for a in candidates}
        for node in graph.nodes:
            if node.op == "call_module" and node.target in calls:
                calls[node.target].append(node)
        shared = {a: nodes for a, nodes in calls.items() if len(nodes) > 1 and any(
            _fed_by_norm(n, module, norm_types) for n in nodes)}
        if not shared:
            continue
        children: dict[str, nn.Module] = dict(module.named_children())
        copies: dict[str, list[str]] = {}
        for attribute, nodes in shared.items():
            copies[attribute] = [attribute]
            for node in nodes[1:]:
                index, fresh = 1, f"{attribute}_1"
                while fresh in children or hasattr(module, fresh):
                    index += 1
                    fresh = f"{attribute}_{index}"
                children[fresh] = copy.deepcopy(module._modules[attribute])
                node.target = fresh
                copies[attribute].append(fresh)
        graph.lint()
        traced = torch.fx.GraphModule({**children, **{n: getattr(module, n) for n in own}}, graph,
                                      class_name=type(module).__name__)
        traced._modules = dict(children)  # every child, in the original order, copies last
        traced.train(module.training)
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parent._modules[attribute] = traced
        done.append(Unshared(name, parent, attribute, module, traced, copies))
    return done


def _attributes_used(graph: torch.fx.Graph) -> list[str]:
    """The ``get_attr`` targets of ``graph`` (parameters / buffers the traced module reads itself)."""
    return [str(n.target) for n in graph.nodes if n.op == "get_attr"]


def _fed_by_norm(node: torch.fx.Node, module: nn.Module, norm_types: tuple[type[nn.Module], ...]) -> bool:
    """Whether ``node`` (an activation call) takes the output of a norm child, through pass-throughs."""
    current = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    while isinstance(current, torch.fx.Node) and current.op == "call_module" and len(current.users) == 1:
        child = module.get_submodule(str(current.target))
        if type(child) in norm_types:
            return True
        if not _passes_through(child):
            return False
        current = current.args[0] if len(current.args) == 1 else None
    return False
