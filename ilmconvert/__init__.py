"""ilmconvert: model surgery for Instance-Level Meta Normalization (Jia, Chen & Chen, CVPR 2019).

Python API::

    import ilmconvert
    model = ilmconvert.create_model("timm:resnet50_gn", pretrained=False)
    report = ilmconvert.convert(model)              # in place, init="preserve", default_mapping()
    result = ilmconvert.swap(model2)                # convert + the 1e-4 preservation check (raises)
    ilmconvert.save(model, "out/resnet50_gn-ilm")   # model.safetensors + config.json
    model = ilmconvert.load("out/resnet50_gn-ilm")  # rebuild, re-convert, strict load
    ilmconvert.push("out/resnet50_gn-ilm", "ORG/NAME")  # to the Hugging Face Hub
    model = ilmconvert.load("hf-hub:ORG/NAME")      # from the Hub (or its cache)
"""

from .convert import ConversionError, ConversionReport, convert, swap_module
from .exporting import ExportError, ParityError, export
from .hub import HubError
from .io import CheckpointError, load, push, save
from .methods import NormAdapter, default_mapping, ilm_proxy_mapping, proxy_mapping, register
from .models import ModelSource, ModelSourceError, create_model
from .swapping import PreservationError, SwapResult, swap
from .version import __version__

__all__ = [
    "__version__",
    "CheckpointError",
    "ConversionError",
    "ConversionReport",
    "HubError",
    "ModelSource",
    "ModelSourceError",
    "NormAdapter",
    "convert",
    "create_model",
    "export",
    "ExportError",
    "ParityError",
    "default_mapping",
    "load",
    "ilm_proxy_mapping",
    "proxy_mapping",
    "push",
    "register",
    "save",
    "swap",
    "swap_module",
    "PreservationError",
    "SwapResult",
]
