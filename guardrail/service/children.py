"""What runs inside a supervised child process: an audit worker or the scheduler.

Everything that runs model, partition or heatmap code on client data runs here, never in the
process that serves the API and the proxy: a segfault, an OOM kill or a `kill -9` ends one child,
which the supervisor restarts, and the job it held comes back when its lease expires.

A child stops on SIGTERM (or when its parent dies): it stops claiming, lets the audit in flight
finish within `grace_seconds` or releases its job, sends its last metric snapshot and exits 0
without running the interpreter's teardown (busy torch / ONNX Runtime threads at teardown end in
`terminate called without an active exception`).  SIGINT is ignored: a Ctrl-C in a terminal
reaches the whole process group, and the parent decides when its children stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["child_main", "threads_per_child"]

log = logging.getLogger("guardrail.children")


def threads_per_child(cores: int | None, children: int) -> int:
    """Compute threads per audit process: the cores shared out, at least one (oversubscribed
    threads cost several times their work on a loaded machine)."""
    return max(1, (cores or 1) // max(1, children))


def child_main(
    kind: str,
    settings: Any,
    connection: Any,
    *,
    threads: int,
    grace_seconds: float,
    snapshot_seconds: float = 1.0,
) -> None:
    """Entry point of a child process (multiprocessing, spawn): `kind` is `worker` or
    `scheduler`; metric snapshots go to the parent over `connection`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    from guardrail.logs import configure_logging

    # the parent's format (settings.log_format); one line per event, not per scheduler tick
    configure_logging(settings.log_format)
    parent = os.getppid()
    code = 0
    try:
        code = _run(
            kind, settings, connection, stop, parent, threads, grace_seconds, snapshot_seconds
        )
    except Exception:
        log.exception("%s process failed", kind)
        code = 1
    finally:
        logging.shutdown()
        with contextlib.suppress(OSError):
            connection.close()
        os._exit(code)


def _run(
    kind: str,
    settings: Any,
    connection: Any,
    stop: threading.Event,
    parent: int,
    threads: int,
    grace_seconds: float,
    snapshot_seconds: float,
) -> int:
    from guardrail.service.metrics import snapshot
    from guardrail.service.runtime import build_runtime

    if kind == "worker" and settings.torch_threads is None:
        settings = settings.model_copy(update={"torch_threads": threads})
    runtime = build_runtime(settings)
    registry = runtime.metrics.registry

    def send() -> bool:
        try:
            connection.send(snapshot(registry))
            return True
        except (OSError, EOFError, BrokenPipeError):  # the parent is gone
            return False

    progress: list[Callable[[], int]] = [lambda: 0]
    lock = threading.Lock()  # one pickle on the pipe at a time

    def report() -> None:
        """Until stopped: a snapshot every `snapshot_seconds` (the supervisor's sign of life,
        sent while a model loads too), and at once when `progress` moves (a job finished), so
        the parent's /metrics trails the database by < 0.1 s."""
        last, seen = 0.0, progress[0]()
        while not stop.wait(0.05):
            if os.getppid() != parent:  # orphaned: the supervisor died
                log.warning("%s process: the parent died; stopping", kind)
                stop.set()
                break
            now, done = time.monotonic(), progress[0]()
            if now - last >= snapshot_seconds or done != seen:
                last, seen = now, done
                with lock:
                    if not send():
                        stop.set()

    reporter = threading.Thread(target=report, name="reporter", daemon=True)
    reporter.start()

    def wait() -> None:
        stop.wait()
        reporter.join(timeout=5)

    if kind == "scheduler":
        from guardrail.service.scheduler import Scheduler

        scheduler = Scheduler(runtime)
        scheduler.start()
        wait()
        scheduler.stop()
        send()
        return 0
    if kind != "worker":
        raise ValueError(f"unknown child kind {kind!r}: expected worker or scheduler")
    from transformers.utils import logging as transformers_logging

    from guardrail.service.otel import build_exporter
    from guardrail.service.worker import Worker

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no tqdm bars in the service's logs
    for auditor in runtime.auditors.values():
        auditor.load()
        if stop.is_set():
            return 0
    exporter = build_exporter(settings, runtime.metrics)  # None unless otel_endpoint is set
    worker = Worker(
        runtime.sessions,
        runtime.auditors,
        runtime.metrics,
        lease_seconds=settings.lease_seconds,
        exporter=exporter,
    )
    thread = threading.Thread(target=worker.run, name=f"worker-{worker.owner}")
    progress[0] = lambda: worker.jobs_done
    thread.start()
    wait()
    worker.stop.set()
    thread.join(timeout=grace_seconds)
    if thread.is_alive():  # the audit outlasts the grace period: give its job back
        try:
            worker.release_current()
        except Exception:
            log.exception("worker %s: could not release its job (its lease will)", worker.owner)
        from storage import queue

        with contextlib.suppress(Exception), runtime.sessions.begin() as session:
            queue.forget_worker(session, worker.owner)
    if exporter is not None:  # verdicts still queued go out (within otel_timeout_seconds)
        exporter.shutdown()
    send()
    return 0
