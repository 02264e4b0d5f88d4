"""Studies stuck past their deadline, as the gateway reports them: `/readyz`, `btd_studies_stuck`, the
dashboard's overview. One computation (core/liveness.py) so the three never disagree.

Why the queues are read only when needed: a study counts as stuck only if its message is not waiting in
the queue, so the broker's lists are read only when some study would be stuck without them; a healthy
gateway answers with one database query.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core import liveness, queue
from core.db.base import utcnow
from core.db.session import session_factory
from core.settings import Settings


@dataclass(frozen=True)
class StuckReport:
    counts: dict[str, int] = field(default_factory=dict)  # {state: stuck studies}, every deadline state

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        listed = ", ".join(f"{state} {n}" for state, n in self.counts.items() if n)
        return f"{self.total} stuck ({listed})" if self.total else "none stuck"


def stuck_report(settings: Settings) -> StuckReport:
    """Stuck studies by state now; raises if the database cannot be read (the caller says so)."""
    now = utcnow()
    with session_factory(settings)() as session:
        steps = liveness.load_steps(session)
    counts = liveness.stuck_counts(steps, now, settings, waiting=set())
    if any(counts.values()):
        counts = liveness.stuck_counts(steps, now, settings, queue.waiting_messages(settings))
    return StuckReport(counts)
