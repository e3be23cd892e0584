"""`build_runtime`: settings -> the objects the service runs on (one place, explicit)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from guardrail.auditor import ModelAuditor
from guardrail.config import Settings
from guardrail.metrics import Metrics
from guardrail.sampling import Sampler
from storage.engine import make_engine, session_factory

__all__ = ["Runtime", "build_runtime"]


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    metrics: Metrics
    auditors: dict[str, ModelAuditor]
    sampler: Sampler
    workers: list[object] = field(default_factory=list)


def build_runtime(settings: Settings, metrics: Metrics | None = None) -> Runtime:
    engine = make_engine(settings.database_url.get_secret_value())
    auditors = {m.name: ModelAuditor(m) for m in settings.models}
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=session_factory(engine),
        metrics=metrics or Metrics.create(),
        auditors=auditors,
        sampler=Sampler({m.name: m for m in settings.models}),
    )
