"""Which verdict labels count as hallucinations: defined once, on the label type."""

from __future__ import annotations

from detectors.types import VerdictLabel


def test_hallucinated_labels_are_language_prior_and_borrowed_evidence() -> None:
    assert VerdictLabel.hallucinated() == {
        VerdictLabel.LANGUAGE_PRIOR,
        VerdictLabel.BORROWED_EVIDENCE,
    }
    assert [label.is_hallucination for label in VerdictLabel] == [False, True, True, False]
    # stored labels are strings: they convert back to the type before asking
    assert VerdictLabel("borrowed_evidence").is_hallucination
