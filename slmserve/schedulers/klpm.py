"""k-LPM (Dexter et al., NeurIPS 2025): one FCFS pick, then ``k - 1`` longest-prefix picks.

Pure LPM can starve a request whose prefix is cold: warm arrivals keep sorting ahead of it.
Pure FCFS forfeits prefix reuse. k-LPM interleaves them: in every cycle of ``k`` admissions the
first takes the oldest waiting request and the other ``k - 1`` take the longest cached match.
``k = 1`` is FCFS; ``k -> inf`` approaches LPM.

The paper processes queries one at a time; an engine admits batches. We keep the cycle position
``pos`` across steps and build each round's order by replaying the cycle from ``pos`` over the
waiting requests. The engine admits a prefix of that order (break semantics) and reports it
when it plans the step (``on_admit``, before the next order even when steps overlap); ``pos``
then advances by the number actually admitted. A request that did not fit therefore does
not consume its slot: if the FCFS pick fails, the next round starts with an FCFS pick again.

Consequence (bounded overtaking): every block of ``k`` consecutive admissions contains an FCFS
pick, which removes the oldest waiting request, and later arrivals are never older. A request
with ``p`` older requests waiting is admitted within ``k * (p + 1)`` admissions, whatever the
prefix structure. (Preempted requests keep their arrival time and re-enter as "old".)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from slmserve.config import choice_option, int_option
from slmserve.hookspecs import hookimpl
from slmserve.interfaces import Scheduler
from slmserve.plugins import Registry
from slmserve.schedulers.lpm import ClientTally, fcfs_sorted
from slmserve.types import SchedRequest, StepReport


class KLPM(Scheduler):
    """k-LPM: one FCFS pick, then k-1 longest-prefix-match picks, cycle kept across steps."""

    name = "klpm"

    def __init__(self, *, k: Any = 4, match: str = "length") -> None:
        """
        :param k: cycle length (>= 1); ``1`` is FCFS.
        :param match: LPM key for the ``k - 1`` picks: ``"length"`` (absolute matched tokens,
            SGLang's key) or ``"ratio"`` (matched / prompt length).
        """
        self.k = int_option("k", k, minimum=1)
        self.match = choice_option("match", match, ("length", "ratio"))
        self.pos = 0
        """Position in the cycle of the next admission: 0 is the FCFS pick."""
        self._tally = ClientTally()

    def order(self, waiting: Sequence[SchedRequest], now: float) -> list[SchedRequest]:
        fcfs = fcfs_sorted(waiting)
        n = len(fcfs)
        if self.k == 1 or n <= 1:
            return fcfs
        if self.match == "length":
            score: list[float] = [r.matched_len for r in fcfs]
        else:
            score = [r.matched_len / r.prompt_len if r.prompt_len else 0.0 for r in fcfs]
        # Indices by descending score; the stable sort keeps arrival order among ties.
        lpm = sorted(range(n), key=score.__getitem__, reverse=True)
        taken = bytearray(n)
        out: list[SchedRequest] = []
        i = j = 0  # next candidate in FCFS order / in LPM order
        pos = self.pos
        for _ in range(n):
            if pos == 0:
                while taken[i]:
                    i += 1
                pick = i
            else:
                while taken[lpm[j]]:
                    j += 1
                pick = lpm[j]
            taken[pick] = 1
            out.append(fcfs[pick])
            pos = (pos + 1) % self.k
        return out

    def on_admit(self, admitted: Sequence[str], now: float) -> None:
        # Admission follows our order and stops at the first misfit, so the admitted requests
        # are exactly the first len(admitted) picks of the cycle.
        self.pos = (self.pos + len(admitted)) % self.k

    def on_step(self, report: StepReport) -> None:
        self._tally.add(report)

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        return self._tally.stats()


@hookimpl
def slmserve_register_schedulers(registry: Registry) -> None:
    registry.add(KLPM.name, KLPM, description="k-LPM: one FCFS pick per k admissions, else LPM")
