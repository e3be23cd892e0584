"""Which samples are audited: a rate per model, deterministic by a hash of the request, capped
per minute, with an always-audit override."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from guardrail.config import ModelSettings

__all__ = ["Decision", "Sampler", "request_key"]


@dataclass(frozen=True, slots=True)
class Decision:
    sampled: bool
    reason: str  # sampled, forced, rate, rate_limited


def request_key(
    model: str, request_id: str | None, image_sha256: str, prompt: str, text: str
) -> bytes:
    """What identifies a request: its id when it has one, else its content."""
    if request_id:
        return f"{model}\x00id\x00{request_id}".encode()
    return f"{model}\x00{image_sha256}\x00{prompt}\x00{text}".encode()


class Sampler:
    def __init__(
        self, models: Mapping[str, ModelSettings], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.models = models
        self.clock = clock
        self._lock = threading.Lock()
        self._recent: dict[str, deque[float]] = {}

    @staticmethod
    def fraction(key: bytes) -> float:
        """A number in [0, 1) fixed by `key`."""
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64

    def decide(self, model: str, key: bytes, *, force: bool = False) -> Decision:
        settings = self.models[model]
        if not force and self.fraction(key) >= settings.sample_rate:
            return Decision(False, "rate")
        cap = settings.max_audits_per_minute
        if cap is not None and not force:
            now = self.clock()
            with self._lock:
                recent = self._recent.setdefault(model, deque())
                while recent and now - recent[0] >= 60.0:
                    recent.popleft()
                if len(recent) >= cap:
                    return Decision(False, "rate_limited")
                recent.append(now)
        return Decision(True, "forced" if force else "sampled")
