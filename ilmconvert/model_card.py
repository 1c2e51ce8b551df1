"""The ``README.md`` model card of a checkpoint, rendered from its ``config.json``.

YAML front matter through ``huggingface_hub.ModelCardData`` (``library_name: ilmconvert``,
``tags``, ``pipeline_tag``, ``base_model`` when the weights came from a Hub model, ``license`` when
the source's ``pretrained_cfg`` names one), then what was converted, the preservation check and
fine-tune metrics when the metadata records them, the preprocessing and how to load it
(docs/design.md §5).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from . import methods

#: What ``ORG/NAME`` in a card stands for until :func:`ilmconvert.io.push` names the repository.
PLACEHOLDER_REPO = "ORG/NAME"


def _method_of(config: Mapping[str, Any]) -> tuple[str, methods.Method | None]:
    """The recorded method's name (older checkpoints record none: the default) and its registry
    entry (None for a method this process does not know)."""
    name = config["conversion"]["settings"].get("method", methods.DEFAULT)
    return name, methods.find_method(name)


def _front_matter(config: Mapping[str, Any], base_model: str | None) -> str:
    from huggingface_hub import ModelCardData

    _, method = _method_of(config)
    library = config["source"]["library"]
    tags = ["image-classification", *(method.tags if method else ()), library]
    license_ = (config.get("pretrained_cfg") or {}).get("license")
    data = ModelCardData(
        library_name="ilmconvert",
        tags=tags,
        pipeline_tag="image-classification",
        base_model=base_model,
        license=license_ if isinstance(license_, str) else None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _conversion_lines(config: Mapping[str, Any]) -> list[str]:
    conversion = config["conversion"]
    settings = conversion["settings"]
    rows = conversion.get("converted", [])
    counts = Counter((r.get("source", "?").rsplit(".", 1)[-1], r.get("target", "?")) for r in rows)
    name, method = _method_of(config)
    lines = [
        f"- method: `{name}`, {method.description if method else name}",
        f"- init: `{settings.get('init', 'preserve')}`"
        + (
            " (the converted network computes what the original did)"
            if settings.get("init", "preserve") == "preserve" and not conversion.get("function_changing")
            else " (the function changed: fine-tune it)"
        ),
        f"- converted modules: {len(rows)}"
        + "".join(f"\n  - {n} x `{src}` -> `{dst}`" for (src, dst), n in sorted(counts.items())),
        f"- skipped norm-like modules: {len(conversion.get('skipped', []))}",
    ]
    if method is not None and "K" in method.report_columns:  # ILM's key groups
        lines.append(
            f"- key group size K = {settings.get('key_group_size')}, reduction r = {settings.get('reduction')}"
        )
    if "params_before" in conversion:
        lines.append(
            f"- parameters: {conversion['params_before']:,} -> {conversion.get('params_after', 0):,} "
            f"(+{conversion.get('increase_percent', 0.0):.3f} %)"
        )
    check = (config.get("metadata") or {}).get("preservation_check")
    if isinstance(check, Mapping) and "relative" in check:
        lines.append(
            f"- preservation check on a random batch {check.get('shape', '')} ({check.get('dtype', '')}): "
            f"max |diff| = {check.get('max_abs', float('nan')):.3g}, relative = {check['relative']:.3g}"
        )
    return lines


def _finetune_lines(metadata: Mapping[str, Any]) -> list[str]:
    if not any(k in metadata for k in ("top1", "best_top1")):
        return []
    data = metadata.get("data") if isinstance(metadata.get("data"), Mapping) else {}
    lines = ["", "## Fine-tuning", ""]
    fields = [
        ("recipe", metadata.get("recipe")),
        ("data", data.get("name")),
        ("epochs", f"{metadata.get('epoch')} of {metadata.get('epochs')}" if "epoch" in metadata else None),
        ("top-1 (%)", metadata.get("top1")),
        ("top-5 (%)", metadata.get("top5")),
        ("test loss", metadata.get("test_loss")),
        ("best top-1 (%)", metadata.get("best_top1")),
    ]
    for name, value in fields:
        if value is not None:
            lines.append(f"- {name}: {value:.4g}" if isinstance(value, float) else f"- {name}: {value}")
    return lines


def _preprocessing_lines(config: Mapping[str, Any]) -> list[str]:
    cfg = config.get("pretrained_cfg") or {}
    if not cfg:
        return []
    defaulted = set(config.get("defaulted") or [])
    lines = ["", "## Preprocessing", ""]
    for key in ("input_size", "interpolation", "crop_pct", "mean", "std"):
        if key in cfg:
            note = " (default, not known for these weights)" if f"pretrained_cfg.{key}" in defaulted else ""
            lines.append(f"- {key}: {cfg[key]}{note}")
    labels = config.get("label_names")
    if labels:
        lines.append(f"- classes: {len(labels)} (`label_names` in config.json)")
    return lines


def render(config: Mapping[str, Any], *, base_model: str | None = None, repo_id: str | None = None) -> str:
    """The model card of a checkpoint whose ``config.json`` is ``config``.

    Args:
        config: the checkpoint's configuration (:func:`ilmconvert.io.save` writes it).
        base_model: the Hub repository the weights started from (timm's ``hf_hub_id``), or None.
        repo_id: the repository the card will live in, for the load snippet; ``ORG/NAME``
            (:data:`PLACEHOLDER_REPO`) when not known yet.

    Returns:
        Markdown with YAML front matter.
    """
    source = config["source"]
    _, method = _method_of(config)
    repo = repo_id or PLACEHOLDER_REPO
    origin = f"{source['library']}'s `{source['architecture']}`"
    if source.get("pretrained_tag"):
        origin += f" (weights `{source['pretrained_tag']}`" + (f", from `{base_model}`)" if base_model else ")")
    version = (config.get("versions") or {}).get("ilmconvert", "")
    title = source["architecture"] + (f" with {method.title}" if method and method.title else "")
    body = [
        f"# {title}",
        "",
        f"{origin}, converted by ilmconvert {version}.",
        "",
        "## Conversion",
        "",
        *_conversion_lines(config),
        *_finetune_lines(config.get("metadata") or {}),
        *_preprocessing_lines(config),
        "",
        "## How to load",
        "",
        "```python",
        "import ilmconvert",
        "",
        f'model = ilmconvert.load("hf-hub:{repo}")  # or a local copy of this folder',
        "```",
        "",
        "`ilmconvert.load` rebuilds the architecture, re-applies the recorded conversion and loads",
        "`model.safetensors` strictly.",
        "",
    ]
    return _front_matter(config, base_model) + "\n" + "\n".join(body)
