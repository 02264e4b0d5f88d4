"""The forensic science of btd: BTD diffusion models, DICOM preprocessing, scoring and evaluation.

This package knows nothing about networks, databases or queues, so it can be used on its own from
Python or from the `btd` command line.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:  # pyproject.toml is the one place the version is written; installed metadata carries it
    __version__ = version("btd")
except PackageNotFoundError:  # a source tree used without installing (pip install -e . fixes that)
    __version__ = "0+unknown"

__all__ = [
    "CueResult",
    "Detector",
    "InstanceResult",
    "ModelInfo",
    "Reference",
    "ReferenceKey",
    "ReferenceSet",
    "Region",
    "SeriesResult",
    "__version__",
]

if TYPE_CHECKING:
    from models.detector import Detector
    from models.reference import Reference, ReferenceKey, ReferenceSet
    from models.results import CueResult, InstanceResult, ModelInfo, Region, SeriesResult

# Resolved on first use so that `import models` (e.g. by the CLI dispatcher) stays cheap: the Detector
# pulls in torch, which takes seconds to import.
_LAZY = {
    "Detector": "models.detector",
    "InstanceResult": "models.results",
    "ModelInfo": "models.results",
    "Region": "models.results",
    "SeriesResult": "models.results",
    "CueResult": "models.results",
    "Reference": "models.reference",
    "ReferenceKey": "models.reference",
    "ReferenceSet": "models.reference",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
