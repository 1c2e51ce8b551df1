"""Proxy Normalization (Labatie, Masters, Eaton-Rosen & Luschi, NeurIPS 2021), as a layer and as norms.

Proxy Norm normalizes the *post-activation* of a batch-independent norm with statistics of a
proxy distribution instead of the batch. Per channel c, with x_hat the standardized input:

- z = phi(gamma_c * x_hat + beta_c)                         (affine and activation)
- q_i = sqrt(2) * erfinv(2 (i + 1/2) / n - 1), i < n        (deterministic Gaussian quantiles)
- y~_i = (1 + gamma~_c) q_i + beta~_c                       (the proxy, shifted and scaled)
- m_c = mean_i phi(gamma_c y~_i + beta_c), v_c = biased variance over i
- output (z - m_c) / sqrt(v_c + eps)

The proxy is a ``(C, n)`` computation per call, so its statistics cost nothing and gradients flow
through them. :class:`ProxyNormAct` is that layer; :class:`ProxyGroupNormAct` and
:class:`ProxyLayerNormAct` put GroupNorm / LayerNorm standardization (without affine) in front of
it and build themselves from timm's ``GroupNormAct`` / ``LayerNormAct(2d)`` (and, opt-in,
``BatchNormAct2d``) through ``from_norm`` (:class:`~ilmconvert.nn.from_norm.FromNorm`), so
:func:`ilmconvert.convert` swaps them in with the ``proxy`` method (docs/design.md §8). The pieces
shared with ILM + Proxy Norm are in :mod:`ilmconvert.nn.proxy_common`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernel, cpu_op
from .fast import autocast_disabled, exporting
from .from_norm import FromNorm, group_norm_settings, layer_norm_settings
from .proxy_common import (
    ProxyFromNorm,
    add_proxy_parameters,
    cached_proxy_points,
    normalizing_map,
    proxy_moments,
    proxy_points,
    proxy_points_float64,
    reset_proxy_parameters,
    resolve_activation,
)


def _functorch_active() -> bool:
    """True inside ``torch.func`` transforms (vmap, grad, jacrev...), which need the composed formula."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _proxy_preactivation(
    weight: torch.Tensor, bias: torch.Tensor, proxy_weight: torch.Tensor, proxy_bias: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """``gamma y~ + beta`` on the proxy, ``(C, n)``, as ``B + A q`` with ``A = gamma (1 + gamma~)`` and
    ``B = beta + gamma beta~`` (two ``(C,)`` products and one ``(C, n)`` pass)."""
    slope = weight * (1.0 + proxy_weight)
    intercept = torch.addcmul(bias, weight, proxy_bias)
    return torch.addcmul(intercept[:, None], slope[:, None], q)


class _ActivationKernels(NamedTuple):
    """phi and its backward as aten kernels: ``forward(module, a)`` and
    ``backward(grad, module, a, z) = grad * phi'(a)``."""

    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


#: The common activations for :class:`_ProxyCoefficients`; any other takes autograd on the small graph.
_ACTIVATION_KERNELS: dict[type[nn.Module], _ActivationKernels] = {
    nn.ReLU: _ActivationKernels(
        lambda act, a: torch.relu(a), lambda grad, act, a, z: torch.ops.aten.threshold_backward(grad, z, 0)
    ),
    nn.GELU: _ActivationKernels(
        lambda act, a: F.gelu(a, approximate=act.approximate),
        lambda grad, act, a, z: torch.ops.aten.gelu_backward(grad, a, approximate=act.approximate),
    ),
    nn.SiLU: _ActivationKernels(
        lambda act, a: F.silu(a), lambda grad, act, a, z: torch.ops.aten.silu_backward(grad, a)
    ),
}


class _ProxyCoefficients(torch.autograd.Function):
    """PN-Act's per-channel output map ``(scale, shift)`` from its parameters, with a hand-written backward.

    Forward (``(C,)`` parameters, ``(n,)`` points ``q``): ``a = B + A q`` (:func:`_proxy_preactivation`),
    ``z = phi(a)``, ``m, v`` = mean and biased variance over the proxy, ``r = (v + eps)^(-1/2)``;
    ``scale = r w_out``, ``shift = b_out - m r w_out`` (``w_out = 1``, ``b_out = 0`` without output affine).

    Backward, with ``d = z - m``: ``dL/dm = -g_shift r w_out``, ``dL/dr = (g_scale - g_shift m) w_out``,
    ``dL/dv = -dL/dr r^3 / 2``, ``dL/dz = (dL/dm + 2 dL/dv d) / n`` (``sum d = 0``); ``dL/da`` by phi's
    aten backward kernel (ReLU, GELU, SiLU) or by autograd on the small ``(C, n)`` graph; then
    ``A``, ``B`` back to gamma, beta, gamma~, beta~. Checked by ``gradcheck`` against finite
    differences (tests/test_proxy.py). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, weight, bias, proxy_weight, proxy_bias, output_weight, output_bias, q, act, eps):
        slope, intercept = weight * (1.0 + proxy_weight), torch.addcmul(bias, weight, proxy_bias)
        ctx.act, ctx.kernels = act, _ACTIVATION_KERNELS.get(type(act))
        if ctx.kernels is not None:
            a = torch.addcmul(intercept[:, None], slope[:, None], q)
            z = ctx.kernels.forward(act, a)
            ctx.activation = (a, z)
        else:
            with torch.enable_grad():
                leaves = (slope.detach().requires_grad_(), intercept.detach().requires_grad_())
                z = act(torch.addcmul(leaves[1][:, None], leaves[0][:, None], q))
            ctx.activation = (leaves, z)
            z = z.detach()
        m, centred, v = proxy_moments(z)
        r = torch.rsqrt(v + eps)
        scale, shift = r, -m * r
        if output_weight is not None:
            scale, shift = r * output_weight, torch.addcmul(output_bias, shift, output_weight)
        ctx.centred = centred
        ctx.save_for_backward(weight, proxy_weight, proxy_bias, output_weight, q, m, r)
        return scale, shift

    @staticmethod
    def backward(ctx, grad_scale, grad_shift):
        weight, proxy_weight, proxy_bias, output_weight, q, m, r = ctx.saved_tensors
        grad_output_weight = grad_output_bias = None
        grad_r = torch.addcmul(grad_scale, grad_shift, m, value=-1.0)  # before the output affine
        grad_m = -grad_shift * r
        if output_weight is not None:
            grad_output_weight, grad_output_bias = grad_r * r, grad_shift
            grad_r, grad_m = grad_r * output_weight, grad_m * output_weight
        grad_v = -0.5 * grad_r * r * r * r
        n = q.shape[0]
        grad_z = torch.addcmul((grad_m / n)[:, None], ctx.centred, (2.0 / n * grad_v)[:, None])
        if ctx.kernels is not None:
            a, z = ctx.activation
            grad_a = ctx.kernels.backward(grad_z, ctx.act, a, z)
            grad_slope, grad_intercept = grad_a @ q, grad_a.sum(1)
        else:
            leaves, z = ctx.activation
            grad_slope, grad_intercept = torch.autograd.grad(z, leaves, grad_z, retain_graph=True)  # again if asked
        grad_weight = torch.addcmul(grad_slope * (1.0 + proxy_weight), grad_intercept, proxy_bias)
        return (
            grad_weight, grad_intercept, grad_slope * weight, grad_intercept * weight,
            grad_output_weight, grad_output_bias, None, None, None,
        )


@torch.fx.wrap
def proxy_forward(layer: ProxyNormAct, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` as one opaque call for ``torch.fx.symbolic_trace``: the layers check shapes and
    pick a path from the input (Python control flow that FX proxies cannot answer), so a converted
    network traces with each Proxy Norm layer as a single node run eagerly. ``torch.compile`` and
    ``torch.export`` trace through it as usual."""
    return layer._forward(x)


class ProxyNormAct(nn.Module):
    """Affine, activation and proxy normalization of a standardized tensor (Proxy Norm's PN-Act).

    Args:
        num_channels: C.
        act_layer: the elementwise activation phi: a module (used as is), a module class, or a name
            timm's ``create_act_layer`` knows (``"relu"``, ``"gelu"``, ``"silu"``, ...).
        num_proxy: n, the number of proxy points (200 in the authors' code).
        eps: added to the proxy variance (0.03 in the authors' code).
        channels_first: input ``(B, C, *spatial)`` when True, ``(..., C)`` when False.
        output_affine: add a per-channel affine after the normalization (``output_weight``,
            ``output_bias``); :meth:`init_preserve` uses it to reproduce ``phi(w x_hat + b)``.
        device, dtype: where and how to create the parameters.

    Parameters:
        weight: gamma ``(C,)``; bias: beta ``(C,)``; proxy_weight: gamma~ ``(C,)`` (0 at init);
        proxy_bias: beta~ ``(C,)`` (0 at init); output_weight / output_bias ``(C,)`` or None.

    Shapes: input and output alike; the output has the input's dtype. The proxy statistics are
    computed in float32 (float64 for float64 parameters and input), outside autocast.
    """

    def __init__(
        self,
        num_channels: int,
        act_layer: nn.Module | type[nn.Module] | str | None = nn.ReLU,
        *,
        num_proxy: int = 200,
        eps: float = 0.03,
        channels_first: bool = True,
        output_affine: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_channels < 1 or num_proxy < 2:
            raise ValueError(f"num_channels ({num_channels}) must be >= 1 and num_proxy ({num_proxy}) >= 2")
        factory = {"device": device, "dtype": dtype}
        self.num_channels = int(num_channels)
        self.num_proxy = int(num_proxy)
        self.eps = float(eps)
        self.channels_first = bool(channels_first)
        self.act = resolve_activation(act_layer)
        proxy_points_float64(self.num_proxy)  # now, eagerly: under torch.export tensors are fake
        self.weight = nn.Parameter(torch.ones(self.num_channels, **factory))
        self.bias = nn.Parameter(torch.zeros(self.num_channels, **factory))
        add_proxy_parameters(self, output_affine, factory)

    def proxy_statistics(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``m`` and biased variance ``v`` of ``phi(gamma y~ + beta)`` over the proxy, each ``(C,)``.

        Composed of torch ops (autograd differentiates it); :meth:`output_coefficients` uses the
        same forward with a hand-written backward in eager mode.

        Args:
            dtype: the computation dtype (default: float64 for float64 parameters, else float32).
        """
        st = self._statistics_dtype(dtype)
        with autocast_disabled(self.weight.device.type):
            q = proxy_points(self.num_proxy, st, self.weight.device)
            params = (p.to(st) for p in (self.weight, self.bias, self.proxy_weight, self.proxy_bias))
            m, _, v = proxy_moments(self.act(_proxy_preactivation(*params, q)))
        return m, v

    def output_coefficients(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)``, each ``(C,)``: the output is ``phi(gamma x_hat + beta) * scale + shift``.

        In eager mode one autograd node (:class:`_ProxyCoefficients`, a hand-written backward: the
        proxy's two dozen small ops cost more than the layer's elementwise passes otherwise); while
        compiling, tracing or exporting the same formula in torch ops (:meth:`proxy_statistics`),
        which the compiler fuses and the exporters record.
        """
        st = self._statistics_dtype(dtype)
        if torch.compiler.is_compiling() or exporting() or _functorch_active():
            return self._composed_output_coefficients(st)
        with autocast_disabled(self.weight.device.type):
            params = [
                p.to(st) if p is not None else None
                for p in (self.weight, self.bias, self.proxy_weight, self.proxy_bias)
                + (self.output_weight, self.output_bias)
            ]
            q = cached_proxy_points(self.num_proxy, st, self.weight.device)
            return _ProxyCoefficients.apply(*params, q, self.act, self.eps)

    def _composed_output_coefficients(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`output_coefficients` in torch ops (autograd differentiates it), in ``dtype``."""
        m, v = self.proxy_statistics(dtype)
        return normalizing_map(m, v, self.eps, self.output_weight, self.output_bias)

    def _statistics_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return dtype or (torch.float64 if self.weight.dtype == torch.float64 else torch.float32)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialization: gamma = 1, beta = 0, gamma~ = beta~ = 0 (output affine 1, 0)."""
        self.weight.fill_(1.0)
        self.bias.zero_()
        reset_proxy_parameters(self)

    @torch.no_grad()
    def init_preserve(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        """Take over a norm's affine (``None``: 1 and 0) so that the layer computes ``phi(w x_hat + b)``.

        Sets gamma = w, beta = b, gamma~ = beta~ = 0 and the output affine to ``sqrt(v + eps)`` and
        ``m`` of the resulting proxy statistics, which undoes the proxy normalization up to
        rounding (about one ulp).

        Raises:
            ValueError: when the layer has no output affine (build it with ``output_affine=True``).
        """
        if self.output_weight is None:
            raise ValueError("init_preserve needs output_affine=True")
        self.weight.copy_(weight.detach() if weight is not None else torch.ones_like(self.weight))
        self.bias.copy_(bias.detach() if bias is not None else torch.zeros_like(self.bias))
        reset_proxy_parameters(self)
        m, v = self.proxy_statistics(torch.float64)
        self.output_weight.copy_(torch.sqrt(v + self.eps))
        self.output_bias.copy_(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer (PN-Act here; standardization + PN-Act in the subclasses); see :meth:`_forward`.

        ``torch.fx.symbolic_trace`` sees one opaque call (:func:`proxy_forward`), as for ILM layers.
        """
        return proxy_forward(self, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """PN-Act of a standardized ``x``: ``(B, C, *spatial)`` (channels_first) or ``(..., C)``.

        Raises:
            ValueError: if ``x`` does not have ``num_channels`` channels.
        """
        dim = 1 if self.channels_first else -1
        if x.dim() < (2 if self.channels_first else 1) or x.shape[dim] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_channels} channels, got input of shape {tuple(x.shape)}"
            )
        shape = self._channel_shape(x)
        return self._activate_and_normalize(
            torch.addcmul(self.bias.to(x.dtype).view(shape), x, self.weight.to(x.dtype).view(shape))
        )

    def _channel_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (self.num_channels, *([1] * (x.dim() - 2))) if self.channels_first else (self.num_channels,)

    def _activate_and_normalize(self, u: torch.Tensor) -> torch.Tensor:
        """``act(u) * scale + shift`` for the pre-activation ``u = gamma x_hat + beta``."""
        scale, shift = self.output_coefficients(torch.float64 if u.dtype == torch.float64 else None)
        shape = self._channel_shape(u)
        z = self.act(u)
        return torch.addcmul(shift.to(z.dtype).view(shape), z, scale.to(z.dtype).view(shape))

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, num_proxy={self.num_proxy}, eps={self.eps}, channels_first={self.channels_first}, "
            f"output_affine={self.output_weight is not None}"
        )


class ProxyGroupNormAct(ProxyFromNorm, FromNorm, ProxyNormAct):
    """GroupNorm standardization (no affine) followed by :class:`ProxyNormAct`: GN + PN.

    Replaces timm's ``GroupNormAct`` / ``GroupNorm1Act`` (and, opt-in and function-changing,
    ``BatchNormAct2d``: G = 32 or the largest divisor of C not above 32). Input ``(B, C, *spatial)``;
    the parameters are those of :class:`ProxyNormAct` (``weight`` and ``bias`` keep the names of
    the replaced norm's affine).

    Args:
        num_groups, num_channels: as in ``nn.GroupNorm``.
        eps: the standardization's eps (``norm_eps``), as in ``nn.GroupNorm``.
        proxy_eps: the proxy normalization's eps (``eps`` of :class:`ProxyNormAct`).
        act_layer, num_proxy, output_affine, device, dtype: of :class:`ProxyNormAct`.

    Raises:
        ValueError: if C is not a multiple of G.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        *,
        act_layer: Any = nn.ReLU,
        proxy_eps: float = 0.03,
        **kwargs: Any,
    ) -> None:
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be a multiple of num_groups ({num_groups})")
        super().__init__(num_channels, act_layer, eps=proxy_eps, channels_first=True, **kwargs)
        self.num_groups, self.norm_eps = int(num_groups), float(eps)

    @classmethod
    def _settings_of(cls, norm: nn.Module, **layout: Any) -> dict[str, Any]:
        return group_norm_settings(norm, **layout)  # opt-in BatchNorm -> GN + PN: function-changing

    @property
    def num_norm_groups(self) -> int:
        return self.num_groups

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """GN standardization, then PN-Act; ``x`` is ``(B, C, *spatial)``.

        The affine gamma, beta runs inside ``F.group_norm`` (one pass fewer than standardizing and
        then :meth:`ProxyNormAct.forward`; the same function). On eager CPU, where
        :func:`~ilmconvert.nn.cpu_kernel.proxy_applies`, the whole layer is one call into the
        compiled kernel forward and one backward: the C++ operator of :mod:`~ilmconvert.nn.cpu_op`
        (autograd in C++), else through ``ctypes`` (:class:`~ilmconvert.nn.cpu_kernel.ProxyGroupNormActCPU`).
        """
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            return super()._forward(x)  # raises the channel error
        params = (self.weight, self.bias, self.proxy_weight, self.proxy_bias, self.output_weight, self.output_bias)
        if not exporting() and not _functorch_active() and cpu_kernel.proxy_applies(x, params, self.act):
            q = cached_proxy_points(self.num_proxy, torch.float64, x.device, eager=True)
            code = cpu_kernel.activation_code(self.act)
            op = cpu_op.proxy_operator()
            if op is not None:  # the same kernel as a C++ autograd op (docs/design.md §4)
                return op(x, *params, q, self.num_groups, self.norm_eps, self.eps, code)
            spec = (self.num_groups, self.norm_eps, self.eps, code)
            return cpu_kernel.ProxyGroupNormActCPU.apply(x, *params, q, spec)  # small inputs, eager CPU
        folded = self._folded_into_standardization(x)
        if folded is not None:
            return folded
        return self._activate_and_normalize(
            F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.norm_eps)
        )

    def _folded_into_standardization(self, x: torch.Tensor) -> torch.Tensor | None:
        """``relu(gamma x_hat + beta) * s + t`` as ``relu(GN(x; gamma s, beta s)) + t`` (ReLU is
        positively homogeneous), or None where that does not apply.

        Two elementwise passes fewer in the backward (no ``dy * z`` reduction, no ``dy * s``): used
        for ReLU when every ``s > 0``, on the CPU in eager mode (the check reads a value back;
        on CUDA and under ``torch.compile`` the general path is fused by the compiler instead, and
        under tracing and export, :func:`~ilmconvert.nn.fast.exporting`, the check would freeze
        one input's answer into the graph).
        """
        if type(self.act) is not nn.ReLU or x.device.type != "cpu" or torch.compiler.is_compiling() or exporting():
            return None
        scale, shift = self.output_coefficients(torch.float64 if x.dtype == torch.float64 else None)
        if not bool((scale > 0).all()):
            return None
        weight, bias = (self.weight * scale).to(x.dtype), (self.bias * scale).to(x.dtype)
        u = F.group_norm(x, self.num_groups, weight, bias, self.norm_eps)
        return torch.add(F.relu(u, inplace=True), shift.to(x.dtype).view(self._channel_shape(x)))

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, norm_eps={self.norm_eps}, " + super().extra_repr()


class ProxyLayerNormAct(ProxyFromNorm, FromNorm, ProxyNormAct):
    """LayerNorm standardization over the channels (no affine) followed by :class:`ProxyNormAct`: LN + PN.

    Replaces timm's ``LayerNormAct`` (input ``(..., C)``) and ``LayerNormAct2d``
    (``channels_first=True``: input ``(B, C, H, W)``, normalized over C at each pixel).

    Args:
        num_channels: C.
        eps: the standardization's eps (``norm_eps``).
        channels_first: the layout, as above.
        proxy_eps: the proxy normalization's eps (``eps`` of :class:`ProxyNormAct`).
        act_layer, num_proxy, output_affine, device, dtype: of :class:`ProxyNormAct`.
    """

    num_norm_groups = 1

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        *,
        channels_first: bool = False,
        act_layer: Any = nn.ReLU,
        proxy_eps: float = 0.03,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_channels, act_layer, eps=proxy_eps, channels_first=channels_first, **kwargs)
        self.norm_eps = float(eps)

    @classmethod
    def _settings_of(cls, norm: nn.Module, **layout: Any) -> dict[str, Any]:
        return layer_norm_settings(norm, **layout)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """LN standardization over the channels, then PN-Act (the affine runs inside ``F.layer_norm``)."""
        dim = 1 if self.channels_first else -1
        if x.dim() < 2 or x.shape[dim] != self.num_channels:
            return super()._forward(x)  # raises the channel error
        c, w, b = (self.num_channels,), self.weight.to(x.dtype), self.bias.to(x.dtype)
        if self.channels_first:
            u = F.layer_norm(x.permute(0, 2, 3, 1), c, w, b, self.norm_eps).permute(0, 3, 1, 2)
        else:
            u = F.layer_norm(x, c, w, b, self.norm_eps)
        return self._activate_and_normalize(u)

    def extra_repr(self) -> str:
        return f"norm_eps={self.norm_eps}, " + super().extra_repr()
