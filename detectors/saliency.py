"""From an ordering to a saliency value per region (EAGLE.md section 6)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from detectors.types import Attribution

__all__ = [
    "measured_regions",
    "measured_steps",
    "measured_values",
    "objective_curve",
    "region_values",
    "values_from_curve",
]


def objective_curve(attribution: Attribution) -> np.ndarray:
    """`(N + 1,)` F along the order, with prefixes the search did not score filled by linear
    interpolation between scored ones (F(empty) and F(V) are always known)."""
    curve = attribution.objective
    known = ~np.isnan(curve)
    if known.all():
        return curve
    steps = np.arange(curve.size)
    return np.asarray(np.interp(steps, steps[known], curve[known]))


def region_values(attribution: Attribution) -> np.ndarray:
    """`(R,)` float in [0, 1] indexed by region id: value_k = -sum_{j<=k} |F_j - F_{j-1}| along
    the order, min-max normalised (earlier regions are hotter; gaps follow the marginal gains).
    All zeros when F is flat (no region changes anything)."""
    return values_from_curve(attribution.order, objective_curve(attribution))


def values_from_curve(order: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """`region_values` from an order and its complete `(N + 1,)` objective curve."""
    order = np.asarray(order, dtype=np.int64)
    values = -np.cumsum(np.abs(np.diff(np.asarray(curve, dtype=np.float64))))
    low, high = float(values.min()), float(values.max())
    out = np.zeros(order.size)
    if high - low > 1e-12:
        out[order] = (values - low) / (high - low)
    return out


def measured_steps(order: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """`(R,)` bool by region id: whether the region's marginal gain along `order` was measured
    (F scored both before and after it was added), from an `(N + 1,)` curve with NaN where a
    prefix was not scored.  The other regions' values are interpolated: where they fall in the
    order says what the search guessed, not what the model did."""
    order = np.asarray(order, dtype=np.int64)
    known = ~np.isnan(np.asarray(curve, dtype=np.float64))
    out = np.zeros(order.size, dtype=np.bool_)
    out[order] = known[1:] & known[:-1]
    return out


def measured_regions(attribution: Attribution) -> np.ndarray:
    """`(R,)` bool by region id: `measured_steps` of the attribution's order and objective."""
    return measured_steps(attribution.order, attribution.objective)


def measured_values(attribution: Attribution) -> np.ndarray:
    """`(R,)` `region_values` with the regions whose gain was never measured at 0: the evidence
    a heatmap shows in colour (the others are drawn neutral)."""
    return np.where(measured_regions(attribution), region_values(attribution), 0.0)
