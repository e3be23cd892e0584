from __future__ import annotations

from dataclasses import replace

import numpy as np

from detectors import EagleSearch, SearchBudget, Target, VerdictLabel, grid_partition, judge_sample
from detectors.scorers import AnalyticScorer, TokenResponse
from detectors.search.cross import DONOR_COLLAPSE, DONOR_PASSES, cross_evidence
from detectors.types import CrossEvidence, StopReason

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


# A knife of six redundant regions: any three show it.  Under a small budget the search stops
# at a sufficient compact set of three, whose removal leaves the knife (and the fork it lends
# to) standing; the knife's *object* is the longer prefix of its ordering that collapses it.
KNIFE6 = [1, 2, 5, 6, 9, 10]
FORK_OWN = [12, 13]


def _redundant_knife(fork_is_drawn: bool) -> AnalyticScorer:
    knife = np.zeros(16)
    knife[KNIFE6] = 3.0
    fork = np.zeros(16)
    fork[KNIFE6] = 1.5
    if fork_is_drawn:
        fork[FORK_OWN] = 4.5
    return AnalyticScorer(
        {1: TokenResponse(bias=-4.0, weights=knife), 2: TokenResponse(bias=-4.0, weights=fork)}
    )


def _truncated(fork_is_drawn: bool):  # type: ignore[no-untyped-def]
    search = EagleSearch(_redundant_knife(fork_is_drawn), SearchBudget(max_forward_passes=40))
    attributions, cross = search.attribute_sample(IMAGE, PARTITION, [KNIFE_T, FORK_T])
    return attributions, cross


def _without_objects(cross: CrossEvidence) -> CrossEvidence:
    return replace(cross, donor_objects=(), without_donor_object=None, own_only_removed_object=None)


def test_removing_the_donors_object_catches_what_its_compact_set_missed() -> None:
    attributions, cross = _truncated(fork_is_drawn=False)
    knife_attr = attributions[0]
    assert knife_attr.stopped_by is StopReason.FORWARD_BUDGET
    p_knife = float(knife_attr.p_full[0])
    # the compact set is a part of the knife: removing it leaves the knife standing
    assert len(knife_attr.compact_set) < len(KNIFE6)
    assert set(knife_attr.compact_set) <= set(KNIFE6)
    # ... so the old test, which removes only it, judges the fork grounded
    _, fork_before = judge_sample(attributions, cross=_without_objects(cross))
    assert fork_before.label is VerdictLabel.GROUNDED
    # the knife's object: a prefix of its ordering whose removal collapses the knife
    knife_object = cross.donor_objects[0]
    assert knife_object == tuple(int(r) for r in knife_attr.order[: len(knife_object)])
    assert set(knife_object) == set(KNIFE6)
    assert cross.without_donor_object is not None
    assert cross.without_donor_object[0, 0] <= DONOR_COLLAPSE * p_knife
    knife, fork = judge_sample(attributions, cross=cross)
    assert knife.label is VerdictLabel.GROUNDED
    assert fork.label is VerdictLabel.BORROWED_EVIDENCE and fork.borrowed_from == 0
    assert fork.hallucination_score > fork_before.hallucination_score + 0.3


def test_a_real_partner_survives_the_removal_of_the_donors_object() -> None:
    attributions, cross = _truncated(fork_is_drawn=True)
    assert not set(cross.donor_objects[0]) & set(FORK_OWN)
    knife, fork = judge_sample(attributions, cross=cross)
    assert knife.label is VerdictLabel.GROUNDED
    assert fork.label is VerdictLabel.GROUNDED
    assert fork.hallucination_score < 0.3


def test_the_donor_object_search_is_bounded_and_counted() -> None:
    attributions, _ = _truncated(fork_is_drawn=False)
    t = len(attributions)
    search = EagleSearch(_redundant_knife(False), SearchBudget(max_forward_passes=40))

    def probes(max_donor_passes: int) -> CrossEvidence:  # on a cold cache: every mask paid
        evaluator = search._evaluator(IMAGE, PARTITION, [KNIFE_T, FORK_T])
        return cross_evidence(evaluator, attributions, 8, max_donor_passes=max_donor_passes)

    probed, unprobed = probes(DONOR_PASSES), probes(0)
    # without passes to spare the knife's bracket stays open: no object, the old test
    assert unprobed.donor_objects[0] == ()
    assert np.isnan(unprobed.without_donor_object[:, 0]).all()  # type: ignore[index]
    # the donor search costs at most DONOR_PASSES masks per donor and one per pair
    extra = probed.forward_passes - unprobed.forward_passes
    assert 0 < extra <= DONOR_PASSES * t + t * (t - 1)
