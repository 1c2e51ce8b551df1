"""The zoo sweep's checks of one converted network, shared by the sweep and the tests.

``benchmarks/zoo_sweep.py`` (through :mod:`benchmarks.zoo.record`) runs them on every timm /
torchvision architecture, ``tests/test_zoo_subset.py`` on a fast subset, and
``benchmarks/proxy_batchnorm_sweep.py`` uses the round trip and the batch-independence check:

- :func:`randomize_norm_affines` (``w ~ N(1, 0.5)``, ``b ~ N(0, 0.5)``: preservation is not
  ``1 * x + 0``) and :func:`reinit_zero_linears` (a zero-initialized head makes every output 0);
- :func:`check_preservation`: ``max |after - before| / max |before|`` over every floating-point output;
- :func:`check_backward`: one train-mode forward + backward, and which ILM (PN-Act) layers get a
  finite gradient;
- :func:`check_save_load`: ``ilmconvert.save`` -> ``ilmconvert.load`` gives bit-identical float32 outputs;
- :func:`batch_dependence`: does a sample's output depend on the rest of its batch;
- :func:`compile_fx_export`: ``torch._dynamo.explain`` graph breaks, ``torch.fx`` and ``torch.export``.

A network is called with a ``task``'s positional arguments (:func:`make_inputs`): ``image`` (a
batch), ``detection`` (a list of images; the raw head outputs are compared) or ``flow`` (RAFT's two
frames, :data:`FLOW_UPDATES` refinement steps).
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils._pytree import tree_leaves, tree_map

import ilmconvert
from ilmconvert.errors import first_line as _first_line
from ilmconvert.nn import ILMNorm, ProxyNormAct

FLOW_UPDATES = 4  # RAFT refinement iterations in the sweep (the default is 12)
#: the instance-level norms: what ILM Norm converts, and what :func:`randomize_norm_affines` draws
INSTANCE_NORMS = (nn.GroupNorm, nn.LayerNorm, _InstanceNorm)


def first_line(err: BaseException) -> str:
    """``"TypeName: first line of the message"``, at most 300 characters (a record's error field)."""
    return _first_line(err)[:300]


def class_path(cls: type) -> str:
    """``module.QualifiedName`` of a class, as the conversion report names sources."""
    return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------------------ the network
def family(library: str, name: str) -> str:
    """The module that defines architecture ``name``: timm's (``convnext``) or torchvision's
    (``detection.fcos``, ``video.swin_transformer``, ...)."""
    if library == "timm":
        from timm.models._registry import _model_to_module

        return _model_to_module.get(name, "?")
    import torchvision

    mod = torchvision.models.get_model_builder(name).__module__
    return mod.removeprefix("torchvision.models.")


def build(spec: str, kwargs: dict | None = None, device: str | None = None) -> nn.Module:
    """``ilmconvert.create_model(spec, pretrained=False, **kwargs)``, with no backbone download for
    torchvision builders that take ``weights_backbone``."""
    library, name = spec.split(":", 1)
    kwargs = dict(kwargs or {})
    if library == "torchvision":
        import inspect

        import torchvision

        if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
            kwargs = {"weights_backbone": None, **kwargs}
    return ilmconvert.create_model(spec, pretrained=False, device=device, **kwargs)


def census(model: nn.Module) -> dict:
    """``{"norms", "batchnorm", "other_norms"}``: modules per class path of the instance-level norms
    (GroupNorm / LayerNorm / InstanceNorm subclasses), of the BatchNorms, and of other norm-like
    modules (RmsNorm, EvoNorm, GRN, ...: a class name with "norm" that subclasses nothing standard)."""
    norms, bn, other = Counter(), Counter(), Counter()
    not_norms = ("conv", "mlp", "head", "block", "net", "linear", "stage", "attention")
    for mod in model.modules():
        if isinstance(mod, INSTANCE_NORMS):
            norms[class_path(type(mod))] += 1
        elif isinstance(mod, _BatchNorm):
            bn[class_path(type(mod))] += 1
        else:
            low = type(mod).__name__.lower()
            if "norm" in low and not any(s in low for s in not_norms):
                other[class_path(type(mod))] += 1
    return {"norms": dict(norms), "batchnorm": dict(bn), "other_norms": dict(other)}


def randomize_norm_affines(
    model: nn.Module,
    seed: int = 1,
    scale: float = 0.5,
    types: tuple[type, ...] = INSTANCE_NORMS,
    extra: Callable[[nn.Module], Iterable[torch.Tensor]] | None = None,
) -> None:
    """Non-trivial norm affines, so that a preservation check is not about ``1 * x + 0``.

    For every module of ``model`` (itself included) that is an instance of ``types``:
    ``weight ~ 1 + scale * N(0, 1)``, ``bias ~ scale * N(0, 1)``, then each tensor of ``extra(module)``
    ``~ scale * N(0, 1)``, drawn in float64 from a generator seeded with ``seed`` and cast to each
    tensor's dtype and device. Modules without an affine keep none; other modules keep their values.
    """
    g = torch.Generator().manual_seed(seed)

    def fill(p: torch.Tensor | None, mean: float) -> None:
        if isinstance(p, torch.Tensor):
            p.copy_(mean + scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, types):
                fill(getattr(m, "weight", None), 1.0)
                fill(getattr(m, "bias", None), 0.0)
                for p in extra(m) if extra is not None else ():
                    fill(p, 0.0)


def reinit_zero_linears(model: nn.Module) -> None:
    """Give zero-initialized linears (torchvision's ViT classifier) N(0, 0.02) weights from torch's
    global generator, so that outputs depend on the network and comparing them means something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.02)


class no_init:
    """Make the weight-init functions no-ops (parameters stay uninitialized until loaded): a fast
    rebuild of an architecture whose every parameter is overwritten next."""

    def __enter__(self):
        import timm.layers.weight_init as wi

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


# ------------------------------------------------------------------------------------- calling it
def task_of(family_name: str) -> str:
    """How a network of ``family_name`` is called: ``image`` (a batch), ``detection`` or ``flow``."""
    return {"detection": "detection", "optical_flow": "flow"}.get(family_name.split(".")[0], "image")


def make_inputs(task: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: str) -> tuple:
    """Positional arguments of one forward call, ``N(0, 1)`` from ``gen``: a batch of ``shape``, a
    list of its images (``detection``), or two frames of ``shape`` (``flow``)."""
    x = torch.randn(*shape, generator=gen, dtype=dtype).to(device)
    if task == "detection":
        return (list(x.unbind(0)),)
    if task == "flow":
        return (x, torch.randn(*shape, generator=gen, dtype=dtype).to(device))
    return (x,)


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _call(model: nn.Module, args: tuple, task: str):
    return model(*args, num_flow_updates=FLOW_UPDATES) if task == "flow" else model(*args)


def forward_outputs(model: nn.Module, args: tuple, task: str = "image") -> list[torch.Tensor]:
    """The network's floating-point outputs, flattened, without autograd. For detection networks
    these are the raw outputs of ``model.head`` (class logits, box regression, centerness): the
    post-processed detections pass a score threshold, top-k and NMS, which hide or exaggerate small
    differences."""
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


def train_loss(model: nn.Module, args: tuple, task: str = "image") -> torch.Tensor:
    """A scalar to backpropagate in train mode: the detection losses for two boxes per image, else
    the mean square of every output (in float32)."""
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


# ------------------------------------------------------------------------------------- the checks
def output_difference(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[float, float]:
    """``(max |after - before|, that / max |before|)`` over paired outputs, in float64 (the absolute
    difference when every ``before`` is 0)."""
    max_abs = max(float((a.double() - b.double()).abs().max()) for a, b in zip(after, before))
    scale = max(float(b.double().abs().max()) for b in before)
    return max_abs, (max_abs / scale if scale else max_abs)


@dataclass
class Preservation:
    """How far the converted network's outputs are from the original ones."""

    max_abs_diff: float
    rel_diff: float
    finite: bool  #: every output of the converted network is finite


def check_preservation(model: nn.Module, args: tuple, before: list[torch.Tensor], task: str = "image") -> Preservation:
    """``model``'s outputs on ``args`` against ``before`` (:func:`forward_outputs` of the original)."""
    after = forward_outputs(model, args, task)
    max_abs, rel = output_difference(before, after)
    return Preservation(max_abs, rel, all(bool(torch.isfinite(a).all()) for a in after))


@dataclass
class Gradients:
    """What one train-mode backward gave the converted layers (ILM layers, or PN-Act ones)."""

    layers: int  #: converted layers in the network
    unused: int  #: layers without any gradient (their forward never ran)
    nonfinite: list[str]  #: names of layers with a missing or non-finite gradient on some parameter
    loss_finite: bool
    decoders_learning: int = 0  #: ILM layers whose association decoder (``decoder_gamma``) got a nonzero gradient

    @property
    def ok(self) -> bool:
        """A finite loss, no missing or non-finite gradient, and at least one layer used."""
        return self.loss_finite and not self.nonfinite and self.unused < self.layers


def check_backward(model: nn.Module, args: tuple, task: str = "image", method: str = "ilm") -> Gradients:
    """One train-mode forward + backward of :func:`train_loss`, then the gradients of every ILM layer
    (``method="ilm"``) or PN-Act layer (otherwise). Leaves ``model`` in train mode, gradients cleared."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = train_loss(model, args, task)
    loss.backward()
    kind = ILMNorm if method == "ilm" else ProxyNormAct
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    unused, nonfinite, learning = 0, [], 0
    for n, m in layers:
        if kind is ILMNorm:
            params = [*m.parameters(recurse=False)]
            params += [p for c in (m.encoder, m.decoder_mu, m.decoder_gamma) for p in c.parameters()]
        else:
            params = [*m.parameters()]
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            unused += 1
        elif any(g is None or not bool(torch.isfinite(g).all()) for g in grads):
            nonfinite.append(n)
        elif kind is ILMNorm and bool(m.decoder_gamma.weight.grad.abs().sum() > 0):
            learning += 1
    model.zero_grad(set_to_none=True)
    return Gradients(len(layers), unused, nonfinite, bool(torch.isfinite(loss)), learning)


def check_save_load(
    model: nn.Module,
    args: tuple,
    task: str = "image",
    rebuild: Callable[[], nn.Module] | None = None,
    device: str | None = None,
) -> tuple[bool, tuple]:
    """``(exact, args32)``: whether ``ilmconvert.save`` -> ``ilmconvert.load`` gives bit-identical
    float32 outputs, and the float32 arguments used. ``load`` takes the unconverted network from
    ``rebuild()`` when given (it re-converts it and loads every tensor strictly), else rebuilds it from
    the checkpoint itself. ``model`` is left in float32 eval mode; the loaded copy goes to ``device``."""
    model.eval().float()
    args32 = tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) else t, args)
    ref = forward_outputs(model, args32, task)
    with tempfile.TemporaryDirectory() as tmp:
        ilmconvert.save(model, Path(tmp) / "ckpt")
        fresh = {} if rebuild is None else {"model": rebuild()}
        loaded = ilmconvert.load(Path(tmp) / "ckpt", **fresh)
        if device is not None:
            loaded = loaded.to(device)
        got = forward_outputs(loaded, args32, task)
    return all(torch.equal(a, b) for a, b in zip(ref, got)), args32


def batch_dependence(model: nn.Module, x: torch.Tensor) -> float:
    """``max |model(x)[:1] - model(x[:1])| / max |model(x)|``: 0 when a sample's output ignores the
    rest of its batch (up to the rounding of batched kernels), of order 1 for batch statistics."""
    with torch.no_grad():
        y = model(x)
        alone = model(x[:1])
    return float((y[:1] - alone).abs().max() / y.abs().max().clamp_min(1e-12))


def compile_fx_export(original: nn.Module, model: nn.Module, x: torch.Tensor) -> dict:
    """torch.compile / fx / export checks of the float32 eval-mode converted ``model`` against its
    ``original``: graph breaks of each (``torch._dynamo.explain``), whether ``torch.fx.symbolic_trace``
    of the converted network runs and matches it where the original traces, and whether
    ``torch.export.export`` of it does (``allclose`` at 1e-5)."""
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
        out["explain_error"] = first_line(err)
    finally:
        torch._dynamo.reset()
    try:
        torch.fx.symbolic_trace(original)
        out["fx_original"] = True
    except Exception as err:  # noqa: BLE001
        out["fx_original"] = False
        out["fx_original_error"] = first_line(err)
    if out["fx_original"]:
        try:
            gm = torch.fx.symbolic_trace(model)
            out["fx_converted"] = _close(forward_outputs(model, (x,)), forward_outputs(gm, (x,)))
        except Exception as err:  # noqa: BLE001
            out["fx_converted"] = False
            out["fx_error"] = first_line(err)
    try:
        ep = torch.export.export(model.eval(), (x,))
        out["export"] = _close(forward_outputs(model, (x,)), forward_outputs(ep.module(), (x,)))
    except Exception as err:  # noqa: BLE001
        out["export"] = False
        out["export_error"] = first_line(err)
    return out


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(u, v, rtol=1e-5, atol=1e-5) for u, v in zip(a, b))
