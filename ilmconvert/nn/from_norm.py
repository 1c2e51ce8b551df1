"""One ``from_norm`` path for every replacement layer: ILM, Proxy Norm and ILM + Proxy Norm.

A replacement class builds itself from the norm it replaces with ``from_norm`` (the pattern of
``torch.ao.quantization``'s ``from_float``). :class:`FromNorm` is that classmethod, written once:
check ``init``, take the activation over (Proxy Norm targets), read the norm's settings
(:func:`group_norm_settings` for GroupNorm and opt-in BatchNorm, :func:`layer_norm_settings`),
build on the norm's device and dtype, initialize (``init_preserve`` with the norm's affine, or
``reset_parameters``), take over timm's ``act`` / ``drop`` modules, copy the ``training`` flag.
A subclass says only what differs: its settings (``_settings_of``), its constructor arguments
(``_build_kwargs``) and its report row (``describe``). docs/design.md §2-3.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import IlmconvertError
from .core import INITS, resolve_key_group_size


class UnsupportedNormError(IlmconvertError):
    """A norm module whose configuration ILM Norm cannot take over without changing its function."""


class NoActivationError(UnsupportedNormError):
    """A Proxy Norm target found no activation to take over (``NormAdapter.fallback`` may build
    something else instead: an opted-in BatchNorm becomes a plain ``nn.GroupNorm``)."""


#: GroupNorm groups for an opted-in BatchNorm (or the largest divisor of C not above it).
BATCHNORM_GROUPS = 32


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """``{"device", "dtype"}`` of ``module``'s own first floating-point parameter or buffer (empty
    when it has none): where and how a replacement of ``module`` is built."""
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def affine_of(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The norm's ``(weight, bias)``, each ``(C,)`` or None (``affine=False``, or no bias)."""
    return getattr(norm, "weight", None), getattr(norm, "bias", None)


def keeps_bias(norm: nn.Module) -> bool:
    """B_beta exists unless the original has a weight but no bias (a deliberately bias-free norm)."""
    weight, bias = affine_of(norm)
    return bias is not None or weight is None


def check_init(init: str) -> None:
    """Raises ValueError unless ``init`` is ``"preserve"`` or ``"paper"`` (docs/design.md §2)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")


def group_norm_settings(norm: nn.Module, batchnorm_groups: int = BATCHNORM_GROUPS) -> dict[str, Any]:
    """``num_groups``, ``num_channels``, ``eps`` of a GroupNorm, or of the GroupNorm an opted-in
    BatchNorm becomes (function-changing): G = ``batchnorm_groups`` or the largest divisor of C
    not above it."""
    if isinstance(norm, _BatchNorm):
        channels = norm.num_features
        groups = resolve_key_group_size(channels, batchnorm_groups)
        return {"num_groups": groups, "num_channels": channels, "eps": norm.eps}
    return {"num_groups": norm.num_groups, "num_channels": norm.num_channels, "eps": norm.eps}


def layer_norm_settings(norm: nn.Module, why: str = "", **layout: Any) -> dict[str, Any]:
    """``num_channels``, ``eps`` (and ``layout``) of a LayerNorm over the channel dimension.

    Raises:
        UnsupportedNormError: ``normalized_shape`` spans more than the channels (``why`` ends the message).
    """
    shape = tuple(norm.normalized_shape)
    if len(shape) != 1:
        raise UnsupportedNormError(f"normalized_shape={shape} spans more than the channel dimension{why}")
    return {"num_channels": shape[0], "eps": norm.eps, **layout}


def group_norm_of_batchnorm(norm: _BatchNorm, batchnorm_groups: int = BATCHNORM_GROUPS, **_: Any) -> nn.GroupNorm:
    """``nn.GroupNorm`` (G = ``batchnorm_groups``, default 32, or the largest divisor of C not above
    it) with the BatchNorm's affine:
    the fallback of the Proxy Norm methods for an opted-in BatchNorm that no activation follows,
    so that nothing in the converted network depends on the batch (function-changing). Takes
    (and ignores) ``from_norm``'s keyword arguments."""
    settings = group_norm_settings(norm, batchnorm_groups)
    gn = nn.GroupNorm(settings["num_groups"], settings["num_channels"], norm.eps, norm.affine, **factory_kwargs(norm))
    if norm.affine:
        with torch.no_grad():
            gn.weight.copy_(norm.weight)
            gn.bias.copy_(norm.bias)
    return gn


def activation_taken_over(norm: nn.Module, act_layer: nn.Module | None) -> nn.Module:
    """The activation a Proxy Norm replacement takes over: ``act_layer`` (a separate module after a
    plain norm) or the norm's own ``act`` (timm's norm + activation modules).

    Raises:
        UnsupportedNormError: a dropout between norm and activation.
        NoActivationError: no activation (``NormAdapter.fallback`` may take over).
    """
    drop = getattr(norm, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        raise UnsupportedNormError("a dropout between the norm and its activation cannot be kept with Proxy Norm")
    act = act_layer if act_layer is not None else getattr(norm, "act", None)
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        return act
    raise NoActivationError("no activation follows this norm: Proxy Norm normalizes a post-activation")


class FromNorm:
    """``from_norm`` and ``describe`` of every replacement class (mixed in before the ``nn.Module``).

    Subclasses set :attr:`takes_activation` (Proxy Norm targets normalize a post-activation) and
    implement ``_settings_of`` (constructor settings read from the norm); ``_build_kwargs`` adds
    the family's own constructor arguments (ILM: K, r, whether B_beta exists; PN: the activation
    and the output affine of ``init="preserve"``).
    """

    #: The target takes over the activation after the norm (``act_layer``, or the norm's ``act``).
    takes_activation: ClassVar[bool] = False

    @classmethod
    def _settings_of(cls, norm: nn.Module, **layout: Any) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _build_kwargs(
        cls, norm: nn.Module, *, init: str, key_group_size: int, reduction: int, act: nn.Module | None
    ) -> dict[str, Any]:
        return {}

    @classmethod
    def from_norm(
        cls,
        norm: nn.Module,
        *,
        init: str = "preserve",
        key_group_size: int = 16,
        reduction: int = 16,
        act_layer: nn.Module | None = None,
        **layout: Any,
    ) -> nn.Module:
        """Build the layer that replaces ``norm`` (same device, dtype and ``training`` flag).

        Args:
            norm: the module to replace (GroupNorm, InstanceNorm, LayerNorm, or an opted-in BatchNorm,
                of torch or timm, or a class a mapping names).
            init: ``"preserve"``: the replacement computes what ``norm`` (and, for Proxy Norm
                targets, its activation) computed, docs/design.md §2 and §8; ``"paper"``: the
                from-scratch initialization of the paper (``reset_parameters``), which changes it.
            key_group_size, reduction: K and r of ILM layers (eqs. 3-4); ignored by Proxy Norm.
            act_layer: the activation module after a plain norm, for targets that take one over
                (``NormAdapter.needs_activation``); by default the norm's own ``act``.
            layout: target-specific options (``channels_first`` for LayerNorm, ``batchnorm_groups``).

        Raises:
            ValueError: for an unknown ``init``, or ``act_layer`` given to a target that takes none.
            UnsupportedNormError: when ``norm``'s configuration cannot be taken over;
                :class:`NoActivationError` when a Proxy Norm target finds no activation.
        """
        check_init(init)
        if cls.takes_activation:
            act = activation_taken_over(norm, act_layer)
        elif act_layer is not None:
            raise ValueError(f"{cls.__name__} does not take over an activation (act_layer={act_layer!r})")
        else:
            act = None
        extra = cls._build_kwargs(norm, init=init, key_group_size=key_group_size, reduction=reduction, act=act)
        layer = cls(**cls._settings_of(norm, **layout), **extra, **factory_kwargs(norm))
        if init == "preserve":
            layer.init_preserve(*affine_of(norm))
        else:
            layer.reset_parameters()
        if not cls.takes_activation:  # timm's *Act norms: the same act / drop module objects
            for name in ("act", "drop"):
                if hasattr(layer, name) and isinstance(getattr(norm, name, None), nn.Module):
                    setattr(layer, name, getattr(norm, name))
        layer.train(norm.training)
        return layer

    def describe(self) -> dict[str, Any]:
        """The report row fields of this replacement (:func:`describe_replacement`); a target
        with more to say overrides it."""
        return describe_replacement(self)


def describe_replacement(module: nn.Module) -> dict[str, Any]:
    """The report row fields of a replacement (:class:`ilmconvert.convert.ConvertedModule`), read
    from its attributes: ``channels`` (C, ``num_channels``), ``norm_groups`` (G, ``num_norm_groups``
    or a torch GroupNorm's ``num_groups``), ILM's ``key_group_size`` / ``num_key_groups`` /
    ``embedding_size`` (K, N, M; 0 without ILM) and ``key_group_size_adjusted`` (K is not the
    requested one), and the ``activation`` a target that takes one over normalizes ("" without)."""
    k = getattr(module, "key_group_size", 0)
    act = getattr(module, "act", None) if getattr(module, "takes_activation", False) else None
    return {
        "channels": getattr(module, "num_channels", 0),
        "norm_groups": getattr(module, "num_norm_groups", getattr(module, "num_groups", 0)),
        "key_group_size": k,
        "num_key_groups": getattr(module, "num_key_groups", 0),
        "embedding_size": getattr(module, "embedding_size", 0),
        "key_group_size_adjusted": k != getattr(module, "requested_key_group_size", k),
        "activation": type(act).__name__ if act is not None else "",
    }
