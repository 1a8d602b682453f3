"""Make torch-fidelity's InceptionV3 importable without torchvision, before torchmetrics looks for it.

torchmetrics' FID uses torch-fidelity's FeatureExtractorInceptionV3, which needs torch alone. But the package's
__init__ eagerly imports its CLIP, VGG16 and DINOv2 extractors, and those import torchvision, which has no build
for our CPU torch (and which would switch transformers' image processors to a backend we lack). So when
torchvision is missing, the package is registered as a bare namespace over its own folder: its modules import
as usual, the eager __init__ is skipped. With torchvision installed nothing is changed.
"""

import importlib.util
import sys
import types

PACKAGE = "torch_fidelity"


def torchvision_missing() -> bool:
    """True when torchvision cannot be found (the CPU case here)."""
    return importlib.util.find_spec("torchvision") is None


def register_torch_fidelity() -> None:
    """Register torch_fidelity as a bare package when its __init__ would fail for lack of torchvision."""
    if PACKAGE in sys.modules or not torchvision_missing():
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: torchmetrics then reports the missing package itself
    package = types.ModuleType(PACKAGE)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules[PACKAGE] = package
