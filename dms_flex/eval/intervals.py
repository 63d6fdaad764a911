"""95% intervals of the evaluation's per-item scores (reasoning, needle, variable tracking).

- `mean_interval(scores)`: the mean with a normal-approximation interval, mean +- z * s / sqrt(n), s the
  sample standard deviation (n - 1 in the denominator). Scores may be fractional (reasoning-gym's partial
  credit, variable-tracking recall), so this is the interval of a mean, not a binomial one.
- `paired_interval(method, reference)`: the mean of the per-item differences method - reference over the
  same items in the same order, with the same kind of interval. On shared items this is much narrower
  than two separate intervals: both answered the same questions, so question difficulty cancels.
With n >= 200 the normal approximation of a mean is adequate; for small n the interval is only indicative
(a t quantile would widen it by under 2% at n = 200).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


def mean_interval(scores: Sequence[float], z: float = Z95) -> Dict[str, float]:
    """{"mean", "low", "high", "half_width", "n"}; one score gives a zero-width interval, none raises."""
    n = len(scores)
    if n == 0:
        raise ValueError("no scores: an interval needs at least one item")
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": n}


def paired_interval(scores: Sequence[float], reference: Sequence[float], z: float = Z95) -> Dict[str, float]:
    """The interval of mean(scores - reference), item by item; the two lists must be the same items."""
    if len(scores) != len(reference):
        raise ValueError(
            f"paired scores need the same items: {len(scores)} against {len(reference)} (were both runs made "
            f"with the same --reasoning-n / --lengths / --depths / --trials?)"
        )
    return mean_interval([a - b for a, b in zip(scores, reference)], z)


def format_interval(iv: Optional[Dict[str, float]], scale: float = 1.0, digits: int = 3) -> str:
    """'0.352 [0.301, 0.403]' (scale 100 gives points)."""
    if not iv:
        return "-"
    f = f"{{:.{digits}f}}"
    return f"{f.format(iv['mean'] * scale)} [{f.format(iv['low'] * scale)}, {f.format(iv['high'] * scale)}]"
