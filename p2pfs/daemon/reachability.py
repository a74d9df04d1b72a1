"""Whether peers elsewhere can open a path to us, judged from dial-back outcomes (SPEC
"Reachability by dial-back"), sans-I/O: time is a parameter.

A node cannot tell from its own side: every connection it dials works whether or not a
firewall on the way (the host's own, or a home router's stateful IPv6 firewall) drops
datagrams from sources it has not sent to, and the addresses peers observe show a NAT but
not a firewall. A peer that sends a probe from a port this node never sent to can tell.

Outcomes are kept per address family and per place of the peer that sent the probe (one
/24 or /48: a peer speaks for its network, and a second peer there adds nothing), the
newest per place. A way in exists if more places saw their probe arrive than saw it lost.
One place that disagrees with another must not decide: a neighbour in our own site on a
global address sends from inside our firewall, and a peer whose own network drops its
probes reports a firewall we do not have. A tie is unreachable, the cheaper mistake (a
relay registration, a DHT client) beside the opposite one (nobody reaches us, no relay):
so one peer that answers PROBED and sends nothing can tie one honest place, and the node
registers with a relay until another place is heard. A verdict resting on one place, or
on places that disagree (fewer than PLACES_KEPT), is checked again soon by a new place
only, for up to RECHECK; after that any place is asked again. (A tie that kept the last
verdict instead was tried and dropped: which place spoke first then decided, and a
neighbour inside our firewall asked first kept a firewalled node "reachable" for an
hour.)
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

OUTCOME_TTL = 3600.0
"""How long an outcome counts: a firewall may be opened or closed meanwhile."""
RECHECK = 1800.0
"""A family with a verdict is checked again this long after its newest outcome."""
CONFIRM_SOON = 30.0
"""A verdict that rests on one place alone, or on places that disagree, is checked again
this soon, by another place if one is there (a peer whose own network drops its probes,
or one inside our firewall, must not decide for long)."""
PLACES_KEPT = 8


class Verdict(enum.Enum):
    UNKNOWN = "unknown"
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class Outcome:
    reached: bool
    at: float
    server: str
    """The peer that probed (its short NodeId, for ``p2pfs id``)."""


class Reachability:
    """Dial-back outcomes and the verdict they give, per family (4 or 6)."""

    def __init__(self) -> None:
        self._outcomes: dict[int, OrderedDict[str, Outcome]] = {4: OrderedDict(), 6: OrderedDict()}

    def record(self, family: int, place: str, outcome: Outcome) -> None:
        """A dial-back from a peer in ``place`` ended: its probe arrived or not."""
        kept = self._outcomes[family]
        kept.pop(place, None)
        kept[place] = outcome
        while len(kept) > PLACES_KEPT:
            kept.popitem(last=False)

    def forget(self) -> None:
        """Our addresses changed: what was found holds for the old ones only."""
        for kept in self._outcomes.values():
            kept.clear()

    def _live(self, family: int, now: float) -> dict[str, Outcome]:
        return {
            place: outcome
            for place, outcome in self._outcomes[family].items()
            if now - outcome.at < OUTCOME_TTL
        }

    def verdict(self, family: int, now: float) -> Verdict:
        live = self._live(family, now).values()
        if not live:
            return Verdict.UNKNOWN
        arrived = sum(outcome.reached for outcome in live)
        return Verdict.REACHABLE if 2 * arrived > len(live) else Verdict.UNREACHABLE

    def confirming(self, family: int, now: float) -> bool:
        """Whether the check due is one for a new place: the verdict rests on one place,
        or on places that disagree (asking a place heard from again settles nothing)."""
        live = self._live(family, now)
        if not live or now - max(outcome.at for outcome in live.values()) >= RECHECK:
            return False  # due for a plain recheck: a place heard from may answer again
        agreed = len({outcome.reached for outcome in live.values()}) == 1
        return len(live) == 1 or (not agreed and len(live) < PLACES_KEPT)

    def unreachable(self, now: float) -> bool:
        """Whether peers of some family cannot reach us directly (then we need a relay, and
        must not serve the DHT: its nodes would list us and fail to reach us)."""
        return any(self.verdict(family, now) is Verdict.UNREACHABLE for family in (4, 6))

    def places(self, family: int, now: float) -> frozenset[str]:
        """The places whose outcome counts now."""
        return frozenset(self._live(family, now))

    def due(self, family: int, now: float) -> float:
        """When ``family`` should be checked next (``now`` or earlier: at once)."""
        live = self._live(family, now)
        if not live:
            return now
        newest = max(outcome.at for outcome in live.values())
        return newest + (CONFIRM_SOON if self.confirming(family, now) else RECHECK)

    def info(self, now: float, families: tuple[int, ...] = (4, 6)) -> dict[str, Any]:
        """For ``p2pfs id --json``: per family, the verdict and the outcomes behind it."""
        return {
            f"ipv{family}": {
                "verdict": self.verdict(family, now).value,
                "probes": [
                    {
                        "by": outcome.server,
                        "place": place,
                        "reached": outcome.reached,
                        "seconds_ago": round(now - outcome.at, 1),
                    }
                    for place, outcome in reversed(self._live(family, now).items())
                ],
            }
            for family in families
        }
