"""Ingest of several studies at once, one association per study (a busy PACS forwarding what several
modalities just produced), into Orthanc and into `btd serve` on PostgreSQL with one and with two receiving
processes (BTD_DICOM_PROCESSES, service/dicom/receivers.py).

Why beside benchmarks/ingest.py: there every association carries the same study, and a study's row is one
lock in the database, so extra receiving processes cannot commit that study's instances side by side;
different studies they can. The receivers, instances and timing are those of benchmarks/ingest.py
(uncompressed 512x512 CT, storescu with TCP_NODELAY, a fresh receiver per run, warmed with one instance twice,
round-robin repeats).

    .venv/bin/python benchmarks/ingest_studies.py --postgres postgresql+psycopg2://postgres@127.0.0.1:5432
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import ingest  # noqa: E402 - the sibling benchmark's receivers and instances

RECEIVER_KEYS = ("orthanc", "btd-pg", "btd-pg-2")


def send_studies(studies: list[list[Path]], port: int) -> float:
    """Every study over its own storescu association, all at once; seconds until the last one ends."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-xe", "-aet", f"{ingest.SENDER_AET}{k}", "-aec", ingest.RECEIVER_AET, "127.0.0.1", str(port)]
            + [str(f) for f in files],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ingest.dcmtk_env(nodelay=True),
        )
        for k, files in enumerate(studies)
    ]
    failed = [proc.communicate()[1][-300:] for proc in procs if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=512, help="instances in all, split evenly over the studies")
    parser.add_argument("--studies", type=int, nargs="*", default=[4, 8], help="studies (= associations) at once")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--postgres", required=True, help="PostgreSQL server URL without a database")
    args = parser.parse_args(argv)
    ingest.POSTGRES_SERVER = args.postgres.rstrip("/")

    root = Path(tempfile.mkdtemp(prefix="btd-ingest-studies-", dir="/tmp"))
    sets = {k: [ingest.make_instances(root / f"in{k}-{i}", args.n // k) for i in range(k)] for k in args.studies}
    rates: dict[tuple[str, int], list[float]] = {}
    for repeat in range(args.repeats):
        for k in args.studies:
            for key in RECEIVER_KEYS:
                base = Path(tempfile.mkdtemp(dir=root))
                with ingest.RECEIVERS[key](base, True) as receiver:
                    ingest.warm_up(sets[k][0][:1], receiver.port)
                    seconds = send_studies(sets[k], receiver.port)
                    total = k * (args.n // k)  # the warm-up instance is resent with its study: a duplicate
                    stored = ingest.wait_for_count(receiver, total)
                rate = total / seconds
                rates.setdefault((key, k), []).append(rate)
                print(f"[{repeat + 1}/{args.repeats}] {receiver.name} <- {k} studies: {rate:.0f} inst/s, {stored} in")
    print(
        f"\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {ingest.machine()}; "
        f"{args.n} instances, {args.repeats} repeats, median shown.\n"
    )
    print("| receiver | studies at once (one association each) | instances/s (median) | all runs |")
    print("|---|---|---|---|")
    for k in args.studies:
        for key in RECEIVER_KEYS:
            runs = rates[(key, k)]
            print(f"| {key} | {k} | {statistics.median(runs):.0f} | {', '.join(f'{r:.0f}' for r in runs)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
