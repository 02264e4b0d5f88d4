"""Check a written SR or KOS with the two independent DICOM validators: dciodvfy and dsrdump.

Why in the product and not only in the tests: a document the PACS rejects, or stores but cannot show,
is a lost verdict. Both tools are optional at run time (`available()`); the tests require them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def available() -> bool:
    return shutil.which("dciodvfy") is not None and shutil.which("dsrdump") is not None


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy (dicom3tools) prints for the file; warnings are not errors."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dsrdump_errors(path: Path) -> list[str]:
    """dsrdump (dcmtk) error lines ("E: ..."), plus its exit status when it fails without saying why."""
    proc = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith(("E:", "F:"))]
    if proc.returncode != 0 and not errors:
        errors.append(f"dsrdump exited with {proc.returncode}")
    return errors


def validation_errors(path: Path) -> list[str]:
    """Every error either validator finds (empty: the document is valid for both)."""
    return [f"dciodvfy: {e}" for e in dciodvfy_errors(path)] + [f"dsrdump: {e}" for e in dsrdump_errors(path)]
