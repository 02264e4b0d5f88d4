"""The names of the tampering methods, kept apart from their code so the CLI can list them without
importing torch (every `btd` invocation registers every sub-command)."""

from __future__ import annotations

SLICE_METHODS = ("inject-noise", "inject-smooth", "inject-diffusion", "copy-move", "remove", "remove-diffusion")
ALL_METHODS = (*SLICE_METHODS, "inject-3d")
