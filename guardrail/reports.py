"""Gathering an audit report's data from the database (rendering lives in `dashboards`)."""

from __future__ import annotations

import base64
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from detectors.saliency import values_from_curve
from detectors.types import VerdictLabel
from storage.models import FlaggedToken, Report, Sample
from storage.repositories import label_map

__all__ = ["gather_report", "store_report"]


def _aware(value: datetime, like: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=like.tzinfo)


# Heatmaps are drawn at the size the audit saw (ingest stores images at most the model's input
# size); rows stored before that may hold full-size images and label maps: drawn at most this
# long on their longest side.
HEATMAP_MAX_SIDE = 448


def _heatmap_png(token: FlaggedToken, sample: Sample) -> str | None:
    """The word's saliency over the image (when stored) or over a neutral canvas of the same
    regions, as a base64 PNG."""
    from detectors.heatmap import colorize
    from guardrail.canonical import AuditResolution, decode_scaled
    from guardrail.images import ImageRejectedError, encode_png, image_header, sniff_format

    a = token.attribution
    if a is None:
        return None
    labels = label_map(a)
    height, width = labels.shape
    draw_w, draw_h = AuditResolution(longest_edge=HEATMAP_MAX_SIDE).target_size(width, height)
    if (draw_h, draw_w) != labels.shape:  # nearest neighbour: region ids stay ids
        rows = (np.arange(draw_h) * height) // draw_h
        cols = (np.arange(draw_w) * width) // draw_w
        labels = labels[rows[:, None], cols[None, :]]
    ins = np.array([np.nan if v is None else v for v in a.insertion], dtype=np.float64)
    dele = np.array([np.nan if v is None else v for v in a.deletion], dtype=np.float64)
    curve = ins + (1.0 - dele)
    known = ~np.isnan(curve)
    if not known.any():
        return None
    steps = np.arange(curve.size)
    curve = np.interp(steps, steps[known], curve[known])
    values = values_from_curve(np.asarray(a.order), curve)[labels]
    base = np.full((*labels.shape, 3), 128.0)
    if sample.image_data is not None:
        data, stored = sample.image_data, None
        try:  # only the image the regions were drawn on (same size), decoded straight to size
            if image_header(data, sniff_format(data)) == (width, height):
                stored = decode_scaled(data, max_side=HEATMAP_MAX_SIDE, max_pixels=40_000_000)
        except ImageRejectedError:  # stored before formats were checked: draw the regions only
            stored = None
        if stored is not None and stored.shape[:2] == labels.shape:
            base = stored.astype(np.float64)
    weight = 0.6 * (0.25 + 0.75 * values)[..., None]
    out = (1 - weight) * base + weight * colorize(values).astype(np.float64)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    out[edge] = 0.6 * out[edge] + 0.4 * 255
    picture = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    scale = max(1, 192 // max(picture.shape[:2]))
    picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    return base64.b64encode(encode_png(picture)).decode()


def gather_report(
    session: Session, since: datetime, until: datetime, *, examples: int = 6
) -> dict[str, Any]:
    """Everything the report shows for [since, until), as JSON-able data."""
    query = (
        select(Sample)
        .where(Sample.received_at >= since, Sample.received_at < until)
        .options(
            selectinload(Sample.tokens).selectinload(FlaggedToken.verdict),
            selectinload(Sample.tokens).selectinload(FlaggedToken.attribution),
        )
        .order_by(Sample.received_at)
    )
    samples = list(session.execute(query).scalars())
    span = (until - since).total_seconds()
    if span <= 3 * 3600:
        bucket = timedelta(minutes=1)
    elif span <= 3 * 86400:
        bucket = timedelta(hours=1)
    else:
        bucket = timedelta(days=1)
    series: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    verdicts: Counter[str] = Counter()
    prior_objects: Counter[str] = Counter()
    borrowed_objects: Counter[str] = Counter()
    passes: list[int] = []
    seconds: list[float] = []
    exhausted = 0
    worst: list[tuple[float, FlaggedToken, Sample]] = []
    status: Counter[str] = Counter()
    for sample in samples:
        status[sample.status.value] += 1
        received = _aware(sample.received_at, since)
        slot = since + bucket * int((received - since) / bucket)
        for token in sample.tokens:
            v, a = token.verdict, token.attribution
            if v is None:
                continue
            cell = series[sample.model][slot.isoformat()]
            cell[0] += 1
            label = VerdictLabel(v.label)
            cell[1] += label.is_hallucination
            verdicts[v.label] += 1
            if label is VerdictLabel.LANGUAGE_PRIOR:
                prior_objects[token.category] += 1
            if label is VerdictLabel.BORROWED_EVIDENCE:
                borrowed_objects[token.category] += 1
            if a is not None:
                passes.append(a.forward_passes)
                seconds.append(a.seconds)
                exhausted += a.stopped_by in ("forward_budget", "time_budget")
            if label.is_hallucination:
                worst.append((v.hallucination_score, token, sample))
    worst.sort(key=lambda w: -w[0])
    audited = sum(verdicts.values())
    hallucinated = sum(verdicts[label.value] for label in VerdictLabel.hallucinated())
    return {
        "period": {"since": since.isoformat(), "until": until.isoformat()},
        "bucket_seconds": bucket.total_seconds(),
        "samples": len(samples),
        "sample_status": dict(status),
        "audited_words": audited,
        "hallucination_rate": hallucinated / audited if audited else 0.0,
        "verdicts": dict(verdicts),
        "rate_over_time": {
            model: [
                {"start": start, "audited": n, "hallucinated": h, "rate": h / n if n else 0.0}
                for start, (n, h) in sorted(cells.items())
            ]
            for model, cells in series.items()
        },
        "top_language_prior_objects": prior_objects.most_common(10),
        "top_borrowed_evidence_objects": borrowed_objects.most_common(10),
        "budget": {
            "forward_passes_mean": float(np.mean(passes)) if passes else 0.0,
            "forward_passes_p95": float(np.percentile(passes, 95)) if passes else 0.0,
            "seconds_mean": float(np.mean(seconds)) if seconds else 0.0,
            "budget_exhausted": exhausted,
        },
        "worst_examples": [
            {
                "sample_id": sample.id,
                "model": sample.model,
                "received_at": sample.received_at.isoformat(),
                "output": sample.generated_text,
                "word": token.word,
                "verdict": token.verdict.label if token.verdict else None,
                "hallucination_score": score,
                "reason": token.verdict.reason if token.verdict else "",
                "raw_image": sample.image_data is not None,
                "heatmap_png": _heatmap_png(token, sample),
            }
            for score, token, sample in worst[:examples]
        ],
    }


def store_report(
    session: Session, kind: str, since: datetime, until: datetime, html: str, data: dict[str, Any]
) -> Report:
    """Store (or replace) the report of `kind` for this period: one per period."""
    existing = session.execute(
        select(Report).where(
            Report.kind == kind, Report.period_start == since, Report.period_end == until
        )
    ).scalar_one_or_none()
    if existing is not None:
        existing.html, existing.data = html, data
        session.flush()
        return existing
    report = Report(kind=kind, period_start=since, period_end=until, html=html, data=data)
    session.add(report)
    session.flush()
    return report
