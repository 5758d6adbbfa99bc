"""How every table of the suite writes its numbers: one style for times, speed-ups, percentages and counts."""

import math
from typing import Optional


def ms(value: Optional[float]) -> str:
    """Milliseconds with about three significant digits; "—" for a missing or failed measurement."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def ratio(value: Optional[float]) -> str:
    """A speed-up (>1: faster than the baseline)."""
    if value is None:
        return "—"
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def speedup(reference: Optional[float], own: Optional[float]) -> str:
    """How many times faster `own` is than `reference`, or a dash where either is missing."""
    return ratio(reference / own) if reference and own else "—"


def percent(value: Optional[float]) -> str:
    """A fraction as a percentage, or a dash."""
    return "—" if value is None else f"{100 * value:.1f}%"


def number(value: Optional[float], digits: int = 0) -> str:
    """A number with thousands separators, or a dash."""
    return "—" if value is None else f"{value:,.{digits}f}"
