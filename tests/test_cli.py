"""The `btd` command line: every area's sub-commands are there, and listing them stays cheap."""

from __future__ import annotations

import subprocess
import sys

from btd.cli import build_parser

EXPECTED = {"model", "score", "calibrate", "evaluate", "train", "tamper", "bench", "serve", "worker", "send", "db"}


def test_help_lists_every_areas_subcommands() -> None:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(subparsers.choices) >= EXPECTED


def test_building_the_parser_imports_no_torch() -> None:
    """`btd send` and `btd --help` run on gateways and operators' laptops: importing torch there would
    cost seconds for nothing, so registration must stay free of heavy imports."""
    code = "import sys; from btd.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
