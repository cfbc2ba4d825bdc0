"""A link spec: the bandwidth and one-way latency of an emulated link, parsed from text such as ``60MB/s,20ms``.

Units are case-sensitive and only unambiguous spellings are accepted (issue 15: ``100Mb/s`` used to be read as
100 MB/s, 8× too fast): a capital ``B`` is bytes, ``bit`` or ``bps`` is bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BenchConfigError

# Bandwidth units, matched *exactly* (case-sensitive): a capital B is bytes, "bit" or "bps" is bits. Spellings whose
# meaning hangs on the case of one letter ("Mb/s", "mb/s", "MBps", "mbps") are refused rather than guessed.
BYTE_UNITS = {"B/s": 1.0, "kB/s": 1e3, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9,
              "KiB/s": 1024.0, "MiB/s": 1024.0**2, "GiB/s": 1024.0**3}
"""Bytes per second: decimal (kB/s = KB/s = 1000 B/s, MB/s, GB/s) and binary (KiB/s, MiB/s, GiB/s)."""
BIT_UNITS = {"bit/s": 1 / 8, "kbit/s": 125.0, "Kbit/s": 125.0, "Mbit/s": 125e3, "Gbit/s": 125e6,
             "kbps": 125.0, "Kbps": 125.0, "Mbps": 125e3, "Gbps": 125e6}
"""Bits per second, as bytes per second (÷ 8). ``Mbps``/``Gbps`` follow the networking convention: megabits."""
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
"""One-way latency units."""
_BANDWIDTH_UNITS = {**BYTE_UNITS, **BIT_UNITS}
_ACCEPTED = ("bandwidth in bytes: " + ", ".join(BYTE_UNITS) + "; in bits: " + ", ".join(BIT_UNITS)
             + "; latency: " + ", ".join(TIME_UNITS))


def _refusal(unit: str, part: str, text: str) -> str:
    """The error text for a unit that is not one of the accepted spellings."""
    folded = unit.lower()
    where = f"{part!r}" if part == text else f"{part!r} of {text!r}"
    if "b" in folded and any(folded.startswith(p) for p in ("b", "k", "m", "g")) and (
            folded.endswith("/s") or folded.endswith("ps")):
        why = (f"unit {unit!r} in {where} is refused: whether it means bits or bytes hangs on the case "
               "of one letter. Write MB/s for megabytes per second, Mbit/s (or Mbps) for megabits per second")
    elif folded in TIME_UNITS:
        why = f"unit {unit!r} in {where}: units are case-sensitive (did you mean {folded!r}?)"
    else:
        why = f"unknown unit {unit!r} in {where}"
    return f"{why}. Accepted spellings (case-sensitive): {_ACCEPTED}"


def _exact(value: float, scales: tuple[tuple[str, float], ...]) -> str:
    """``value`` written in the first unit of ``scales`` whose text parses back to exactly ``value``."""
    for unit, scale in scales:
        text = f"{value / scale!r}"
        if float(text) * scale == value:
            return (text[:-2] if text.endswith(".0") else text) + unit
    raise AssertionError("the last scale must be 1")  # unreachable: scale 1 always round-trips


@dataclass(frozen=True)
class LinkSpec:
    """One emulated link, applied to each direction separately."""

    bandwidth_Bps: float | None
    """Bytes per second per direction; None = unlimited."""
    latency_s: float = 0.0
    """One-way delay added to each direction (so a round trip gains ``2 * latency_s``)."""

    @classmethod
    def parse(cls, text: str | None) -> "LinkSpec | None":
        """``"60MB/s,20ms"`` / ``"100Mbit/s"`` / ``"20ms"`` / ``"none"`` → a spec (None for ``none``/empty).

        Units are case-sensitive and only unambiguous spellings are accepted (see :data:`BYTE_UNITS`,
        :data:`BIT_UNITS`, :data:`TIME_UNITS`): ``MB/s``/``KB/s``/``kB/s``/``GB/s`` and ``MiB/s``… are bytes;
        ``Mbit/s``/``Gbit/s``/``Kbit/s`` and ``Mbps``/``Gbps``/``Kbps`` are bits. ``Mb/s``, ``mb/s``, ``MBps``,
        ``mbps`` are refused: their meaning hangs on the case of one letter (issue 15: ``100Mb/s`` used to be read
        as 100 MB/s, 8× too fast).

        Raises:
            BenchConfigError: an unparseable part, a unit not listed (the message lists the accepted spellings),
                a bandwidth that is not positive, or two bandwidths/latencies in one spec.
        """
        if text is None or text.strip().lower() in ("", "none", "off"):
            return None
        bandwidth, latency = None, None
        for part in (p.strip() for p in text.split(",")):
            match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Zµ/]+)", part)
            if not match:
                raise BenchConfigError(f"cannot parse link part {part!r} of {text!r}; write e.g. '60MB/s,20ms' "
                                       f"or '100Mbit/s,5ms'. Accepted spellings (case-sensitive): {_ACCEPTED}")
            value, unit = float(match.group(1)), match.group(2)
            if unit in TIME_UNITS:
                if latency is not None:
                    raise BenchConfigError(f"two latencies in link spec {text!r}; give one")
                latency = value * TIME_UNITS[unit]
            elif unit in _BANDWIDTH_UNITS:
                if bandwidth is not None:
                    raise BenchConfigError(f"two bandwidths in link spec {text!r}; give one")
                if value <= 0:
                    raise BenchConfigError(f"bandwidth must be > 0; got {part!r} (use 'none' for an unshaped link)")
                bandwidth = value * _BANDWIDTH_UNITS[unit]
            else:
                raise BenchConfigError(_refusal(unit, part, text))
        return cls(bandwidth, latency or 0.0)

    def as_record(self) -> dict:
        """The record form ``{"bandwidth_Bps", "latency_s"}`` (an unlimited bandwidth is recorded as ``inf``→1e18)."""
        return {"bandwidth_Bps": float(self.bandwidth_Bps or 1e18), "latency_s": float(self.latency_s)}

    def __str__(self) -> str:
        """A spec that :meth:`parse` reads back to exactly this one (it is what the relay process is given)."""
        rate = _exact(self.bandwidth_Bps, (("MB/s", 1e6), ("B/s", 1.0))) if self.bandwidth_Bps else None
        delay = _exact(self.latency_s, (("ms", 1e-3), ("s", 1.0)))
        return f"{rate},{delay}" if rate else delay
