"""The grid of a sweep (:mod:`ilmconvert.train.sweep`): its cells and their recipes.

:class:`Sweep` and :class:`Cell` are shared by the module that runs a sweep
(:mod:`ilmconvert.train.sweep`) and the one that summarizes it
(:mod:`ilmconvert.train.sweep_results`); neither imports the other's job.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import IlmconvertError
from .recipes import Recipe, parse_recipe

#: The folder of a sweep that holds the cells' run folders.
CELLS = "cells"


class SweepError(IlmconvertError):
    """Bad sweep arguments, or a sweep folder that does not match them (one line)."""


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``variant`` at ``batch_size`` with ``seed``."""

    variant: str
    batch_size: int
    seed: int

    @property
    def name(self) -> str:
        """The run folder's name, ``VARIANT-bB-sS``."""
        return f"{self.variant}-b{self.batch_size}-s{self.seed}"


@dataclass
class Sweep:
    """A checked sweep: its recipe, variants (as partial recipes) and grid, ready to run."""

    out: Path
    data: str
    recipe: Recipe
    variants: dict[str, dict[str, Any]]
    batch_sizes: list[int]
    seeds: list[int]
    lr_scaling: str
    reference: str
    device: str = "auto"
    data_root: str | Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    #: ``--checkpoint``: a :class:`~ilmconvert.train.sweep_networks.Pretrained` (None without)
    pretrained: Any = None

    @property
    def cells(self) -> list[Cell]:
        """The grid, seed-major: every (variant, batch size) gets its first seed before any its second."""
        return [Cell(v, b, s) for s in self.seeds for b in self.batch_sizes for v in self.variants]

    def cell_recipe(self, cell: Cell) -> Recipe:
        """The recipe of ``cell``: the variant merged over the sweep's recipe, with the cell's batch
        size, seed and (scaled) learning rate.

        Raises:
            RecipeError: the merged recipe is invalid (names the variant).
        """
        variant = self.variants[cell.variant]
        change = {k: v for k, v in variant.items() if k not in ("checkpoint", "swap")}
        # what the recipe leaves open stays open: the data settings a network brings (resolve_pipeline);
        # a conversion of --checkpoint trains at the checkpoint's input where the recipe sets none
        data = _merge(self.recipe.model_dump(mode="json", exclude_unset=True), change)
        if "swap" in variant and self.pretrained is not None:
            data["data"] = self.pretrained.input_defaults | data.get("data", {})
        data.pop("variants", None)
        train = data.setdefault("train", {})
        base = self.recipe.train
        scale = cell.batch_size / base.batch_size if self.lr_scaling == "linear" else 1.0
        train.update(batch_size=cell.batch_size, seed=cell.seed, lr=base.lr * scale)
        if self.lr_scaling == "linear":
            train["warmup_lr"] = train.get("warmup_lr", base.warmup_lr) * scale
            train["min_lr"] = train.get("min_lr", base.min_lr) * scale
        data["name"] = f"{self.recipe.name or 'recipe'}/{cell.name}"
        return parse_recipe(yaml.safe_dump(data, sort_keys=False), f"{self.recipe.name} + variant {cell.variant}")


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``change`` merged in, recursively for nested mappings (a copy)."""
    merged = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
