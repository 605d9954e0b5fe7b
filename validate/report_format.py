"""Numbers for people, shared by the drift report's tables and plots (owl3.validate.report).

Fractions come in (0.005 = 0.5 points) and go out as percentages, signed points or 3.2e−4 style, with the
typographic minus sign (U+2212) so columns of numbers line up in a proportional font.
"""

from __future__ import annotations

import math


def minus(text: str) -> str:
    """``text`` with every hyphen-minus written as the minus sign U+2212."""
    return text.replace("-", "−")


def fmt_sci(value: float | None, digits: int = 2) -> str:
    """3.2e-4 style (KL, abs errors); 0, ∞ and NaN spelled out."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return minus("-∞" if value < 0 else "∞")
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return minus(f"{mantissa}e{int(exponent)}")


def fmt_pct(fraction: float, decimals: int = 1) -> str:
    """A fraction as a percentage: 0.8125 -> 81.2%."""
    return f"{fraction * 100:.{decimals}f}%"


def fmt_pts(fraction: float) -> str:
    """A delta in points with its sign: +0.4, −1.2 (and 0.0 for what rounds to zero)."""
    text = f"{fraction * 100:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else minus(text)


def fmt_p(p: float | None) -> str:
    """A p-value: three decimals, 7.0e−20 style below 0.001, — when there is none."""
    if p is None:
        return "—"
    return f"{p:.3f}" if p >= 0.001 else fmt_sci(p)


def fmt_db(value: float) -> str:
    """An SQNR in decibels, one decimal; ∞ for an exact match."""
    return "∞" if math.isinf(value) else minus(f"{value:.1f} dB")
