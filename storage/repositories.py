"""Reading and writing samples and audits.  Functions take a session and never commit."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import numpy as np
from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session, selectinload

from detectors.types import Attribution, AuditedWord, Verdict
from storage.models import (
    Alert,
    AttributionRecord,
    FlaggedToken,
    Job,
    JobStatus,
    Report,
    Sample,
    SampleStatus,
    VerdictRecord,
    new_id,
    utcnow,
)

__all__ = [
    "NewSample",
    "add_sample",
    "firing_alert",
    "get_sample",
    "label_map",
    "sample_row",
    "save_audit",
    "store_report",
    "store_samples",
]


def _json(values: Any) -> Any:
    """Arrays and floats as JSON (NaN and inf become None)."""
    array = np.asarray(values, dtype=np.float64)
    out = array.tolist()

    def clean(v: Any) -> Any:
        if isinstance(v, list):
            return [clean(x) for x in v]
        return None if not math.isfinite(v) else v

    return clean(out)


def _npz(labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=labels.astype(np.int32))
    return buffer.getvalue()


def label_map(record: AttributionRecord) -> np.ndarray:
    """The `(H, W)` region label map an attribution was computed on."""
    with np.load(io.BytesIO(record.labels_npz)) as data:
        return np.asarray(data["labels"])


def sample_row(
    *,
    model: str,
    image_sha256: str,
    image_size: tuple[int, int],
    generated_text: str,
    token_ids: Sequence[int] | None,
    request_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    prompt: str | None = None,
    image_data: bytes | None = None,
    response_id: str | None = None,
    traceparent: str | None = None,
    choice_index: int | None = None,
    image_layout: dict[str, Any] | None = None,
    sample_id: str | None = None,
    received_at: datetime | None = None,
) -> dict[str, Any]:
    """The columns of a new, queued sample (`add_sample`'s arguments)."""
    width, height = image_size
    return {
        "id": sample_id or new_id(),
        "model": model,
        "request_id": request_id,
        "response_id": response_id,
        "traceparent": traceparent,
        "choice_index": choice_index,
        "received_at": received_at or utcnow(),
        "status": SampleStatus.QUEUED,
        "image_sha256": image_sha256,
        "image_width": width,
        "image_height": height,
        "image_layout": image_layout,
        "generated_text": generated_text,
        "token_ids": [int(t) for t in token_ids] if token_ids is not None else [],
        "extra": dict(metadata or {}),
        "prompt": prompt,
        "image_data": image_data,
    }


def add_sample(session: Session, *, flush: bool = True, **fields: Any) -> Sample:
    """A new sample from `sample_row`'s arguments (pass `prompt` and `image_data` only when
    the operator stores raw data).

    `sample_id` sets its id instead of a fresh one; `flush=False` leaves the INSERT to the
    session's next flush."""
    sample = Sample(**sample_row(**fields))
    session.add(sample)
    if flush:
        session.flush()
    return sample


@dataclass(frozen=True, slots=True)
class NewSample:
    """A sample and its job, ready to store: `add_sample`'s arguments and the job's."""

    sample: dict[str, Any]
    max_attempts: int
    image_data: bytes
    prompt: str


def store_samples(session: Session, accepted: Sequence[NewSample]) -> list[str]:
    """Add `accepted` samples and their jobs to `session` (two multi-row INSERTs, samples
    first for the jobs' foreign key); their ids, in order.  `GroupCommit`'s write.

    Core INSERTs of plain rows, not ORM objects: nothing here is read back, and the unit of
    work's bookkeeping was a fifth of the serving process's time per accepted sample."""
    ids = [new_id() for _ in accepted]
    now = utcnow()
    samples = [
        sample_row(**one.sample, sample_id=sample_id, received_at=now)
        for sample_id, one in zip(ids, accepted, strict=True)
    ]
    jobs = [
        {
            "sample_id": sample_id,
            "status": JobStatus.QUEUED,
            "attempts": 0,
            "max_attempts": one.max_attempts,
            "run_after": now,
            "image_data": one.image_data,
            "prompt": one.prompt,
            "created_at": now,
        }
        for sample_id, one in zip(ids, accepted, strict=True)
    ]
    session.execute(insert(cast(Table, Sample.__table__)), samples)
    session.execute(insert(cast(Table, Job.__table__)), jobs)
    return ids


def save_audit(
    session: Session,
    sample: Sample,
    *,
    words: Sequence[AuditedWord],
    attributions: Sequence[Attribution],
    verdicts: Sequence[Verdict],
    token_ids: Sequence[int],
    thresholds_id: str,
) -> None:
    """Store the flagged words of `sample` with their attributions and verdicts and mark it
    audited (replacing what an earlier, interrupted attempt may have left).

    Every attribution and verdict is stored with its provenance: the search, its `detectors`
    version and objective weights, the scorer, the rule set and its version, and
    `thresholds_id` (`detectors.calibration.Calibration.id` of the thresholds the verdicts were
    decided with)."""
    for token in list(sample.tokens):
        session.delete(token)
    session.flush()
    sample.token_ids = [int(t) for t in token_ids]
    for word, attribution, verdict in zip(words, attributions, verdicts, strict=True):
        token = FlaggedToken(
            position=word.position,
            token_id=word.token_id,
            word=word.word,
            category=word.category,
        )
        token.attribution = AttributionRecord(
            order=[int(r) for r in attribution.order],
            insertion=_json(attribution.insertion[:, 0]),
            deletion=_json(attribution.deletion[:, 0]),
            compact_set=[int(r) for r in attribution.compact_set],
            p_full=float(attribution.p_full[0]),
            p_blank=float(attribution.p_blank[0]),
            forward_passes=int(attribution.forward_passes),
            seconds=float(attribution.seconds),
            stopped_by=attribution.stopped_by.value,
            search=attribution.search,
            scorer_name=attribution.scorer_name,
            fill=attribution.fill.value,
            partition_method=attribution.partition_method,
            search_version=attribution.version,
            weight_insight=float(attribution.weights[0]),
            weight_necessity=float(attribution.weights[1]),
            labels_npz=_npz(attribution.partition.labels),
        )
        numbers = {
            key: _json(getattr(verdict, key))
            for key in (
                "p_full",
                "p_blank",
                "insight",
                "necessity",
                "relative_drop",
                "perceptual_influence",
            )
        }
        numbers["borrowed_from"] = verdict.borrowed_from
        numbers["compact_set"] = [int(r) for r in verdict.compact_set]
        numbers["detector"] = verdict.detector
        token.verdict = VerdictRecord(
            label=verdict.label.value,
            prior_score=float(_json(verdict.prior_score) or 0.0),
            hallucination_score=float(_json(verdict.hallucination_score) or 0.0),
            reason=verdict.reason,
            numbers=numbers,
            detector=verdict.detector,
            detector_version=verdict.version,
            thresholds_id=thresholds_id,
            scorer_name=attribution.scorer_name,
        )
        sample.tokens.append(token)
    sample.status = SampleStatus.AUDITED
    session.flush()


def get_sample(session: Session, sample_id: str) -> Sample | None:
    query = (
        select(Sample)
        .where(Sample.id == sample_id)
        .options(
            selectinload(Sample.tokens).selectinload(FlaggedToken.verdict),
            selectinload(Sample.tokens).selectinload(FlaggedToken.attribution),
        )
    )
    return session.execute(query).scalar_one_or_none()


def firing_alert(session: Session, model: str) -> Alert | None:
    """`model`'s firing spike alert, to update (resolve) it in this transaction."""
    return session.execute(
        select(Alert).where(Alert.model == model, Alert.state == "firing")
    ).scalar_one_or_none()


def store_report(
    session: Session,
    *,
    kind: str,
    since: datetime,
    until: datetime,
    html: str,
    data: dict[str, Any],
) -> str:
    """Store (or replace) the report of `kind` for [since, until): one per kind and period.
    Returns its id."""
    existing = session.execute(
        select(Report).where(
            Report.kind == kind, Report.period_start == since, Report.period_end == until
        )
    ).scalar_one_or_none()
    if existing is not None:
        existing.html, existing.data = html, data
        session.flush()
        return existing.id
    report = Report(kind=kind, period_start=since, period_end=until, html=html, data=data)
    session.add(report)
    session.flush()
    return report.id
