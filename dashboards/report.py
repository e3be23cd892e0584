"""Rendering an audit report: a self-contained HTML page (Jinja2) with its figures embedded as
PNG.  Takes the data `guardrail.service.reports.gather_report` produces; opens no database."""

from __future__ import annotations

import base64
import io
from datetime import datetime
from pathlib import Path
from typing import Any

from detectors.types import VerdictLabel

__all__ = ["figures", "render_report"]

TEMPLATES = Path(__file__).with_name("templates")


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def figures(data: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs: rate over time, verdict mix, top language-prior objects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 4.6), sharex=True)
    width = 0.8 * float(data.get("bucket_seconds", 3600)) / 86400  # matplotlib dates are days
    for model, points in data["rate_over_time"].items():
        times = [datetime.fromisoformat(p["start"]) for p in points]
        ax1.plot(times, [p["rate"] for p in points], marker="o", label=model)
        ax2.bar(times, [p["audited"] for p in points], width=width, label=model, alpha=0.7)
    ax1.set_ylabel("hallucination rate")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    ax2.set_ylabel("audited words")
    ax2.grid(alpha=0.3)
    if data["rate_over_time"]:
        ax1.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    out["rate_over_time"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3))
    verdicts = data["verdicts"] or {"none": 0}
    colours = {
        VerdictLabel.GROUNDED.value: "#3b8f5a",
        VerdictLabel.LANGUAGE_PRIOR.value: "#d1495b",
        VerdictLabel.BORROWED_EVIDENCE.value: "#edae49",
        VerdictLabel.UNDETERMINED.value: "#8d99ae",
    }
    names = list(verdicts)
    ax.barh(names, [verdicts[n] for n in names], color=[colours.get(n, "#888") for n in names])
    ax.set_xlabel("audited words")
    ax.grid(axis="x", alpha=0.3)
    out["verdict_mix"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3))
    top = data["top_language_prior_objects"] or [["none", 0]]
    ax.barh([t[0] for t in top][::-1], [t[1] for t in top][::-1], color="#d1495b")
    ax.set_xlabel("judged language-prior-driven")
    ax.grid(axis="x", alpha=0.3)
    out["top_objects"] = _png(fig)
    return out


def render_report(data: dict[str, Any], *, title: str = "Audit report") -> str:
    """The report as one self-contained HTML page."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"])
    )
    template = env.get_template("report.html.j2")
    return template.render(title=title, data=data, figures=figures(data))
