"""Search strategies over regions: exact greedy, our budgeted search, the authors' variant."""

from __future__ import annotations

from detectors.search.budgeted import budgeted_greedy
from detectors.search.efficient import efficient_greedy
from detectors.search.evaluator import MaskEvaluator, objective
from detectors.search.exact import exact_greedy

__all__ = ["MaskEvaluator", "budgeted_greedy", "efficient_greedy", "exact_greedy", "objective"]
