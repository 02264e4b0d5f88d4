"""The names of the tampering methods, kept apart from their code so the CLI can list them without
importing torch (every `btd` invocation registers every sub-command)."""

from __future__ import annotations

SLICE_METHODS = ("inject-noise", "inject-smooth", "inject-diffusion", "copy-move", "remove", "remove-diffusion")
# The methods of the 2026-11 benchmark (`btd bench build`); kept as they are.
ALL_METHODS = (*SLICE_METHODS, "inject-3d")
# The independent families of issue 12 (models/forensics/families.py), for `btd tamper` red-teaming too.
FAMILY_SLICE_METHODS = ("nps-nodule", "inject-exemplar", "transplant", "remove-exemplar")
FAMILY_SERIES_METHODS = ("nps-nodule-3d", "inject-exemplar-3d")
TAMPER_METHODS = (*ALL_METHODS, *FAMILY_SLICE_METHODS, *FAMILY_SERIES_METHODS)
