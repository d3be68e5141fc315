"""Unit strings, as users write them in topology and scenario files: bandwidth (Kbit/Mbit/Gbit),
durations (us/ms/s/m), sizes (B/KiB/MiB/GiB, also KB/MB/GB) and percentages. Each parser
returns a plain number in one fixed unit and raises ValueError with a readable reason.
Bandwidths and durations are also held to formats.limits (what HTB can shape, a day); a
figure in a known unit but out of range says so, rather than that it "needs a unit"."""

from __future__ import annotations

import math
import re

from formats.limits import MAX_BANDWIDTH_MBPS, MAX_DURATION_S, MIN_BANDWIDTH_MBPS

_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"

_BANDWIDTH_MBPS = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3,
                   "tbit": 1e6, "bps": 1e-6, "kbps": 1e-3, "mbps": 1.0, "gbps": 1e3, "tbps": 1e6}
_DURATION_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_SIZE_BYTES = {"b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
               "tib": 1024**4, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
               "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _split(text: object, kind: str) -> tuple[float, str]:
    if isinstance(text, bool):
        raise ValueError(f"expected a {kind} string, got {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise ValueError(f"expected a finite {kind}, got {text!r}")
        return float(text), ""
    match = re.fullmatch(_NUMBER + r"\s*([A-Za-z%]*)", str(text).strip())
    if not match:
        raise ValueError(f"not a {kind}: {text!r}")
    return float(match.group(1)), match.group(2).lower()


def _convert(text: object, kind: str, table: dict[str, float], example: str,
             bare_ok: bool = False) -> float:
    value, unit = _split(text, kind)
    if unit == "" and bare_ok:
        return value
    if unit not in table:
        raise ValueError(f"{kind} {text!r} needs a unit, e.g. {example!r}")
    return value * table[unit]


def parse_bandwidth_mbps(text: object) -> float:
    """'100Mbit' -> 100.0 (megabits per second), within what a link can be (formats.limits)."""
    mbps = _convert(text, "bandwidth", _BANDWIDTH_MBPS, "100Mbit")
    if not MIN_BANDWIDTH_MBPS <= mbps <= MAX_BANDWIDTH_MBPS:
        raise ValueError(f"bandwidth {text!r} is outside what a link can shape: "
                         f"{format_bandwidth(MIN_BANDWIDTH_MBPS)} to "
                         f"{format_bandwidth(MAX_BANDWIDTH_MBPS)} (HTB counts bytes per "
                         "second; past 1Gbit a link is an unshaped veth)")
    return mbps


def parse_duration_s(text: object) -> float:
    """'250ms' -> 0.25 (seconds), at most a day. A bare number is refused: the unit is not
    obvious."""
    seconds = _convert(text, "duration", _DURATION_S, "5s")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"duration {text!r} is longer than a day ({MAX_DURATION_S:g}s), the "
                         "longest a run, step or control-plane period may be")
    return seconds


def parse_size_bytes(text: object) -> int:
    """'256MiB' -> 268435456. A bare integer counts as bytes."""
    return int(_convert(text, "size", _SIZE_BYTES, "256MiB", bare_ok=True))


def parse_percent(text: object) -> float:
    """'1.5%' -> 1.5 (percent, 0..100)."""
    value, unit = _split(text, "percentage")
    if unit not in ("%", ""):
        raise ValueError(f"percentage {text!r} must end in '%'")
    if not 0 <= value <= 100:
        raise ValueError(f"percentage {text!r} must be between 0% and 100%")
    return value


def format_bandwidth(mbps: float) -> str:
    if mbps < 1:
        return f"{mbps * 1000:g}Kbit"
    return f"{mbps / 1000:g}Gbit" if mbps >= 1000 else f"{mbps:g}Mbit"


def format_size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f}{unit}"
    return f"{int(nbytes)}B"
