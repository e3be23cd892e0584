from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors import (
    EagleSearch,
    SearchBudget,
    StopReason,
    Target,
    exact_search_passes,
    grid_partition,
)
from detectors.errors import InvalidTargetError, ScorerContractError
from detectors.evaluation import objective_area, order_curves
from detectors.scorers import AnalyticScorer, MaskedBatch, analytic_case
from detectors.scorers.analytic import TokenResponse

TARGET = Target(position=0, token_id=0, text="cat")
GRIDS = {4: (2, 2), 6: (2, 3), 8: (2, 4), 9: (3, 3), 12: (3, 4), 16: (4, 4), 64: (8, 8)}


def _setup(n: int) -> tuple[np.ndarray, object]:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    return image, grid_partition(image, *GRIDS[n])


def brute_force_order(scorer: AnalyticScorer, target: Target, n: int) -> list[int]:
    """EAGLE.md section 4, transcribed literally: one masked image at a time."""
    selected: list[int] = []
    pool = list(range(n))
    while pool:
        best, best_f = -1, -np.inf
        for v in pool:
            keep = np.zeros((1, n), dtype=np.bool_)
            keep[0, [*selected, v]] = True
            insight = scorer.probabilities(keep, [target])[0, 0]
            necessity = 1.0 - scorer.probabilities(~keep, [target])[0, 0]
            f = insight + necessity
            if f > best_f:
                best, best_f = v, f
        selected.append(best)
        pool.remove(best)
    return selected


@settings(max_examples=60, deadline=None)
@given(n=st.sampled_from([4, 6, 8, 9, 12]), seed=st.integers(0, 10_000), pairs=st.integers(0, 4))
def test_exact_search_matches_brute_force(n: int, seed: int, pairs: int) -> None:
    scorer = AnalyticScorer.random(n, seed, interactions=pairs)
    image, partition = _setup(n)
    attribution = EagleSearch(scorer, SearchBudget.exhaustive(batch_size=5)).attribute(
        image, partition, [TARGET]
    )
    assert attribution.order.tolist() == brute_force_order(scorer, TARGET, n)
    assert attribution.forward_passes == exact_search_passes(n) == n * (n + 1)
    assert attribution.stopped_by is StopReason.COMPLETE
    assert attribution.search == "eagle-exact"


def test_exact_search_logs_complete_curves() -> None:
    scorer = AnalyticScorer.random(9, 3, interactions=2)
    image, partition = _setup(9)
    a = EagleSearch(scorer).attribute(image, partition, [TARGET])
    assert not np.isnan(a.insertion).any() and not np.isnan(a.deletion).any()
    keep_all, keep_none = np.ones((1, 9), np.bool_), np.zeros((1, 9), np.bool_)
    p_full = scorer.probabilities(keep_all, [TARGET])[0, 0]
    p_blank = scorer.probabilities(keep_none, [TARGET])[0, 0]
    assert a.p_full[0] == pytest.approx(p_full) and a.p_blank[0] == pytest.approx(p_blank)
    assert a.insertion[0, 0] == pytest.approx(p_blank) and a.insertion[9, 0] == pytest.approx(
        p_full
    )
    assert a.deletion[0, 0] == pytest.approx(p_full) and a.deletion[9, 0] == pytest.approx(p_blank)
    for r in range(10):
        keep = np.zeros((1, 9), np.bool_)
        keep[0, a.order[:r]] = True
        assert a.insertion[r, 0] == pytest.approx(scorer.probabilities(keep, [TARGET])[0, 0])
        assert a.deletion[r, 0] == pytest.approx(scorer.probabilities(~keep, [TARGET])[0, 0])
    assert a.scorer_name == "analytic-random" and a.partition_method == "grid(3x3)"


def _same(a: object, b: object) -> None:
    assert a.order.tolist() == b.order.tolist()  # type: ignore[attr-defined]
    np.testing.assert_array_equal(a.insertion, b.insertion)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(a.deletion, b.deletion)  # type: ignore[attr-defined]
    assert a.forward_passes == b.forward_passes  # type: ignore[attr-defined]
    assert a.compact_set == b.compact_set  # type: ignore[attr-defined]
    assert a.stopped_by == b.stopped_by  # type: ignore[attr-defined]


@pytest.mark.parametrize("strategy", ["exact", "budgeted", "efficient"])
@pytest.mark.parametrize("pairs", [0, 16])
def test_batch_size_never_changes_an_attribution(strategy: str, pairs: int) -> None:
    scorer = AnalyticScorer.random(64, 11, interactions=pairs)
    image, partition = _setup(64)
    results = []
    for batch_size in (1, 2, 7, 64):
        budget = (
            SearchBudget.exhaustive(batch_size=batch_size)
            if strategy == "exact"
            else SearchBudget(max_forward_passes=416, batch_size=batch_size)
        )
        search = EagleSearch(scorer, budget, strategy=strategy)  # type: ignore[arg-type]
        results.append(search.attribute(image, partition, [TARGET]))
    for other in results[1:]:
        _same(results[0], other)


@settings(max_examples=80, deadline=None)
@given(
    n=st.sampled_from([4, 9, 16, 64]),
    seed=st.integers(0, 1000),
    share=st.floats(0.0, 1.0),
    batch_size=st.integers(1, 40),
    strategy=st.sampled_from(["budgeted", "efficient"]),
)
def test_budget_is_never_exceeded(
    n: int, seed: int, share: float, batch_size: int, strategy: str
) -> None:
    scorer = AnalyticScorer.random(n, seed, interactions=2)
    image, partition = _setup(n)
    limit = max(2, int(share * exact_search_passes(n)))
    budget = SearchBudget(max_forward_passes=limit, batch_size=batch_size)
    a = EagleSearch(scorer, budget, strategy=strategy).attribute(image, partition, [TARGET])  # type: ignore[arg-type]
    assert a.forward_passes <= limit
    assert sorted(a.order.tolist()) == list(range(n))
    assert len(a.compact_set) >= 1
    if a.stopped_by is StopReason.FORWARD_BUDGET:
        # a one-sided step keeps one pass back for the chosen region's other image
        assert a.forward_passes >= limit - 1
    assert a.p_full.shape == a.p_blank.shape == (1,)


class _TickingScorer:
    """An analytic scorer whose every call advances a fake clock by one second."""

    def __init__(self, inner: AnalyticScorer) -> None:
        self.inner, self.now, self.calls = inner, 0.0, 0
        self.name, self.max_batch_size = "ticking", 1000

    def clock(self) -> float:
        return self.now

    def score(self, batch: MaskedBatch, targets: Sequence[Target]) -> np.ndarray:
        self.calls += 1
        self.now += 1.0
        return self.inner.score(batch, targets)


@pytest.mark.parametrize("max_seconds", [2.5, 5.5, 9.0])
def test_time_budget_is_honoured_within_one_batch(max_seconds: float) -> None:
    scorer = _TickingScorer(AnalyticScorer.random(64, 5, interactions=8))
    image, partition = _setup(64)
    budget = SearchBudget(max_seconds=max_seconds, batch_size=4)
    a = EagleSearch(scorer, budget, clock=scorer.clock).attribute(image, partition, [TARGET])
    assert a.stopped_by is StopReason.TIME_BUDGET
    # the deadline is checked before every batch: at most one batch starts after it
    assert max_seconds <= a.seconds <= max_seconds + 1.0
    assert sorted(a.order.tolist()) == list(range(64))


def test_max_regions_limits_the_refined_prefix() -> None:
    case = analytic_case("grounded", 16)
    image, partition = _setup(16)
    budget = SearchBudget(max_forward_passes=200, max_regions=2)
    a = EagleSearch(case.scorer, budget).attribute(image, partition, case.targets)
    assert a.stopped_by is StopReason.MAX_REGIONS
    assert len(a.scored_prefixes) == 2 + 2  # blank, 1, 2 and the full image


@pytest.mark.parametrize("name", ["grounded", "conjunctive"])
def test_budgeted_search_finds_the_evidence_cheaply(name: str) -> None:
    case = analytic_case(name, 64, seed=2)
    image, partition = _setup(64)
    a = EagleSearch(case.scorer, SearchBudget.fraction_of_exact(64, 0.10)).attribute(
        image, partition, case.targets
    )
    assert set(a.compact_set) == case.evidence[0]
    assert a.stopped_by is StopReason.CONVERGED
    assert a.forward_passes <= 416


def _response_scorer(
    bias: float,
    weights: dict[int, float],
    pairs: tuple[tuple[int, int, float], ...] = (),
    noise: float = 0.05,
) -> AnalyticScorer:
    w = np.random.default_rng(0).normal(0.0, noise, 64)
    for region, value in weights.items():
        w[region] = value
    return AnalyticScorer({0: TokenResponse(bias=bias, weights=w, interactions=tuple(pairs))})


def test_budgeted_search_finds_evidence_that_only_a_pair_of_regions_carries() -> None:
    # Removing region 3 or 7 kills the token; neither adds anything on its own, together they
    # make it: screening sees no second region, so the search measures the whole pool once.
    scorer = _response_scorer(-2.0, {3: -2.0, 7: -2.0}, ((3, 7, 9.0),), noise=0.5)
    image, partition = _setup(64)
    budget = SearchBudget.fraction_of_exact(64, 0.10)
    a = EagleSearch(scorer, budget).attribute(image, partition, [TARGET])
    assert {3, 7} <= set(a.compact_set) and len(a.compact_set) <= 3
    assert a.stopped_by is StopReason.CONVERGED
    assert a.forward_passes <= budget.max_forward_passes  # type: ignore[operator]


def test_counter_evidence_goes_last_when_the_search_stops_early() -> None:
    # Region 5 carries the token.  Region 2 alone raises it (the knife that makes "fork"
    # likely on an empty table) but next to region 5 it argues against it: removing it from
    # the original raises the token.  Region 1 argues against it everywhere, less strongly.
    # The surrogate, extrapolating region 2's increment from its screening on the blank image,
    # would rank it high; the end of the ordering comes from the screening's measurements
    # instead, the strongest counter-evidence last.  That is what a correction removes first
    # (EAGLE.md section 8).
    scorer = _response_scorer(-3.0, {5: 8.0, 2: 1.0, 1: -0.25}, ((2, 5, -3.0),), noise=0.0)
    image, partition = _setup(64)
    budget = SearchBudget.fraction_of_exact(64, 0.10)
    a = EagleSearch(scorer, budget).attribute(image, partition, [TARGET])
    assert a.stopped_by is StopReason.CONVERGED
    assert a.compact_set == (5,)
    assert a.order[-2:].tolist() == [1, 2]


def test_the_end_of_the_ordering_is_measured_by_removing_counter_evidence_in_context() -> None:
    # "no" to "Is there a fork?": region 5 carries it.  The knife, regions 10 and 11, argues
    # for "yes" and each piece stands in for the other: removing either alone barely moves
    # the token, removing both raises it by 4 logits.  Region 30 argues against it most on the
    # blank image but not beside region 5 (removing it from the original changes nothing).
    # Ranked on the screening alone, 30 went last and the knife's second piece before it;
    # removed in context from the back, the knife is the end of the ordering, as a
    # correction needs (EAGLE.md section 8: the answer flips once both pieces are gone).
    weights = {5: 6.0, 10: -4.2, 11: -4.0, 30: -5.0}
    pairs = ((10, 11, 4.0), (5, 30, 5.0))
    scorer = _response_scorer(-1.0, weights, pairs, noise=0.0)
    image, partition = _setup(64)
    budget = SearchBudget.fraction_of_exact(64, 0.10)
    a = EagleSearch(scorer, budget).attribute(image, partition, [TARGET])
    assert a.stopped_by is StopReason.CONVERGED and a.compact_set == (5,)
    assert a.order[-2:].tolist() == [11, 10]
    # the measured points: the token with the last one and the last two regions removed
    keep = np.ones((2, 64), dtype=np.bool_)
    keep[0, 10] = False
    keep[1, [10, 11]] = False
    measured = scorer.probabilities(keep, [TARGET])
    assert np.allclose(a.insertion[[63, 62], 0], measured[:, 0])
    assert measured[0, 0] < 0.75 < 0.99 < measured[1, 0]  # the second piece flips it
    # an audit does not measure it (verdicts never read the end of the ordering): the end
    # from the screening alone, for no pass
    screened = EagleSearch(scorer, budget, tail_steps=0).attribute(image, partition, [TARGET])
    assert screened.order[-2:].tolist() == [10, 30]
    assert screened.compact_set == a.compact_set
    assert screened.forward_passes < a.forward_passes <= screened.forward_passes + 3 * 8


def _objective_area(scorer: AnalyticScorer, order: np.ndarray) -> float:
    image, partition = _setup(order.size)
    return objective_area(*order_curves(scorer, image, partition, order, [TARGET]))


def test_budgeted_full_ordering_matches_the_exact_search_at_a_tenth_of_its_cost() -> None:
    image, partition = _setup(64)
    budget = SearchBudget.fraction_of_exact(64, 0.10)
    attainments = []
    for seed in range(12):
        scorer = AnalyticScorer.random(64, seed, interactions=16)
        exact = EagleSearch(scorer, SearchBudget.exhaustive(batch_size=256))
        ours = EagleSearch(scorer, budget, stop_when_converged=False)
        a = ours.attribute(image, partition, [TARGET])
        assert a.forward_passes <= 416
        rng = np.random.default_rng(seed)
        random = np.mean([_objective_area(scorer, rng.permutation(64)) for _ in range(4)])
        span = _objective_area(scorer, exact.attribute(image, partition, [TARGET]).order) - random
        attainments.append((_objective_area(scorer, a.order) - random) / span)
        # the tail was measured, not guessed: the model's probability with only the last
        # regions visible
        assert 63 in a.scored_prefixes
        keep = np.zeros((1, 64), dtype=np.bool_)
        keep[0, a.order[63:]] = True
        assert a.deletion[63, 0] == pytest.approx(scorer.probabilities(keep, [TARGET])[0, 0])
    assert min(attainments) >= 0.95
    assert np.mean(attainments) >= 1.0


def test_attribute_each_shares_forward_passes() -> None:
    case = analytic_case("borrowed_evidence", 16)
    image, partition = _setup(16)
    search = EagleSearch(case.scorer, SearchBudget(max_forward_passes=120))
    knife, fork = search.attribute_each(image, partition, case.targets)
    alone = search.attribute(image, partition, case.targets[1:])
    assert [t.text for t in knife.targets] == ["knife"] and [t.text for t in fork.targets] == [
        "fork"
    ]
    assert fork.forward_passes < alone.forward_passes  # anchors and screening were paid once
    assert fork.order.tolist() == alone.order.tolist()


class _BrokenScorer:
    name, max_batch_size = "broken", 8

    def __init__(self, output: str) -> None:
        self.output = output

    def score(self, batch: MaskedBatch, targets: Sequence[Target]) -> np.ndarray:
        b = batch.size
        if self.output == "shape":
            return np.zeros((b + 1, len(targets)))
        if self.output == "nan":
            return np.full((b, len(targets)), np.nan)
        if self.output == "range":
            return np.full((b, len(targets)), 1.5)
        return [[0.5]] * b  # type: ignore[return-value]


@pytest.mark.parametrize(
    "output, message",
    [("shape", "shape"), ("nan", "non-finite"), ("range", r"\[0, 1\]"), ("list", "numpy array")],
)
def test_scorer_contract_violations_are_reported(output: str, message: str) -> None:
    image, partition = _setup(4)
    with pytest.raises(ScorerContractError, match=message):
        EagleSearch(_BrokenScorer(output)).attribute(image, partition, [TARGET])


def test_bad_search_arguments() -> None:
    scorer = AnalyticScorer.random(4, 0)
    image, partition = _setup(4)
    with pytest.raises(InvalidTargetError, match="at least one"):
        EagleSearch(scorer).attribute(image, partition, [])
    with pytest.raises(InvalidTargetError, match="distinct positions"):
        EagleSearch(scorer).attribute(image, partition, [TARGET, TARGET])
    with pytest.raises(ValueError, match="weights"):
        EagleSearch(scorer, weights=(1.0, -1.0))
    with pytest.raises(ValueError, match="strategy"):
        EagleSearch(scorer, strategy="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be positive, got: 0"):
        SearchBudget(batch_size=0)
    with pytest.raises(ValueError, match="at least 2"):
        SearchBudget(max_forward_passes=1)
    with pytest.raises(InvalidTargetError, match="position must be >= 0"):
        Target(position=-1, token_id=3)


def test_progress_bar_counts_passes(capsys: pytest.CaptureFixture[str]) -> None:
    scorer = AnalyticScorer.random(4, 0)
    image, partition = _setup(4)
    EagleSearch(scorer, progress=True).attribute(image, partition, [TARGET])
    assert "20/20" in capsys.readouterr().err
