"""The ILM Norm core shared by every front-end (Jia, Chen & Chen, CVPR 2019, §3.3, eqs. 3-6).

An ILM layer keeps the *standardization* of the norm it augments (GroupNorm, InstanceNorm,
LayerNorm: same groups, same ``eps``, biased variance) and replaces its learned affine *rescaling*
with per-instance parameters predicted from the input's own statistics:

1. key features (eq. 3): mean ``mu`` and biased variance ``gamma`` over groups of ``K`` contiguous
   channels, per instance, in float32 (float64 for float64 input);
2. encoder (eq. 4): ``E_mu = ReLU(W1 mu)``, ``E_gamma = ReLU(W1 gamma)`` with one shared ``W1``;
3. decoders (eq. 5): ``D_mu = tanh(W2 E_mu)``, ``D_gamma = sigmoid(W3 E_gamma)``;
4. alignment (eq. 6): ``omega = up(D_gamma) + B_omega``, ``beta = up(D_mu) + B_beta``.

Parametrization (docs/design.md §1): ``weight = B_omega + 1/2`` and ``bias = B_beta``, i.e.
``omega = up(D_gamma - 1/2) + weight``, the same family of functions as eq. 6. ``D_gamma`` is
``sigmoid(0) = 1/2`` at preserve init (``W3 = 0``), so there ``weight`` holds the replaced norm's
own ``w`` and the state-dict keys of the replaced norm keep their meaning *and* their values: a
converted checkpoint loaded into the original architecture with ``strict=False`` computes the
original function.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import fast as _fast
from .fast_torch import D_GAMMA_OFFSET, statistics_dtype

Init = Literal["preserve", "paper"]
INITS: tuple[str, ...] = ("preserve", "paper")


def resolve_key_group_size(num_channels: int, key_group_size: int) -> int:
    """Return the key-group size actually used for ``num_channels`` channels.

    The paper splits the C channels into N = C / K groups of K channels (eq. 3). When C is not a
    multiple of K, the largest divisor of C not above K is used (docs/design.md §1: C = 40, K = 16 gives
    K = 10, N = 4); this never fails.

    Raises:
        ValueError: if ``num_channels`` or ``key_group_size`` is not a positive integer.
    """
    if num_channels < 1 or key_group_size < 1:
        raise ValueError(f"num_channels ({num_channels}) and key_group_size ({key_group_size}) must be positive")
    for k in range(min(key_group_size, num_channels), 0, -1):
        if num_channels % k == 0:
            return k
    return 1  # unreachable: 1 divides everything


def encoder_size(num_key_groups: int, reduction: int) -> int:
    """Embedding length ``M = max(2, N // r)`` of the encoder (eq. 4), for N key groups.

    Raises:
        ValueError: if ``reduction`` is not a positive integer.
    """
    if reduction < 1:
        raise ValueError(f"reduction must be a positive integer, got {reduction}")
    return max(2, num_key_groups // reduction)


@torch.fx.wrap
def ilm_forward(layer: ILMNorm, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` as one opaque call for ``torch.fx.symbolic_trace``.

    The layer picks its path from the input's dtype, device and shape (fast or reference path,
    statistics dtype, unbatched input), which FX proxies cannot answer; wrapped with
    ``torch.fx.wrap``, a converted network traces with each ILM layer as a single node that runs
    the layer eagerly. ``torch.compile`` and ``torch.export`` trace through it as usual.
    """
    return layer._forward(x)


class ILMNorm(nn.Module):
    """Base class of the ILM layers: key features, auto-encoder and alignment (eqs. 3-6).

    Subclasses supply the standardization of the norm they augment (``_standardize``) and say
    whether an instance pools its statistics over positions (GroupNorm / InstanceNorm: one
    instance = one sample, ``x`` is ``(B, C, *spatial)``) or is a single position (LayerNorm:
    one instance = one token, ``x`` is ``(..., C)``).

    Args:
        num_channels: C, the number of channels.
        eps: the standardization's ``eps``, as in the replaced norm.
        key_group_size: K, channels per key group (16 in the paper); see
            :func:`resolve_key_group_size` when C is not a multiple of K.
        reduction: r in ``M = max(2, N // r)`` (16 by default).
        bias: whether ``B_beta`` exists; ``False`` for norms without a bias (then B_beta = 0).
        device, dtype: where and how to create the parameters.

    Parameters:
        weight: ``B_omega + 1/2``, shape ``(C,)``: ``omega = up(D_gamma - 1/2) + weight``, so that
            at preserve init it equals the replaced norm's weight (docs/design.md §1).
        bias: B_beta, shape ``(C,)``, or ``None``.
        encoder.weight: W1, shape ``(M, N)``; decoder_mu.weight: W2, shape ``(N, M)``;
        decoder_gamma.weight: W3, shape ``(N, M)``. No FC biases.
    """

    #: True when one instance is a sample whose positions are pooled (GN / IN), False when every
    #: position is its own instance (LayerNorm over the last dim, timm's LayerNorm2d).
    pooled: bool = True

    #: The standardization a front-end uses, as the fast path knows it: ``"group"`` (reads
    #: ``num_groups``), ``"instance"`` or ``"layer"`` (over the last dim); ``None`` = reference path
    #: only. A subclass that overrides any of :data:`MATH` without declaring ``standardization``
    #: itself gets ``None`` (see :meth:`__init_subclass__`): the fast path never guesses.
    standardization: str | None = None

    #: The methods whose semantics the fast path reproduces (docs/design.md §4).
    MATH: tuple[str, ...] = (
        "_standardize", "key_features", "rescaling", "_upsample", "_rescale", "_standardize_and_rescale"
    )

    #: Fast-path selection (see :mod:`ilmconvert.nn.fast`): None / True = automatic, False = always
    #: the reference path, "torch" / "triton" = that implementation. ``ILMCONVERT_REFERENCE=1``
    #: in the environment forces the reference path everywhere.
    fast: bool | str | None = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Clear ``standardization`` when a class between ``cls`` and its declaration overrides the math.

        E.g. a user's ``ILMGroupNorm`` subclass with its own ``key_features`` takes the reference
        path, while ``ILMGroupNormAct`` (which only adds an activation) keeps ``"group"``.
        """
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        declared = next(i for i, c in enumerate(mro) if "standardization" in c.__dict__)
        if any(name in c.__dict__ for c in mro[:declared] for name in cls.MATH):
            cls.standardization = None

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        *,
        key_group_size: int = 16,
        reduction: int = 16,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.requested_key_group_size = int(key_group_size)
        self.key_group_size = resolve_key_group_size(self.num_channels, int(key_group_size))
        self.num_key_groups = self.num_channels // self.key_group_size
        self.reduction = int(reduction)
        self.embedding_size = encoder_size(self.num_key_groups, self.reduction)
        n, m = self.num_key_groups, self.embedding_size
        self.encoder = nn.Linear(n, m, bias=False, **factory)  # W1 (M x N), eq. 4
        self.decoder_mu = nn.Linear(m, n, bias=False, **factory)  # W2 (N x M), eq. 5
        self.decoder_gamma = nn.Linear(m, n, bias=False, **factory)  # W3 (N x M), eq. 5
        # weight = B_omega + 1/2 (docs/design.md §1); the paper's from-scratch B_omega = 1
        self.weight = nn.Parameter(torch.full((self.num_channels,), 1.0 + D_GAMMA_OFFSET, **factory))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.num_channels, **factory))  # B_beta
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ initialization
    def reset_parameters(self) -> None:
        """The paper's from-scratch initialization: B_omega = 1, B_beta = 0, W1..W3 as nn.Linear.

        B_omega = 1 is stored as ``weight = 1.5`` (``weight = B_omega + 1/2``, docs/design.md §1).
        """
        for fc in (self.encoder, self.decoder_mu, self.decoder_gamma):
            fc.reset_parameters()
        with torch.no_grad():
            self.weight.fill_(1.0 + D_GAMMA_OFFSET)
            if self.bias is not None:
                self.bias.zero_()

    def init_preserve(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        """Take over a norm's affine so that the layer computes that norm's function.

        With ``W2 = W3 = 0`` the decoders give ``D_mu = 0`` and ``D_gamma = sigmoid(0) = 1/2``, so
        ``omega = up(D_gamma - 1/2) + weight = weight``: the layer's ``weight`` / ``bias`` are the
        norm's ``w`` / ``b`` themselves, copied bit for bit (B_omega = w - 1/2, docs/design.md §2).
        ``weight`` / ``bias`` of ``None`` stand for 1 and 0 (``affine=False``).
        """
        self.encoder.reset_parameters()
        with torch.no_grad():
            self.decoder_mu.weight.zero_()
            self.decoder_gamma.weight.zero_()
            if weight is None:
                self.weight.fill_(1.0)
            else:
                self.weight.copy_(weight.detach().to(self.weight.dtype))
            if self.bias is not None:
                if bias is None:
                    self.bias.zero_()
                else:
                    self.bias.copy_(bias.detach().to(self.bias.dtype))

    # ------------------------------------------------------------------ the computation
    def key_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 3: per-instance mean ``mu`` and biased variance ``gamma`` of each key group.

        Args:
            x: ``(B, C, *spatial)`` when ``pooled``, else ``(..., C)``; any float dtype.

        Returns:
            ``(mu, gamma)``, each ``(B, N)`` when ``pooled`` else ``(..., N)``, in float32
            (float64 for float64 input).
        """
        xs = x.to(statistics_dtype(x.dtype))
        n, k = self.num_key_groups, self.key_group_size
        if self.pooled:
            groups = xs.reshape(xs.shape[0], n, -1)  # (B, N, K * positions)
        else:
            groups = xs.reshape(*xs.shape[:-1], n, k)  # (..., N, K)
        gamma, mu = torch.var_mean(groups, dim=-1, correction=0)
        return mu, gamma

    def rescaling(self, mu: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 4-6: encoder, decoders and alignment, from key features to ``(omega, beta)``.

        ``omega = up(D_gamma - 1/2) + weight`` (``weight = B_omega + 1/2``), ``beta = up(D_mu) + bias``.

        Args:
            mu, gamma: key features ``(..., N)`` in float32 or float64.

        Returns:
            ``(omega, beta)``, each ``(..., C)`` in the dtype of ``mu``, never under autocast.
        """
        dt = mu.dtype
        with _fast.autocast_disabled(mu.device.type):
            w1 = self.encoder.weight.to(dt)
            e_mu = F.relu(F.linear(mu, w1))  # eq. 4
            e_gamma = F.relu(F.linear(gamma, w1))
            d_mu = torch.tanh(F.linear(e_mu, self.decoder_mu.weight.to(dt)))  # eq. 5
            d_gamma = torch.sigmoid(F.linear(e_gamma, self.decoder_gamma.weight.to(dt)))
            # eq. 6 with weight = B_omega + 1/2: D_gamma - 1/2 is exactly 0 at preserve init
            omega = self._upsample(d_gamma - D_GAMMA_OFFSET) + self.weight.to(dt)
            beta = self._upsample(d_mu)
            if self.bias is not None:
                beta = beta + self.bias.to(dt)
        return omega, beta

    def _upsample(self, d: torch.Tensor) -> torch.Tensor:
        """The ↑ of eq. 6: repeat each key-group value over its K channels, ``(..., N) -> (..., C)``."""
        k = self.key_group_size
        return d.unsqueeze(-1).expand(*d.shape, k).reshape(*d.shape[:-1], self.num_channels)

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 1 exactly as the replaced norm computes it, without its affine."""
        raise NotImplementedError

    def _rescale(self, x_s: torch.Tensor, omega: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Eq. 2 per instance and channel: ``x_s * omega + beta`` in the dtype of ``x_s``."""
        if self.pooled:
            shape = (*omega.shape, *([1] * (x_s.dim() - 2)))
            omega, beta = omega.reshape(shape), beta.reshape(shape)
        return torch.addcmul(beta.to(x_s.dtype), x_s, omega.to(x_s.dtype))

    def _standardize_and_rescale(self, x: torch.Tensor, omega: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Eqs. 1-2: ``_rescale(_standardize(x), omega, beta)``; a front-end whose norm has a kernel
        for both steps at once overrides this to round as that norm does."""
        return self._rescale(self._standardize(x), omega, beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ILM Norm.

        Args:
            x: ``(B, C, *spatial)`` for GroupNorm / InstanceNorm front-ends, ``(..., C)`` for
               LayerNorm; float16, bfloat16, float32 or float64; any memory format.

        Returns:
            A tensor of the shape of ``x``, in the dtype the replaced norm would return.

        Raises:
            ValueError: if ``x`` does not have ``num_channels`` channels.
        """
        return ilm_forward(self, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The computation behind :meth:`forward`; front-ends extend this, not ``forward``."""
        if x.shape[-1 if not self.pooled else 1] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_channels} channels, got input of shape {tuple(x.shape)}"
            )
        if _fast.use_fast_path(self, x):
            return _fast.forward(self, x)
        mu, gamma = self.key_features(x)
        omega, beta = self.rescaling(mu, gamma)
        return self._standardize_and_rescale(x, omega, beta)

    # ------------------------------------------------------------------ description
    @property
    def num_norm_groups(self) -> int:
        """Number of standardization groups per instance (GN: G, IN: C, LN: 1)."""
        return 1

    def added_parameters(self) -> int:
        """Parameters of the auto-encoder, ``3 * N * M`` (the cost counted in the paper's Table 8)."""
        return 3 * self.num_key_groups * self.embedding_size

    def extra_repr(self) -> str:
        k = self.key_group_size
        note = "" if k == self.requested_key_group_size else f" (requested {self.requested_key_group_size})"
        return (
            f"{self.num_channels}, eps={self.eps}, K={k}{note}, N={self.num_key_groups}, "
            f"M={self.embedding_size}, bias={self.bias is not None}"
        )
