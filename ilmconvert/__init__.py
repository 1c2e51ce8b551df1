"""ilmconvert: model surgery for Instance-Level Meta Normalization (Jia, Chen & Chen, CVPR 2019)."""

__version__ = "0.1.0"

from .convert import ConversionError, ConversionReport, convert, register  # noqa: E402

__all__ = ["__version__", "ConversionError", "ConversionReport", "convert", "register"]
