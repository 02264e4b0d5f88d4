"""The `btd` command line.

Each area of the product registers its own sub-commands, so this module stays a thin dispatcher and
importing it stays cheap (heavy libraries such as torch are imported inside the commands that use them).
The process settings are read here, once, when a command that needs them starts (`btd.commands`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that expose `register(subparsers)`; each adds its own sub-commands.
COMMAND_MODULES = (
    "models.model_cli",  # btd model info
    "models.cli",  # btd score / calibrate / evaluate
    "models.train_cli",  # btd train
    "models.forensics.cli",  # btd tamper / bench
    "btd.commands",  # btd serve / worker / send / db
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="btd", description="Back-in-Time Diffusion tampering detector")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
