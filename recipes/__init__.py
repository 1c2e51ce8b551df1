"""Bundled fine-tuning recipes (YAML), shipped inside the wheel as ``ilmconvert.recipes``."""
