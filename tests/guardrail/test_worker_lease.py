"""A worker keeps the lease of a long audit alive, and only a lease that ran out is taken over.

The heartbeat is a real thread extending a real lease: an audit three times longer than its
lease must never be claimed by a second worker meanwhile, and must complete exactly once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from guardrail.service.api import create_app
from guardrail.service.auditor import ModelAuditor
from guardrail.service.worker import Worker
from storage import queue
from storage.models import Job, JobStatus
from tests.guardrail.test_service import AUTH, _body, _runtime, _trap


class _SlowAuditor:
    """The real auditor, made to take `seconds` longer (a long decode on a busy GPU)."""

    def __init__(self, inner: ModelAuditor, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds
        self.settings = inner.settings

    def __getattr__(self, name: str) -> Any:  # everything else is the real auditor's
        return getattr(self.inner, name)

    def audit(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.seconds)
        return self.inner.audit(*args, **kwargs)


def test_the_heartbeat_keeps_a_long_audit_from_being_taken_over(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    client = TestClient(create_app(runtime))
    _, image_b64 = _trap()
    assert client.post("/v1/samples", json=_body(image_b64), headers=AUTH).status_code == 202
    slow = {name: _SlowAuditor(a, 9.0) for name, a in runtime.auditors.items()}
    # a 3 s lease, extended every second: the audit outlives it three times over
    worker = Worker(runtime.sessions, slow, runtime.metrics, lease_seconds=3.0)  # type: ignore[arg-type]
    done = threading.Event()
    worked: list[bool] = []

    def audit_one() -> None:
        try:
            worked.append(worker.run_once())
        finally:
            done.set()

    thread = threading.Thread(target=audit_one, daemon=True)
    thread.start()
    stolen = []
    while not done.wait(0.25):
        with runtime.sessions.begin() as session:
            job = queue.claim(session, "thief", lease_seconds=60)
            if job is not None:
                stolen.append(job.id)
    thread.join()
    assert worked == [True] and stolen == []
    with runtime.sessions.begin() as session:
        jobs = session.query(Job).all()
        assert [(j.status, j.attempts) for j in jobs] == [(JobStatus.DONE, 1)]
