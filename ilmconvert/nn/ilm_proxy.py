"""ILM + Proxy Norm (the ``ilm+proxy`` method of :mod:`ilmconvert.methods`): ILM's per-instance rescaling feeds PN-Act.

ILM Norm predicts, per instance, the rescaling ``omega``, ``beta`` (eqs. 3-6, ``(B, C)``) of a
standardized input; Proxy Norm normalizes ``phi(gamma x_hat + beta)`` with the statistics of a
Gaussian proxy pushed through the same affine and activation (docs/design.md §8). Here ILM's
``omega``, ``beta`` play the role of PN's ``gamma``, ``beta``, so the proxy statistics are per
instance: for sample b and channel c,

- ``z = phi(omega_bc x_hat + beta_bc)``;
- ``y~_i = (1 + gamma~_c) q_i + beta~_c`` (the proxy, per channel, as in PN);
- ``m_bc``, ``v_bc``: mean and biased variance of ``phi(omega_bc y~_i + beta_bc)`` over i, a
  ``(B, C, n)`` computation in float32 (float64 for float64 input), outside autocast;
- output ``(z - m_bc) / sqrt(v_bc + eps)``, with the optional per-channel output affine of
  ``init="preserve"``.

No published system has this combination; it exists to compare the two remedies joined. Only
GroupNorm standardization (and opt-in BatchNorm -> GN): a LayerNorm instance is one token, and a
``(tokens, C, n)`` proxy per sample is not worth its cost.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .fast import autocast_disabled
from .layers import ILMGroupNorm
from .proxy_common import (
    ProxyFromNorm,
    add_proxy_parameters,
    cached_proxy_points,
    normalizing_map,
    proxy_moments,
    reset_proxy_parameters,
    resolve_activation,
)


class ILMProxyGroupNormAct(ProxyFromNorm, ILMGroupNorm):
    """ILM Norm on GroupNorm standardization whose per-instance ``omega``, ``beta`` drive PN-Act.

    Args:
        num_groups, num_channels, eps: of :class:`~ilmconvert.nn.ILMGroupNorm`.
        act_layer: the activation phi (module, class or timm name, as :class:`~ilmconvert.nn.ProxyNormAct`).
        num_proxy: n, proxy points (200).
        proxy_eps: added to the proxy variance (0.03).
        output_affine: add ``output_weight`` / ``output_bias`` ``(C,)`` after the normalization
            (``init="preserve"`` uses them to keep the replaced norm + activation's function).
        **kwargs: ``key_group_size``, ``reduction``, ``bias``, ``device``, ``dtype`` of ILMNorm.

    Parameters: those of :class:`~ilmconvert.nn.ILMGroupNorm`, plus ``proxy_weight`` (gamma~) and
    ``proxy_bias`` (beta~) ``(C,)`` (0 at init), and the output affine or None.

    Shapes: input ``(B, C, *spatial)``, output alike, in the input's dtype.

    Raises:
        ValueError: if C is not a multiple of G, or ``num_proxy < 2``.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        *,
        act_layer: Any = nn.ReLU,
        num_proxy: int = 200,
        proxy_eps: float = 0.03,
        output_affine: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, **kwargs)
        if num_proxy < 2:
            raise ValueError(f"num_proxy ({num_proxy}) must be >= 2")
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.act = resolve_activation(act_layer)
        self.num_proxy, self.proxy_eps = int(num_proxy), float(proxy_eps)
        add_proxy_parameters(self, output_affine, factory)

    def reset_parameters(self) -> None:
        """ILM's from-scratch init (:meth:`ILMNorm.reset_parameters`); gamma~ = beta~ = 0; output affine 1, 0."""
        super().reset_parameters()
        reset_proxy_parameters(self)

    @torch.no_grad()
    def init_preserve(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        """ILM's preserve init (``omega = w``, ``beta = b`` whatever the instance), gamma~ = beta~ = 0,
        and the output affine ``sqrt(v + eps)``, ``m`` of the proxy statistics at that ``omega``,
        ``beta`` (float64), which undoes the proxy normalization: the layer computes ``phi(w x_hat + b)``.

        Raises:
            ValueError: when the layer has no output affine.
        """
        if self.output_weight is None:
            raise ValueError("init_preserve needs output_affine=True")
        super().init_preserve(weight, bias)
        reset_proxy_parameters(self)
        omega = self.weight.detach().double()[None]
        beta = (self.bias.detach().double() if self.bias is not None else torch.zeros_like(self.weight).double())[None]
        m, v = self.proxy_statistics(omega, beta)
        self.output_weight.copy_(torch.sqrt(v[0] + self.proxy_eps))
        self.output_bias.copy_(m[0])

    def proxy_statistics(self, omega: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-instance mean ``m`` and biased variance ``v`` of ``phi(omega y~ + beta)`` over the proxy.

        Args:
            omega, beta: ``(B, C)`` per-instance rescaling (:meth:`ILMNorm.rescaling`), float32 or float64.

        Returns:
            ``(m, v)``, each ``(B, C)`` in the dtype of ``omega``, never under autocast.
        """
        dt = omega.dtype
        with autocast_disabled(omega.device.type):
            q = cached_proxy_points(self.num_proxy, dt, omega.device)
            proxy = torch.addcmul(self.proxy_bias.to(dt)[:, None], (1.0 + self.proxy_weight.to(dt))[:, None], q)
            m, _, v = proxy_moments(self.act(torch.addcmul(beta[..., None], omega[..., None], proxy)))
        return m, v

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """ILM's rescaling (reference path), the activation, then per-instance proxy normalization."""
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_channels} channels, got input of shape {tuple(x.shape)}"
            )
        omega, beta = self.rescaling(*self.key_features(x))
        z = self.act(self._rescale(self._standardize(x), omega, beta))
        m, v = self.proxy_statistics(omega, beta)
        scale, shift = normalizing_map(m, v, self.proxy_eps, self.output_weight, self.output_bias)
        shape = (*scale.shape, *([1] * (x.dim() - 2)))
        return torch.addcmul(shift.reshape(shape).to(z.dtype), z, scale.reshape(shape).to(z.dtype))

    def extra_repr(self) -> str:
        affine = self.output_weight is not None
        proxy = f", num_proxy={self.num_proxy}, proxy_eps={self.proxy_eps}, output_affine={affine}"
        return super().extra_repr() + proxy
