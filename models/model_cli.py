"""`btd model info PATH`: what a checkpoint is, before anyone scores with it.

Registered by btd.cli. torch is imported inside the command so that `btd --help` stays cheap.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_BAD_CHECKPOINT = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `btd model ...`."""
    model = subparsers.add_parser("model", help="inspect model checkpoints")
    commands = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    info = commands.add_parser(
        "info", help="layout, version, configuration, parameter count, SHA-256 and metadata of a checkpoint"
    )
    info.add_argument("path", help="checkpoint file (.pt); NAME.json beside it is read as its metadata")
    info.add_argument("--ema", action="store_true", help="describe the EMA weights of a Trainer checkpoint")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.add_argument(
        "--modality",
        choices=("CT", "MR"),
        default=None,
        help="published defaults to assume when there is no metadata file (default CT)",
    )
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from models.checkpoint import CheckpointError, load_model

    try:
        loaded = load_model(args.path, use_ema=args.ema, modality=args.modality)
    except CheckpointError as exc:
        print(f"btd model info: {exc}", file=sys.stderr)
        return EXIT_BAD_CHECKPOINT
    info = loaded.info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    config = loaded.config
    version = loaded.version or "not recorded (computed as the layout's own version)"
    lines = [
        f"path:        {loaded.path}",
        f"layout:      denoising-diffusion-pytorch {loaded.layout}",
        f"version:     {version}",
        f"weights:     {loaded.source}",
        f"config:      Unet(dim={config.dim}, dim_mults={config.dim_mults}, channels={config.channels}); "
        f"{config.timesteps} timesteps, {config.beta_schedule} schedule, image size {config.image_size}, "
        f"attention {config.attn_heads} heads x {config.attn_dim_head}",
        f"parameters:  {loaded.n_params:,}",
        f"sha256:      {loaded.weights_sha256}",
    ]
    if loaded.metadata is not None:
        origin = "from file" if loaded.metadata_from_file else "published defaults (no metadata file)"
        lines.append(f"metadata:    {loaded.metadata.summary()} [{origin}]")
        if loaded.metadata.software_version:
            lines.append(f"software:    {loaded.metadata.software_version}")
    print("\n".join(lines))
    return 0
