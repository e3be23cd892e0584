from __future__ import annotations

import numpy as np

from detectors import EagleSearch, SearchBudget, Target, VerdictLabel, grid_partition, judge_sample
from detectors.scorers import AnalyticScorer, TokenResponse

IMAGE = np.zeros((32, 32, 3), dtype=np.uint8)
PARTITION = grid_partition(IMAGE, 4, 4)
KNIFE, FORK = [1, 2], [9, 10]
KNIFE_T = Target(position=0, token_id=1, text="knife")
FORK_T = Target(position=1, token_id=2, text="fork")


def _scorer(fork_is_drawn: bool) -> AnalyticScorer:
    knife = np.zeros(16)
    knife[KNIFE] = 4.0
    fork = np.zeros(16)
    fork[KNIFE] = 3.0  # seeing a knife makes the model say fork ...
    if fork_is_drawn:
        fork[FORK] = 4.5  # ... and a drawn fork is evidence of its own
    return AnalyticScorer(
        {1: TokenResponse(bias=-4.0, weights=knife), 2: TokenResponse(bias=-4.0, weights=fork)}
    )


def _verdicts(fork_is_drawn: bool):  # type: ignore[no-untyped-def]
    search = EagleSearch(_scorer(fork_is_drawn), SearchBudget(max_forward_passes=150))
    attributions, cross = search.attribute_sample(IMAGE, PARTITION, [KNIFE_T, FORK_T])
    return attributions, cross, judge_sample(attributions, cross=cross)


def test_a_hallucinated_partner_borrows_the_triggers_evidence() -> None:
    attributions, cross, (knife, fork) = _verdicts(fork_is_drawn=False)
    assert set(attributions[0].compact_set) == set(KNIFE)
    # removing the knife's regions collapses the fork; the diagonal is undefined
    assert cross.without_other[1, 0] < 0.1 * fork.p_full
    assert np.isnan(cross.without_other[0, 0])
    assert knife.label is VerdictLabel.GROUNDED
    assert fork.label is VerdictLabel.BORROWED_EVIDENCE and fork.borrowed_from == 0
    assert fork.hallucination_score > 0.8


def test_a_real_partner_next_to_its_trigger_is_grounded() -> None:
    _, cross, (_, fork) = _verdicts(fork_is_drawn=True)
    assert cross.without_other[1, 0] > 0.5 * fork.p_full  # the fork's own pixels remain
    assert fork.label is VerdictLabel.GROUNDED
    assert fork.hallucination_score < 0.3


def test_cross_probes_are_cheap() -> None:
    _, cross, _ = _verdicts(fork_is_drawn=False)
    # one probe per earlier word; j's deletion image comes from the cache
    assert cross.forward_passes <= 2
