"""What an instance replaced under its own UID means for a study's verdict.

The listener keeps different bytes received under a known SOP Instance UID as a new version with
`conflict` set (core/db/repository.py, `record_instance`). Whatever the model then says of the pixels, the
replacement itself is evidence: the PACS, a router or an attacker changed an object that is by definition
immutable (PS3.3: a SOP Instance UID names exactly one set of bytes of content) and sent it again. So a
study holding one is never reported as a silent pass: its verdict is at least `review`, with the reason
stated (the SR carries one TEXT item per replaced instance, worker/reports/sr.py). A study the model
already finds suspicious stays suspicious.
"""

from __future__ import annotations

from core.contracts import Verdict, worst_verdict

# The least a study with a replaced instance can be: a person must look.
REPLACEMENT_FLOOR = Verdict.REVIEW


def verdict_with_replacements(verdict: str | None, n_replaced: int) -> str | None:
    """`verdict`, raised to REPLACEMENT_FLOOR when `n_replaced` instances were replaced under their UID."""
    if n_replaced <= 0:
        return verdict
    return worst_verdict([verdict, REPLACEMENT_FLOOR] if verdict else [REPLACEMENT_FLOOR])


def replacement_reason(n_replaced: int) -> str:
    """The short reason a verdict was raised, for the study's event log."""
    return f"{n_replaced} instance(s) replaced by different bytes under the same SOP Instance UID"
