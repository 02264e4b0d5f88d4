"""`btd train DATA --out M`: train a BTD model on genuine CT slices, resumable, and export it.

DATA is a folder of DICOM CT (any layout) or the chest-CT corpus root; with the corpus root the
held-out patients of models.corpus are excluded, so a model never trains on its own test set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's sub-commands."""
    parser = subparsers.add_parser("train", help="train a BTD diffusion model on genuine CT (resumable)")
    parser.add_argument("data", type=Path, help="chest-CT corpus root or a folder of DICOM CT")
    parser.add_argument("--out", type=Path, required=True, help="model path to write (NAME.pt, NAME.json beside)")
    parser.add_argument("--run-dir", type=Path, default=None, help="checkpoint folder (default: runs/<NAME>)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--low-t-fraction", type=float, default=0.8, help="share of timesteps drawn from [0, 50]")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--test-patients",
        default=None,
        help="comma-separated held-out patient IDs (default: models.corpus's test patients for the corpus root, "
        "none for another folder)",
    )
    parser.set_defaults(func=run_train)


def is_corpus_root(data: Path) -> bool:
    return (data / "lidc-idri").is_dir() or (data / "lung-pet-ct-dx").is_dir()


def collect_training_slices(data: Path, test_patients: list[str]) -> list:
    from models.corpus import discover, discover_dicom, split_by_patient

    slices = discover(data) if is_corpus_root(data) else discover_dicom(data)
    train, _ = split_by_patient(slices, test_patients)
    return train


def run_train(args: argparse.Namespace) -> int:
    from models.corpus import DEFAULT_TEST_PATIENTS, patients_of
    from models.training import TrainConfig, Trainer, export_model

    if args.test_patients is None:
        test_patients = list(DEFAULT_TEST_PATIENTS) if is_corpus_root(args.data) else []
    else:
        test_patients = [p for p in args.test_patients.split(",") if p]
    slices = collect_training_slices(args.data, test_patients)
    if not slices:
        held = f" (held out: {', '.join(test_patients)})" if test_patients else ""
        print(f"error: no CT slices for training under {args.data}{held}", file=sys.stderr)
        return 2
    config = TrainConfig(
        dim=args.dim,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        lr=args.lr,
        low_t_fraction=args.low_t_fraction,
        steps=args.steps,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads,
    )
    run_dir = args.run_dir or Path("runs") / args.out.stem
    print(f"training on {len(slices)} slices of patients {', '.join(patients_of(slices))}; run folder {run_dir}")
    trainer = Trainer(run_dir, slices, config)
    summary = trainer.train(install_signal_handlers=True)
    export_model(trainer, args.out, summary)
    print(json.dumps(summary, indent=2))
    return 0
