"""ilmconvert: model surgery for Instance-Level Meta Normalization (Jia, Chen & Chen, CVPR 2019).

Python API::

    import ilmconvert
    model = ilmconvert.create_model("timm:resnet50_gn", pretrained=False)
    report = ilmconvert.convert(model)              # in place, init="preserve"
    ilmconvert.save(model, "out/resnet50_gn-ilm")   # model.safetensors + config.json
    model = ilmconvert.load("out/resnet50_gn-ilm")  # rebuild, re-convert, strict load
"""

__version__ = "0.1.0"

from .convert import ConversionError, ConversionReport, convert, register  # noqa: E402
from .io import CheckpointError, load, save  # noqa: E402
from .models import ModelSource, ModelSourceError, create_model  # noqa: E402

__all__ = [
    "__version__",
    "CheckpointError",
    "ConversionError",
    "ConversionReport",
    "ModelSource",
    "ModelSourceError",
    "convert",
    "create_model",
    "load",
    "register",
    "save",
]
