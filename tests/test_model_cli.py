"""`btd model info`: what a checkpoint is, and a clear error with exit code 2 when it is not usable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from btd.cli import main

REFERENCE = Path(__file__).parent / "fixtures" / "btd-reference"


def test_info_text(capsys) -> None:
    assert main(["model", "info", str(REFERENCE / "ddpm-1.8.3" / "checkpoint.pt")]) == 0
    out = capsys.readouterr().out
    assert "layout:      denoising-diffusion-pytorch 1.8.3" in out
    assert "dim=8, dim_mults=(1, 2, 4, 8), channels=1" in out
    assert "parameters:  673,809" in out and "attention 4 heads x 32" in out
    assert "published defaults" in out and "[-700, 2000]" in out


def test_info_json(capsys) -> None:
    assert main(["model", "info", "--json", "--modality", "MR", str(REFERENCE / "ddpm-1.6.4" / "checkpoint.pt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "1.6.4" and info["version"] == "1.6.4" and info["n_params"] == 673_905
    assert info["config"]["dim_mults"] == [1, 2, 4, 8] and len(info["weights_sha256"]) == 64
    assert info["metadata"]["modality"] == "MR" and info["metadata"]["patch_size"] == 128


def test_info_ema_missing_is_an_error(capsys) -> None:
    assert main(["model", "info", "--ema", str(REFERENCE / "ddpm-1.6.4" / "checkpoint.pt")]) == 2
    assert "no 'ema'" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"not weights at all", b"PK\x03\x04truncated"])
def test_bad_checkpoint_exits_2_with_message(tmp_path: Path, capsys, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    assert main(["model", "info", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("btd model info: ") and str(path) in captured.err


def test_installed_command(tmp_path: Path) -> None:
    """The real `btd` entry point, as a user runs it."""
    btd = Path(sys.executable).parent / "btd"
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    result = subprocess.run([str(btd), "model", "info", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "not a PyTorch checkpoint" in result.stderr and "Traceback" not in result.stderr
