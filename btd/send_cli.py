"""`btd send`: C-STORE files to a peer, with a progress bar and a summary an operator can act on.

What it prints: one line per instance on stdout (`OK   0x0000 path`, `FAIL 0xA700 path  comment`; with
`--quiet` only the failures), a progress bar on stderr while sending (when stderr is a terminal, or with
`--progress`), then on stderr the count of each status with its meaning, the failures again (so they are
not lost in thousands of OK lines), the rate, and "N sent, M failed". The exit code is 1 if anything
failed or nothing was sent.

Why the imports are inside `run_send`: `btd send` is timed by the ingest benchmark from the command's
start, and the sender itself needs neither pydicom nor pynetdicom.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.dicom.sender import SendResult

# C-STORE statuses a peer commonly answers (PS3.4 table B.2-1, PS3.7 annex C), for the summary.
STATUS_MEANINGS = {
    0x0000: "success",
    0xB000: "warning: coercion of data elements",
    0xB006: "warning: elements discarded",
    0xB007: "warning: dataset does not match SOP class",
    0x0110: "processing failure",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0x0211: "unrecognised operation",
    0xA700: "refused: out of resources",
    0xA900: "error: dataset does not match SOP class",
    0xC000: "error: cannot understand",
}


def status_meaning(status: int | None) -> str:
    if status is None:
        return "no answer"
    if status in STATUS_MEANINGS:
        return STATUS_MEANINGS[status]
    if status & 0xFF00 == 0xA700:
        return "refused: out of resources"
    if status & 0xFF00 == 0xA900:
        return "error: dataset does not match SOP class"
    if status & 0xF000 == 0xC000:
        return "error: cannot understand"
    if status & 0xF000 == 0xB000:
        return "warning"
    return "failure"


def _line(result: SendResult) -> str:
    status = "----" if result.status is None else f"0x{result.status:04X}"
    where = result.path or result.sop_instance_uid or "?"
    detail = f"  {result.error}" if result.error else ""
    return f"{'OK  ' if result.ok else 'FAIL'} {status} {where}{detail}"


def summary(results: Sequence[SendResult], seconds: float, associations: int) -> list[str]:
    """The lines printed after a send: counts per status, failures listed, rate, totals."""
    counts = Counter((r.status, r.error if r.status is None else None) for r in results)
    lines = ["statuses:"]
    for (status, error), count in sorted(counts.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0)):
        code = "----  " if status is None else f"0x{status:04X}"
        # No status: the error says what happened (a file not sent, a peer that never answered)
        meaning = error if status is None and error else status_meaning(status) + (f" ({error})" if error else "")
        lines.append(f"  {code} {count:6d}  {meaning}")
    failed = [r for r in results if not r.ok]
    if failed:
        lines.append(f"failed ({len(failed)}):")
        lines.extend(f"  {_line(r)}" for r in failed[:50])
        if len(failed) > 50:
            lines.append(f"  ... and {len(failed) - 50} more (listed on stdout)")
    rate = len(results) / seconds if seconds > 0 else 0.0
    lines.append(f"{len(results)} instances in {seconds:.2f} s ({rate:.0f}/s) over {associations} association(s)")
    lines.append(f"{len(results) - len(failed)} sent, {len(failed)} failed")
    return lines


def run_send(args: argparse.Namespace) -> int:
    from core.dicom.sender import send_files

    started = time.perf_counter()
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    bar = None
    lock = threading.Lock()
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(unit=" inst", file=sys.stderr, dynamic_ncols=True, desc="btd send")

    def on_result(result: SendResult) -> None:
        if bar is not None:
            with lock:
                bar.update(1)

    try:
        results = send_files(
            args.paths,
            args.host,
            args.port,
            args.aet,
            args.calling_aet,
            timeout=args.timeout,
            associations=max(1, args.associations),
            on_result=on_result,
            on_total=(lambda total: setattr(bar, "total", total)) if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    out = [_line(r) for r in results if not (args.quiet and r.ok)]
    if out:
        print("\n".join(out))
    print("\n".join(summary(results, elapsed, max(1, args.associations))), file=sys.stderr)
    return 1 if not results or any(not r.ok for r in results) else 0
