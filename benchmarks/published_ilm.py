"""The computation of the published ILM Norm code, re-expressed on our parameters (benchmarks only).

The authors' implementation (github.com/Gasoonjia/ILM-Norm, ``lib/nn/ilm_*.py``) is not copied
here; this module reproduces the *sequence of tensor operations* it performs, because that is what
the layer benchmark compares against:

1. key features: a mean pass and a separate variance pass over ``x`` viewed as key groups
   (unbiased variance, as published);
2. the auto-encoder, then ``.repeat`` of the ``(B, N)`` outputs into materialized ``(B, C)``
   tensors, plus B_omega / B_beta (our ``weight - 1/2`` and ``bias``: the layers store
   ``weight = B_omega + 1/2``, docs/design.md §1);
3. norm statistics: another mean pass and another variance pass over ``x`` viewed as norm groups;
4. standardization ``(x - mean) / sqrt(var + eps)`` as separate elementwise kernels;
5. a separate rescale ``x_s * omega + beta`` (two more elementwise kernels).

It takes one of our ILM layers for its parameters, so its cost is measured on exactly the same
sizes. It uses the *unbiased* variance like the published code, so its output differs from ours
(docs/design.md §1) — it is a timing baseline, not an oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ilmconvert.nn.fast_torch import D_GAMMA_OFFSET


class PublishedILM(nn.Module):
    """The published op sequence, for an ``ILMGroupNorm`` / ``ILMInstanceNorm`` / ``ILMLayerNorm``.

    Args:
        layer: one of our ILM layers; its parameters are shared (not copied).

    Input: ``(B, C, *spatial)`` for pooled layers, ``(..., C)`` for token LayerNorm.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.pooled = bool(layer.pooled)
        self.norm_groups = getattr(layer, "num_groups", None)
        if self.norm_groups is None:
            self.norm_groups = layer.num_channels if self.pooled else 1

    def _mlp(self, mu: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self.layer
        d_gamma = torch.sigmoid(F.linear(F.relu(F.linear(var, lay.encoder.weight)), lay.decoder_gamma.weight))
        d_mu = torch.tanh(F.linear(F.relu(F.linear(mu, lay.encoder.weight)), lay.decoder_mu.weight))
        return d_mu, d_gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layer
        c, n, k = lay.num_channels, lay.num_key_groups, lay.key_group_size
        if self.pooled:
            b = x.shape[0]
            rest = x.shape[2:]
            xk = x.reshape(b, n, 1, -1)
            key_mean = xk.mean(-1, keepdim=True)  # pass 1
            key_var = xk.var(-1, keepdim=True)  # pass 2 (unbiased, as published)
            d_mu, d_gamma = self._mlp(key_mean.view(b, n), key_var.view(b, n))
            omega = d_gamma.view(b, n, 1).repeat(1, 1, k).view(b, c, *([1] * len(rest)))
            omega = omega + (lay.weight - D_GAMMA_OFFSET).view(1, c, *([1] * len(rest)))  # + B_omega
            beta = d_mu.view(b, n, 1).repeat(1, 1, k).view(b, c, *([1] * len(rest)))
            if lay.bias is not None:
                beta = beta + lay.bias.view(1, c, *([1] * len(rest)))
            g = self.norm_groups
            xg = x.reshape(b, g, 1, -1)
            mean = xg.mean(-1, keepdim=True)  # pass 3
            var = xg.var(-1, keepdim=True)  # pass 4
            xs = ((xg - mean) / (var + lay.eps).sqrt()).view(x.shape)  # passes 5, 6
            return xs * omega + beta  # passes 7, 8
        lead = x.shape[:-1]
        xk = x.reshape(*lead, n, k)
        key_mean = xk.mean(-1)
        key_var = xk.var(-1)
        d_mu, d_gamma = self._mlp(key_mean, key_var)
        b_omega = lay.weight - D_GAMMA_OFFSET
        omega = d_gamma.unsqueeze(-1).repeat(*([1] * (len(lead) + 1)), k).view(*lead, c) + b_omega
        beta = d_mu.unsqueeze(-1).repeat(*([1] * (len(lead) + 1)), k).view(*lead, c)
        if lay.bias is not None:
            beta = beta + lay.bias
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True)
        xs = (x - mean) / (var + lay.eps).sqrt()
        return xs * omega + beta
