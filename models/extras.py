"""Libraries that only research commands use, kept out of the service image (the `research` extra).

Why: the gateway and the workers never plot or read NRRD volumes, and matplotlib with its dependencies
costs about 75 MB of the image. Training, benchmarks and `btd evaluate` import them through `require`, so a
service installation that lacks them says which extra to install instead of a bare ImportError.
"""

from __future__ import annotations

import importlib
from types import ModuleType

RESEARCH_EXTRA = "research"


def require(module: str, purpose: str, extra: str = RESEARCH_EXTRA) -> ModuleType:
    """Import `module`, or raise ModuleNotFoundError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.partition(".")[0]
        if exc.name not in (top, module):
            raise  # the library is there but broken: its own error is the useful one
        raise ModuleNotFoundError(
            f"{purpose} needs {top}, which the service installation leaves out: pip install 'btd[{extra}]'",
            name=exc.name,
        ) from exc
