"""`Supervisor`: runs audit workers and the scheduler as child processes and restarts them.

`guardrail serve` and `guardrail worker` never run an audit in their own process.  Each child is
started with multiprocessing's `spawn` (a fresh interpreter: no fork of a process holding
threads, locks or a CUDA context); when one dies (segfault in native code, the OOM killer,
`kill -9`) the supervisor logs how, counts `guardrail_worker_restarts_total{kind}` and starts a
new one after an exponential backoff (reset once a child has lived `healthy_seconds`).  Children
send snapshots of their counters and histograms over a pipe; they are merged into this
process's `/metrics` (`Metrics.children`).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from guardrail.service.children import child_main, threads_per_child
from guardrail.service.metrics import Metrics

__all__ = ["Supervisor"]

log = logging.getLogger("guardrail.supervisor")


@dataclass
class _Slot:
    kind: str
    index: int
    generation: int = 0
    process: Any = None
    reader: Connection | None = None
    started: float = 0.0
    failures: int = 0  # consecutive early deaths, for the backoff
    restart_at: float | None = None
    restarts: int = 0
    heard: float = 0.0  # when the child last sent a snapshot

    @property
    def child_id(self) -> str:
        return f"{self.kind}-{self.index}.{self.generation}"


@dataclass
class Supervisor:
    """Keeps `workers` audit processes (and the scheduler when `scheduler`) running."""

    settings: Any
    metrics: Metrics
    workers: int
    scheduler: bool = False
    grace_seconds: float = 30.0
    max_backoff_seconds: float = 60.0
    healthy_seconds: float = 60.0
    # a child sends a snapshot every second from its main thread: one silent this long is hung
    # (SIGSTOP, a deadlock, swapping) and is killed, then restarted like any dead child
    silent_seconds: float = 60.0
    cores: int | None = None
    _slots: list[_Slot] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be zero or more, got: {self.workers}")
        self._context = multiprocessing.get_context("spawn")
        cores = self.cores if self.cores is not None else multiprocessing.cpu_count()
        self.threads = threads_per_child(cores, self.workers)
        self._slots = [_Slot("worker", i) for i in range(self.workers)]
        if self.scheduler:
            self._slots.append(_Slot("scheduler", 0))

    def start(self) -> None:
        for slot in self._slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def alive(self) -> dict[str, int]:
        """Running children by kind."""
        with self._lock:
            out: dict[str, int] = {}
            for slot in self._slots:
                running = slot.process is not None and slot.process.is_alive()
                out[slot.kind] = out.get(slot.kind, 0) + int(running)
            return out

    def stop(self) -> None:
        """SIGTERM every child, wait up to the grace period (plus a margin for the last
        snapshot), then SIGKILL what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            running = [s for s in self._slots if s.process is not None and s.process.is_alive()]
            for slot in running:
                slot.process.terminate()
        deadline = time.monotonic() + self.grace_seconds + 5
        for slot in running:
            slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                log.warning("%s did not stop in time: killing it", slot.child_id)
                slot.process.kill()
                slot.process.join(timeout=5)
        for slot in self._slots:
            self._drain(slot)
            self.metrics.children.retire(slot.child_id)
            if slot.reader is not None:
                slot.reader.close()
                slot.reader = None

    def _spawn(self, slot: _Slot) -> None:
        reader, writer = self._context.Pipe(duplex=False)
        slot.generation += 1
        process = self._context.Process(
            target=child_main,
            args=(slot.kind, self.settings, writer),
            kwargs={"threads": self.threads, "grace_seconds": self.grace_seconds},
            name=f"guardrail-{slot.child_id}",
            daemon=False,
        )
        process.start()
        writer.close()  # the child holds the only writing end: EOF when it dies
        with self._lock:
            slot.process, slot.reader = process, reader
            slot.started, slot.restart_at = time.monotonic(), None
            slot.heard = slot.started
        log.info("started %s (pid %s)", slot.child_id, process.pid)

    def _drain(self, slot: _Slot) -> None:
        reader = slot.reader
        try:
            while reader is not None and reader.poll():
                self.metrics.children.update(slot.child_id, reader.recv())
                slot.heard = time.monotonic()
        except (EOFError, OSError):
            pass

    def _watch(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                waitables: list[Any] = []
                for slot in self._slots:
                    if slot.process is not None:
                        waitables.append(slot.process.sentinel)
                        if slot.reader is not None:
                            waitables.append(slot.reader)
            ready = wait(waitables, timeout=0.5) if waitables else []
            if not waitables:
                self._stop.wait(0.5)
            if self._stop.is_set():
                return
            for slot in self._slots:
                if slot.reader is not None and slot.reader in ready:
                    self._drain(slot)
                if slot.process is not None and not slot.process.is_alive():
                    self._died(slot)
                elif slot.process is not None and self._silent(slot):
                    log.warning(
                        "%s (pid %s) sent nothing for %.0f s: killing it as hung",
                        slot.child_id,
                        slot.process.pid,
                        time.monotonic() - slot.heard,
                    )
                    slot.process.kill()  # SIGKILL works on a stopped process too
                due = slot.restart_at is not None and time.monotonic() >= slot.restart_at
                if slot.process is None and due:
                    slot.restarts += 1
                    self.metrics.worker_restarts.labels(kind=slot.kind).inc()
                    self._spawn(slot)

    def _silent(self, slot: _Slot) -> bool:
        # a child loading its model sends nothing yet: give it the silence budget twice
        started_long_ago = time.monotonic() - slot.started > 2 * self.silent_seconds
        return started_long_ago and time.monotonic() - slot.heard > self.silent_seconds

    def _died(self, slot: _Slot) -> None:
        self._drain(slot)
        code = slot.process.exitcode
        how = (
            f"killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exited with status {code}"
        )
        lived = time.monotonic() - slot.started
        slot.failures = 0 if lived >= self.healthy_seconds else slot.failures + 1
        delay = min(self.max_backoff_seconds, 2.0 ** max(0, slot.failures - 1))
        log.warning(
            "%s (pid %s) %s after %.1f s: restarting in %.0f s",
            slot.child_id,
            slot.process.pid,
            how,
            lived,
            delay,
        )
        self.metrics.children.retire(slot.child_id)
        if slot.reader is not None:
            slot.reader.close()
        with self._lock:
            slot.process, slot.reader = None, None
            slot.restart_at = time.monotonic() + delay
