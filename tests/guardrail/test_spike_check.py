"""The spike check's rules at their boundaries, with the clock passed in.

Each test sets the numbers so that exactly one rule decides: the threshold (strict, with its
floor), the minimum traffic (inclusive), the two windows' bounds (start included, end
excluded), the top objects, and the hysteresis (against the threshold stored when the alert
fired, strict).  No webhook is configured: delivery is tested in `test_scheduler.py`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from guardrail.config import load_settings
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.scheduler import check_spikes
from storage.engine import upgrade
from storage.models import Alert, Report
from tests.guardrail.test_scheduler import _audited

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
US = timedelta(microseconds=1)
G, LP = "grounded", "language_prior"


def _runtime(tmp_path: Path, **overrides: Any) -> Runtime:
    """A deployment on SQLite whose spike check fires on one word (unless overridden)."""
    settings = {"spike_min_tokens": 1, "spike_floor": 0.25, "spike_ratio": 2.0} | overrides
    runtime = build_runtime(
        load_settings(environ={}, database_url=f"sqlite:///{tmp_path / 'g.db'}", **settings)
    )
    upgrade(runtime.engine)
    return runtime


def _alerts(runtime: Runtime) -> list[Alert]:
    with runtime.sessions() as session:
        return list(session.query(Alert).order_by(Alert.id))


def _at(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


def test_a_rate_equal_to_the_floor_is_quiet_and_one_above_fires(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)  # no baseline: the threshold is the floor, 25%
    _audited(runtime, NOW - MINUTE, [LP, G, G, G])
    assert check_spikes(runtime, NOW) == []
    _audited(runtime, NOW - 2 * MINUTE, [LP])  # 2 of 5: 40%
    (fired,) = check_spikes(runtime, NOW)
    assert (fired.model, fired.state, _at(fired.started_at)) == ("reference", "firing", NOW)
    assert (fired.rate, fired.baseline, fired.tokens) == (0.4, 0.0, 5)
    (alert,) = _alerts(runtime)
    assert alert.details["threshold"] == 0.25
    assert (alert.details["window_minutes"], alert.details["baseline_hours"]) == (10.0, 6.0)
    assert alert.details["top_objects"] == [["spoon", 2]]


def test_too_little_traffic_never_fires_and_the_minimum_is_inclusive(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, spike_min_tokens=5)
    _audited(runtime, NOW - MINUTE, [LP] * 4)
    assert check_spikes(runtime, NOW) == []  # 100%, but 4 words
    _audited(runtime, NOW - MINUTE, [G])
    assert [a.tokens for a in check_spikes(runtime, NOW)] == [5]


def test_the_windows_include_their_start_and_exclude_their_end(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, spike_floor=0.1)
    start, base_start = NOW - 10 * MINUTE, NOW - timedelta(hours=6)
    _audited(runtime, NOW, [G] * 8)  # not yet in the short window
    _audited(runtime, start, [LP, LP])  # the short window's first instant
    _audited(runtime, start - US, [G] * 4)  # the baseline's last instant
    _audited(runtime, base_start, [LP, G, G, G])  # the baseline's first instant
    _audited(runtime, base_start - US, [LP] * 8)  # before the baseline
    (fired,) = check_spikes(runtime, NOW)
    # short: 2 words at 100%; baseline: 1 of 8; threshold max(2 x 1/8, 0.1) = 1/4
    assert (fired.tokens, fired.rate, fired.baseline) == (2, 1.0, 0.125)
    (alert,) = _alerts(runtime)
    assert alert.details["threshold"] == 0.25
    assert alert.details["top_objects"] == [["spoon", 2]]  # from the window's first instant


def test_the_baseline_raises_the_threshold_above_the_floor(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    _audited(runtime, NOW - timedelta(hours=1), [LP, LP, G, G, G, G, G, G])  # 25%
    _audited(runtime, NOW - MINUTE, [LP, LP, LP, G, G, G, G, G])  # 37.5%: above the floor
    assert check_spikes(runtime, NOW) == []  # ... but not above 2 x 25%
    _audited(runtime, NOW - MINUTE, [LP] * 8)  # 11 of 16: 68.75%
    (fired,) = check_spikes(runtime, NOW)
    assert (fired.rate, fired.baseline) == (0.6875, 0.25)
    assert _alerts(runtime)[0].details["threshold"] == 0.5


def test_top_objects_are_the_five_most_hallucinated_in_the_window(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    for word, n in (("cup", 6), ("fork", 5), ("knife", 4), ("plate", 3), ("bowl", 2), ("jar", 1)):
        _audited(runtime, NOW - MINUTE, [LP] * n, word=word)
    _audited(runtime, NOW - MINUTE, [G] * 9, word="table")  # grounded: not an object of it
    _audited(runtime, NOW - timedelta(hours=7), [LP] * 9, word="chair")  # before the window
    _audited(runtime, NOW - MINUTE, [LP] * 9, word="vase", model="other")  # another model
    (fired,) = check_spikes(runtime, NOW)
    assert fired.model == "reference"
    assert _alerts(runtime)[0].details["top_objects"] == [
        ["cup", 6],
        ["fork", 5],
        ["knife", 4],
        ["plate", 3],
        ["bowl", 2],
    ]


def test_an_alert_fires_once_and_resolves_below_a_fraction_of_its_own_threshold(
    tmp_path: Path,
) -> None:
    runtime = _runtime(tmp_path, spike_resolve_fraction=0.5)
    _audited(runtime, NOW - MINUTE, [LP] * 4 + [G] * 4)  # 50% over the 25% floor
    assert [a.state for a in check_spikes(runtime, NOW)] == ["firing"]
    assert check_spikes(runtime, NOW + MINUTE) == []  # still firing: not fired again
    # 20 minutes on, the spike has become the baseline (threshold now 2 x 50% = 100%, half of
    # it 50%); the alert's own threshold (25%) decides: 1/8 = 12.5% is not below half of it
    later = NOW + 20 * MINUTE
    _audited(runtime, later - MINUTE, [LP] + [G] * 7)
    assert check_spikes(runtime, later) == []
    assert _alerts(runtime)[0].state == "firing"
    # another 20 minutes with no traffic at all: a rate of 0, below 12.5%
    calm = later + 20 * MINUTE
    (resolved,) = check_spikes(runtime, calm)
    assert resolved.state == "resolved" and _at(resolved.resolved_at) == calm
    (alert,) = _alerts(runtime)
    assert (alert.state, _at(alert.resolved_at)) == ("resolved", calm)
    assert check_spikes(runtime, calm + MINUTE) == []


def test_a_rate_just_under_the_resolve_line_resolves(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, spike_resolve_fraction=0.5, spike_floor=0.5)
    _audited(runtime, NOW - MINUTE, [LP] * 4)
    assert [a.state for a in check_spikes(runtime, NOW)] == ["firing"]  # threshold 50%
    later = NOW + 20 * MINUTE  # baseline 100% now: only the stored threshold is reachable
    _audited(runtime, later - MINUTE, [LP] + [G] * 3)  # 25%: equal to half of 50%
    assert check_spikes(runtime, later) == []
    _audited(runtime, later - MINUTE, [G])  # 1 of 5: 20%
    assert [a.state for a in check_spikes(runtime, later)] == ["resolved"]


def test_another_models_spike_does_not_page_this_one(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    _audited(runtime, NOW - MINUTE, [LP, G, G, G, G, G, G, G])  # 12.5%: quiet
    _audited(runtime, NOW - MINUTE, [LP] * 8, model="other")  # not a model of this deployment
    assert check_spikes(runtime, NOW) == []


def test_each_model_has_its_own_alert(tmp_path: Path) -> None:
    reference = load_settings(environ={}).models[0]
    second = reference.model_copy(update={"name": "second"})
    runtime = _runtime(tmp_path, models=[reference, second])
    _audited(runtime, NOW - MINUTE, [LP] * 4)
    assert [a.model for a in check_spikes(runtime, NOW)] == ["reference"]
    _audited(runtime, NOW - MINUTE, [LP] * 4, model="second")  # the first one still firing
    assert [a.model for a in check_spikes(runtime, NOW)] == ["second"]
    assert [(a.model, a.state) for a in _alerts(runtime)] == [
        ("reference", "firing"),
        ("second", "firing"),
    ]


def test_a_firing_alert_links_a_report_of_the_spike(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    _audited(runtime, NOW - MINUTE, [LP] * 4)
    check_spikes(runtime, NOW)
    (alert,) = _alerts(runtime)
    with runtime.sessions() as session:
        report = session.get(Report, alert.details["report_id"])
        assert report is not None and report.kind == "spike"


@pytest.fixture()
def honolulu() -> Iterator[None]:
    """The machine's local time zone ten hours behind UTC (no daylight saving)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Pacific/Honolulu"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.usefixtures("honolulu")
def test_without_a_clock_the_check_reads_utc_whatever_the_local_zone(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    _audited(runtime, datetime.now(UTC) - MINUTE, [LP] * 4)
    assert [a.state for a in check_spikes(runtime)] == ["firing"]
