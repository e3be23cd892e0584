"""Gathering an audit report's data from the database (rendering lives in `dashboards`)."""

from __future__ import annotations

import base64
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from detectors.saliency import values_from_curve
from detectors.types import VerdictLabel
from storage import reads
from storage.reads import HeatmapSource

__all__ = ["gather_report"]


def _aware(value: datetime, like: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=like.tzinfo)


# Heatmaps are drawn at the size the audit saw (ingest stores images at most the model's input
# size); rows stored before that may hold full-size images and label maps: drawn at most this
# long on their longest side.
HEATMAP_MAX_SIDE = 448


def _heatmap_png(source: HeatmapSource) -> str | None:
    """The word's saliency over the image (when stored) or over a neutral canvas of the same
    regions, as a base64 PNG."""
    from detectors.heatmap import draw
    from detectors.saliency import measured_steps
    from guardrail.service.canonical import AuditResolution, decode_scaled
    from guardrail.service.images import ImageRejectedError, encode_png, image_header, sniff_format

    labels = source.labels
    height, width = labels.shape
    draw_w, draw_h = AuditResolution(longest_edge=HEATMAP_MAX_SIDE).target_size(width, height)
    if (draw_h, draw_w) != labels.shape:  # nearest neighbour: region ids stay ids
        rows = (np.arange(draw_h) * height) // draw_h
        cols = (np.arange(draw_w) * width) // draw_w
        labels = labels[rows[:, None], cols[None, :]]
    curve = source.insertion + (1.0 - source.deletion)
    known = ~np.isnan(curve)
    if not known.any():
        return None
    steps = np.arange(curve.size)
    values = values_from_curve(source.order, np.interp(steps, steps[known], curve[known]))
    base = np.full((*labels.shape, 3), 128, dtype=np.uint8)
    if source.image_data is not None:
        data, stored = source.image_data, None
        try:  # only the image the regions were drawn on (same size), decoded straight to size
            if image_header(data, sniff_format(data)) == (width, height):
                stored = decode_scaled(data, max_side=HEATMAP_MAX_SIDE, max_pixels=40_000_000)
        except ImageRejectedError:  # stored before formats were checked: draw the regions only
            stored = None
        if stored is not None and stored.shape[:2] == labels.shape:
            base = stored
    # the same picture as `guardrail explain`: unmeasured regions washed out, not coloured
    picture = draw(base, labels, values, measured_steps(source.order, curve))
    scale = max(1, 192 // max(picture.shape[:2]))
    picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    return base64.b64encode(encode_png(picture)).decode()


def gather_report(
    session: Session, since: datetime, until: datetime, *, examples: int = 6
) -> dict[str, Any]:
    """Everything the report shows for [since, until), as JSON-able data."""
    samples = reads.report_samples(session, since, until)
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
    worst: list[tuple[float, reads.ReportWord, reads.ReportSample]] = []
    status: Counter[str] = Counter()
    for sample in samples:
        status[sample.status.value] += 1
        received = _aware(sample.received_at, since)
        slot = since + bucket * int((received - since) / bucket)
        for word in sample.words:
            cell = series[sample.model][slot.isoformat()]
            cell[0] += 1
            cell[1] += word.label.is_hallucination
            verdicts[word.label.value] += 1
            if word.label is VerdictLabel.LANGUAGE_PRIOR:
                prior_objects[word.category] += 1
            if word.label is VerdictLabel.BORROWED_EVIDENCE:
                borrowed_objects[word.category] += 1
            if word.forward_passes is not None and word.seconds is not None:
                passes.append(word.forward_passes)
                seconds.append(word.seconds)
                exhausted += bool(word.budget_exhausted)
            if word.label.is_hallucination:
                worst.append((word.hallucination_score, word, sample))
    worst.sort(key=lambda w: -w[0])
    audited = sum(verdicts.values())
    hallucinated = sum(verdicts[label.value] for label in VerdictLabel.hallucinated())

    def heatmap(word: reads.ReportWord) -> str | None:
        source = reads.heatmap_source(session, word.token_pk)
        return None if source is None else _heatmap_png(source)

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
                "output": sample.output,
                "word": word.word,
                "verdict": word.label.value,
                "hallucination_score": score,
                "reason": word.reason,
                "raw_image": sample.raw_image,
                "heatmap_png": heatmap(word),
            }
            for score, word, sample in worst[:examples]
        ],
    }
