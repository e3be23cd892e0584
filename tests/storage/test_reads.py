"""The read side on SQLite and PostgreSQL: typed rows, window bounds, hallucinated labels."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import Engine

from detectors.types import VerdictLabel
from storage import reads
from storage.engine import session_factory, upgrade
from storage.models import (
    AttributionRecord,
    FlaggedToken,
    Sample,
    SampleStatus,
    VerdictRecord,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _labels_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=np.array([[0, 1], [1, 1]], dtype=np.int32))
    return buffer.getvalue()


def _sample(at: datetime, words: list[tuple[str, VerdictLabel]], *, model: str = "m") -> Sample:
    sample = Sample(
        model=model,
        received_at=at,
        status=SampleStatus.AUDITED,
        image_sha256="0" * 64,
        image_width=2,
        image_height=2,
        generated_text=" ".join(w for w, _ in words),
        token_ids=list(range(len(words))),
        extra={},
    )
    for position, (word, label) in enumerate(words):
        token = FlaggedToken(position=position, token_id=position, word=word, category=word)
        token.verdict = VerdictRecord(
            label=label.value,
            prior_score=0.5,
            hallucination_score=0.1 * (position + 1),
            reason="r",
            numbers={},
        )
        token.attribution = AttributionRecord(
            order=[1, 0],
            insertion=[0.0, None, 1.0],
            deletion=[1.0, 0.5, 0.0],
            compact_set=[1],
            p_full=1.0,
            p_blank=0.0,
            forward_passes=7,
            seconds=0.5,
            stopped_by="forward_budget",
            search="eagle-budgeted",
            scorer_name="s",
            fill="mean",
            partition_method="grid",
            labels_npz=_labels_npz(),
        )
        sample.tokens.append(token)
    return sample


G, LP, BE = VerdictLabel.GROUNDED, VerdictLabel.LANGUAGE_PRIOR, VerdictLabel.BORROWED_EVIDENCE


def test_typed_rows_and_windows(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        session.add(_sample(NOW - timedelta(minutes=10), [("cup", LP), ("fork", G)]))
        session.add(_sample(NOW, [("fork", BE)]))  # the window's end: excluded
        session.add(_sample(NOW - timedelta(minutes=5), [("cup", BE)], model="other"))
    with sessions() as session:
        window = reads.window_counts(session, "m", NOW - timedelta(minutes=10), NOW)
        assert (window.words, window.hallucinated, window.rate) == (2, 1, 0.5)
        everything = reads.window_counts(session, "m", NOW - timedelta(hours=1), NOW + timedelta(1))
        assert (everything.words, everything.hallucinated) == (3, 2)
        top = reads.hallucinated_categories(session, "m", NOW - timedelta(hours=1))
        assert sorted(top) == [("cup", 1), ("fork", 1)]  # a tie: either order
        audits = reads.list_audits(session, model="m")
        assert [(a.word, a.label) for a in audits] == [("fork", BE), ("cup", LP), ("fork", G)]
        assert [a.word for a in reads.list_audits(session, label="borrowed_evidence")] == [
            "fork",
            "cup",
        ]
        assert reads.verdict_counts(session) == {G: 1, LP: 1, BE: 2}
        assert reads.sample_status_counts(session) == {SampleStatus.AUDITED: 3}
        (first, second) = reads.report_samples(session, NOW - timedelta(hours=1), NOW)
        assert first.model == "m" and [w.word for w in first.words] == ["cup", "fork"]
        assert first.words[0].budget_exhausted is True and first.raw_image is False
        assert second.model == "other"
        source = reads.heatmap_source(session, first.words[0].token_pk)
    assert source is not None  # rows outlive their session
    assert source.order.tolist() == [1, 0] and source.labels.tolist() == [[0, 1], [1, 1]]
    assert np.isnan(source.insertion[1]) and source.image_data is None
