"""JSON-safe dictionaries of attributions and verdicts (NaN becomes null)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from detectors.types import Attribution, Target, Verdict

__all__ = ["attribution_to_dict", "target_to_dict", "verdict_to_dict"]


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def target_to_dict(target: Target) -> dict[str, Any]:
    return {"position": target.position, "token_id": target.token_id, "text": target.text}


def attribution_to_dict(attribution: Attribution) -> dict[str, Any]:
    """Everything an attribution records, with its provenance."""
    return {
        "targets": [target_to_dict(t) for t in attribution.targets],
        "order": attribution.order.tolist(),
        "insertion": _clean(attribution.insertion),
        "deletion": _clean(attribution.deletion),
        "p_full": _clean(attribution.p_full),
        "p_blank": _clean(attribution.p_blank),
        "compact_set": list(attribution.compact_set),
        "forward_passes": attribution.forward_passes,
        "seconds": attribution.seconds,
        "stopped_by": attribution.stopped_by.value,
        "search": attribution.search,
        "scorer": attribution.scorer_name,
        "partition": attribution.partition_method,
        "n_regions": attribution.n_regions,
        "fill": attribution.fill.value,
        "weights": list(attribution.weights),
        "version": attribution.version,
    }


def verdict_to_dict(verdict: Verdict) -> dict[str, Any]:
    """A verdict with the numbers it was decided from."""
    return {
        "target": target_to_dict(verdict.target),
        "label": verdict.label.value,
        "prior_score": _clean(verdict.prior_score),
        "hallucination_score": _clean(verdict.hallucination_score),
        "p_full": _clean(verdict.p_full),
        "p_blank": _clean(verdict.p_blank),
        "insight": _clean(verdict.insight),
        "necessity": _clean(verdict.necessity),
        "relative_drop": _clean(verdict.relative_drop),
        "perceptual_influence": _clean(verdict.perceptual_influence),
        "compact_set": list(verdict.compact_set),
        "borrowed_from": verdict.borrowed_from,
        "reason": verdict.reason,
        "detector": verdict.detector,
        "version": verdict.version,
        "extra": {k: _clean(v) for k, v in verdict.extra.items()},
    }
