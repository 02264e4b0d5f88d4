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


# Sub-commands whose start-up time matters, with the module that registers them: `btd send` is an
# operator's tool, timed by the ingest benchmark from its start, and registering every area's sub-commands
# (the models' modules among them) cost about 0.1 s of it.
FAST_COMMANDS = {"send": "btd.commands"}


def build_parser(modules: tuple[str, ...] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="btd", description="Back-in-Time Diffusion tampering detector")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in modules:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    owner = FAST_COMMANDS.get(argv[0]) if argv else None
    parser = build_parser((owner,) if owner else COMMAND_MODULES)
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
