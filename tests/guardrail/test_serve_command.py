"""`guardrail serve` checks its port before starting anything slow, and merges its children's
metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from guardrail.service.metrics import ChildSnapshots, Metrics, snapshot
from storage.engine import make_engine, upgrade


def test_a_port_in_use_is_a_one_line_error_before_anything_loads(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    upgrade(make_engine(url))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "guardrail", "serve", "--port", str(port)],
            env={**os.environ, "GUARDRAIL_DATABASE_URL": url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert seconds < 30  # no model was loaded, no child started


def test_child_counters_are_merged_and_survive_a_restart() -> None:
    parent = Metrics.create()
    parent.samples_received.labels(model="m").inc(3)
    child = Metrics.create()
    child.audits.labels(model="m").inc(2)
    child.audit_duration.labels(model="m").observe(0.3)
    snapshots = parent.children
    assert isinstance(snapshots, ChildSnapshots)
    snapshots.update("worker-0.1", snapshot(child.registry))
    snapshots.retire("worker-0.1")  # it died: its totals stay
    restarted = Metrics.create()
    restarted.audits.labels(model="m").inc(1)
    snapshots.update("worker-0.2", snapshot(restarted.registry))
    text = parent.exposition().decode()
    assert 'guardrail_samples_received_total{model="m"} 3.0' in text
    assert 'guardrail_audits_total{model="m"} 3.0' in text  # 2 before the restart + 1 after
    assert 'guardrail_audit_duration_seconds_count{model="m"} 1.0' in text
    assert 'guardrail_audit_duration_seconds_bucket{le="0.5",model="m"} 1.0' in text
    assert text.count("# TYPE guardrail_audits_total counter") == 1
    snapshots.update("worker-0.2", snapshot(restarted.registry))  # a newer snapshot replaces
    assert 'guardrail_audits_total{model="m"} 3.0' in parent.exposition().decode()
