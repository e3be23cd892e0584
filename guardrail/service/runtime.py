"""`build_runtime`: settings -> the objects the service runs on (one place, explicit)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from guardrail.config import Settings
from guardrail.service.auditor import ModelAuditor
from guardrail.service.decoders import DecoderPool
from guardrail.service.metrics import Metrics
from guardrail.service.sampling import Sampler
from storage.engine import make_engine, session_factory
from storage.group_commit import GroupCommit
from storage.repositories import NewSample, store_samples

__all__ = ["INGEST_THREADS", "Runtime", "build_runtime"]

# threads accepting samples at once (decoding releases the GIL; their commits are grouped)
INGEST_THREADS = 4


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    metrics: Metrics
    auditors: dict[str, ModelAuditor]
    sampler: Sampler
    # ingest: validating, sampling and decoding run in these threads side by side; their
    # writes are committed together by `sample_writer` (one transaction at a time)
    ingest_executor: ThreadPoolExecutor
    sample_writer: GroupCommit[NewSample, str]
    # the child processes that decode sampled images (native code on client data)
    decoders: DecoderPool
    # the proxy's tee: reading answers and fetching image URLs (slow, network-bound) happens
    # here, so that a slow fetch never holds the ingest thread the samples API waits on; each
    # tee hands its samples to `ingest_executor` and waits for them (bounded by the backlog)
    tee_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=4, thread_name_prefix="tee")
    )
    workers: list[object] = field(default_factory=list)  # in-process workers (tests, demo)
    supervisor: Any = None  # guardrail.service.supervisor.Supervisor when audits run in children


def build_runtime(settings: Settings, metrics: Metrics | None = None) -> Runtime:
    url = settings.database_url.get_secret_value()
    engine = make_engine(url)
    # a remote model's request-rate cap is shared out among this command's audit processes
    share = max(1, settings.workers)
    auditors = {
        m.name: ModelAuditor(m, threads=settings.torch_threads, rate_share=share)
        for m in settings.models
    }
    sessions = session_factory(engine)
    metrics = metrics or Metrics.create()
    metrics.start_series([m.name for m in settings.models])
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=sessions,
        metrics=metrics,
        auditors=auditors,
        sampler=Sampler({m.name: m for m in settings.models}),
        ingest_executor=ThreadPoolExecutor(max_workers=INGEST_THREADS, thread_name_prefix="ingest"),
        sample_writer=GroupCommit(sessions, store_samples, max_batch=64),
        decoders=DecoderPool(
            settings.ingest_decode_processes,
            timeout_seconds=settings.ingest_decode_timeout_seconds,
            on_crash=metrics.image_decoder_crashes.inc,
        ),
    )
