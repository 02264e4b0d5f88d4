"""Model metadata: the JSON beside every model round-trips, and bad files are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.metadata import MetadataError, ModelMetadata, metadata_path_for, published_defaults


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    meta = ModelMetadata(
        name="chest",
        modality="CT",
        channels=2,
        windows=[{"low": -700.0, "high": 2000.0}, {"low": -1000.0, "high": 200.0}],
        patch_size=64,
        unet={"dim": 16, "dim_mults": [1, 2, 4], "layout": "1.6.4"},
        calibration={"slice_threshold": 2.5},
        anomaly={"kind": "log-energy-z"},
        training={"steps": 100},
        software_version="btd 0.1.0",
        weights_sha256="ab" * 32,
    )
    path = tmp_path / "chest.json"
    meta.write(path)
    data = json.loads(path.read_text())
    assert data["format"] == "btd-model/1" and data["windows"][1] == {"low": -1000.0, "high": 200.0}
    assert ModelMetadata.read(path) == meta
    assert "CT" in meta.summary() and "calibrated" in meta.summary()


def test_unknown_keys_are_ignored_missing_name_is_not() -> None:
    data = ModelMetadata(name="m").to_dict()
    data["added_by_a_newer_btd"] = 1
    assert ModelMetadata.from_dict(data).name == "m"
    del data["name"]
    with pytest.raises(MetadataError, match="no 'name'"):
        ModelMetadata.from_dict(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other/2"}, "format"),
        ({"modality": "PET"}, "modality"),
        ({"channels": 2}, "one per channel"),
        ({"windows": [{"low": 5, "high": 1}]}, "low must be below high"),
        ({"windows": [{"low": 5}]}, "'low' and 'high'"),
        ({"patch_size": 4}, "patch_size"),
        ({"normalization": "zscore"}, "normalization"),
    ],
)
def test_bad_fields_are_refused(change: dict, message: str) -> None:
    data = {**ModelMetadata(name="m").to_dict(), **change}
    with pytest.raises(MetadataError, match=message):
        ModelMetadata.from_dict(data)


def test_not_json_is_refused() -> None:
    with pytest.raises(MetadataError, match="not valid JSON"):
        ModelMetadata.from_json("{")
    with pytest.raises(MetadataError, match="JSON object"):
        ModelMetadata.from_json("[1, 2]")


def test_published_defaults() -> None:
    ct = published_defaults("CT_model")
    assert ct.windows == [{"low": -700.0, "high": 2000.0}] and ct.patch_size == 96 and ct.normalization == "window"
    mr = published_defaults("MRI_model", "MRI")
    assert mr.modality == "MR" and mr.patch_size == 128 and mr.normalization == "minmax" and mr.windows == []
    with pytest.raises(MetadataError):
        published_defaults("x", "US")


def test_metadata_path_is_beside_the_weights() -> None:
    assert metadata_path_for(Path("/m/CT_model.pt")) == Path("/m/CT_model.json")
