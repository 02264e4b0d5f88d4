"""The metadata file that travels beside every btd model (``NAME.json`` next to ``NAME.pt``).

Why a separate file: the weights stay in the library's own layout (so the BTD authors' tools read our
models), while everything a scorer needs to use the weights correctly (modality, intensity windows,
patch size, calibration thresholds) and the SHA-256 that ties the two together lives here, readable
without torch.

The authors' published checkpoints (CT_model.pt, MRI_model.pt) have no metadata file; they get the
published defaults from ``published_defaults``: CT window [-700, 2000] HU and 96-px patches, or, for MR,
8-bit slices scaled to [0, 1] and 128-px patches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

METADATA_FORMAT = "btd-model/1"
MODALITIES = ("CT", "MR")
# How pixels become [0, 1] before the model: apply `windows` (CT, HU), or scale each slice's own
# range onto [0, 1] like the 8-bit images the published MR model was trained on.
NORMALIZATIONS = ("window", "minmax")

# The model btd scores with when none is named (BTD_MODEL unset, `btd score` without --model): package data.
DEFAULT_MODEL_PATH = Path(__file__).parent / "weights" / "btd-ct-default.pt"

PUBLISHED_CT_WINDOW = {"low": -700.0, "high": 2000.0}
PUBLISHED_PATCH_SIZE = {"CT": 96, "MR": 128}


class MetadataError(ValueError):
    """A metadata file that cannot be used: wrong format, missing or ill-typed fields."""


@dataclass
class ModelMetadata:
    """What a scorer must know to use a model's weights, and where the model came from."""

    name: str
    modality: str = "CT"
    channels: int = 1
    windows: list[dict[str, float]] = field(default_factory=lambda: [dict(PUBLISHED_CT_WINDOW)])
    patch_size: int = 96
    unet: dict[str, Any] = field(default_factory=dict)  # dim, dim_mults, layout
    timesteps: int = 1000
    beta_schedule: str = "sigmoid"
    calibration: dict[str, Any] = field(default_factory=dict)
    anomaly: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    # The operating point measured on held-out patients (models.forensics.ship): what a report must say about
    # how far a verdict of this model can be trusted. "summary" is one sentence for radiologists.
    performance: dict[str, Any] = field(default_factory=dict)
    # Fused cues (models.fused.FusionConfig; empty = BTD-only scoring, the behaviour before issue 12) and the
    # shipped genuine references per scanner key (models.reference.ReferenceSet.to_dict()).
    fusion: dict[str, Any] = field(default_factory=dict)
    references: dict[str, Any] = field(default_factory=dict)
    software_version: str = ""
    weights_sha256: str = ""
    normalization: str = "window"
    format: str = METADATA_FORMAT

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.format != METADATA_FORMAT:
            raise MetadataError(f"metadata format {self.format!r} is not supported (expected {METADATA_FORMAT!r})")
        if self.modality not in MODALITIES:
            raise MetadataError(f"modality {self.modality!r} is not supported; supported: {', '.join(MODALITIES)}")
        if self.normalization not in NORMALIZATIONS:
            raise MetadataError(f"normalization {self.normalization!r} unknown; known: {', '.join(NORMALIZATIONS)}")
        if not isinstance(self.channels, int) or self.channels < 1:
            raise MetadataError(f"channels must be a positive integer, got {self.channels!r}")
        if not isinstance(self.patch_size, int) or self.patch_size < 8:
            raise MetadataError(f"patch_size must be an integer >= 8, got {self.patch_size!r}")
        if self.normalization == "window":
            if len(self.windows) != self.channels:
                raise MetadataError(f"{len(self.windows)} windows for {self.channels} channels: need one per channel")
            for window in self.windows:
                if not isinstance(window, dict) or not {"low", "high"} <= set(window):
                    raise MetadataError(f"a window needs 'low' and 'high', got {window!r}")
                if not float(window["low"]) < float(window["high"]):
                    raise MetadataError(f"window low must be below high, got {window!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        if not isinstance(data, dict):
            raise MetadataError(f"metadata must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        if "name" not in data:
            raise MetadataError("metadata has no 'name'")
        if "format" not in data:
            raise MetadataError(f"metadata has no 'format' (expected {METADATA_FORMAT!r})")
        # Unknown keys are ignored so that a newer writer's additions do not break an older reader.
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except TypeError as exc:
            raise MetadataError(f"metadata fields have the wrong types: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise MetadataError(f"metadata is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def write(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> ModelMetadata:
        return cls.from_json(Path(path).read_text())

    def summary(self) -> str:
        """One line for humans: what the model judges and how."""
        if self.normalization == "window":
            intensity = ", ".join(f"[{w['low']:g}, {w['high']:g}]" for w in self.windows)
        else:
            intensity = "per-slice min-max"
        calibrated = "calibrated" if self.calibration else "not calibrated"
        return f"{self.name}: {self.modality}, {intensity}, patch {self.patch_size} px, {calibrated}"


def metadata_path_for(weights_path: Path) -> Path:
    """NAME.pt -> NAME.json (the file that service/api/health.py also looks for)."""
    return Path(weights_path).with_suffix(".json")


def published_defaults(
    name: str, modality: str = "CT", unet: dict[str, Any] | None = None, channels: int = 1
) -> ModelMetadata:
    """Metadata for the authors' checkpoints, which ship without any: the published preprocessing."""
    modality = modality.upper()
    if modality == "MRI":
        modality = "MR"
    if modality not in MODALITIES:
        raise MetadataError(f"modality {modality!r} is not supported; supported: {', '.join(MODALITIES)}")
    if modality == "CT":
        return ModelMetadata(
            name=name,
            modality="CT",
            channels=channels,
            windows=[dict(PUBLISHED_CT_WINDOW) for _ in range(channels)],
            patch_size=PUBLISHED_PATCH_SIZE["CT"],
            unet=dict(unet or {}),
            training={"source": "published BTD weights (no metadata file)"},
        )
    return ModelMetadata(
        name=name,
        modality="MR",
        channels=channels,
        windows=[],
        normalization="minmax",
        patch_size=PUBLISHED_PATCH_SIZE["MR"],
        unet=dict(unet or {}),
        training={"source": "published BTD weights (no metadata file)"},
    )
