"""Where a machine's CPU time went over an interval (``/proc/stat``'s first line): how much
was idle, and how much the hypervisor took (steal). A run whose steal is high met a busy
host, not slower code: figures from such runs are not comparable with the others."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass(frozen=True, slots=True)
class MachineTicks:
    """Cumulative ticks per kind since boot, all CPUs together."""

    user: int
    nice: int
    system: int
    idle: int
    iowait: int
    irq: int
    softirq: int
    steal: int

    @classmethod
    def parse(cls, first_line: str) -> MachineTicks:
        name, *values = first_line.split()
        if name != "cpu" or len(values) < len(_FIELDS):
            raise ValueError(f"not /proc/stat's total line: {first_line!r}")
        return cls(*(int(value) for value in values[: len(_FIELDS)]))

    @classmethod
    def now(cls, stat: Path = Path("/proc/stat")) -> MachineTicks:
        with stat.open() as lines:
            return cls.parse(lines.readline())

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in _FIELDS)


@dataclass(frozen=True, slots=True)
class MachineShare:
    """Shares (0..1) of the machine's time between two readings."""

    idle: float
    steal: float

    @classmethod
    def between(cls, before: MachineTicks, after: MachineTicks) -> MachineShare:
        total = after.total - before.total
        if total <= 0:
            return cls(0.0, 0.0)
        idle = after.idle + after.iowait - before.idle - before.iowait
        return cls(idle / total, (after.steal - before.steal) / total)

    def __str__(self) -> str:
        return f"machine idle {self.idle:.0%}, steal {self.steal:.0%}"
