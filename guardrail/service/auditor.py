"""Auditing one sample of one configured model: load it once, score with the fast scorer,
run the budgeted EAGLE search on every object word and judge it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from detectors.errors import ImageTokenError
from detectors.layout import ImageLayout
from detectors.pipeline import audit_sample
from detectors.types import Attribution, AuditedWord, Verdict
from guardrail.config import ModelSettings
from guardrail.errors import PermanentError

if TYPE_CHECKING:
    from detectors.calibration import Calibration
    from detectors.scorers.families import LoadedModel
    from detectors.scorers.remote import RemoteClient

__all__ = [
    "AuditInputError",
    "AuditResult",
    "LoadedAuditModel",
    "ModelAuditor",
    "image_placeholder",
]


class AuditInputError(PermanentError):
    """The sample cannot be audited as sent (retrying will not help)."""


_log = logging.getLogger("guardrail.auditor")


def image_placeholder(family: str) -> str:
    """The image placeholder of the model family called `family` (from the registry)."""
    from detectors.scorers.families import family_named

    return family_named(family).image_placeholder


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditResult:
    """One audited sample: its words, each with its attribution and verdict (same order)."""

    token_ids: tuple[int, ...]
    words: tuple[AuditedWord, ...]
    attributions: tuple[Attribution, ...]
    verdicts: tuple[Verdict, ...]
    forward_passes: int
    seconds: float
    budget_exhausted: int  # words whose search stopped on its budget
    thresholds_id: str  # `Calibration.id` of the thresholds the verdicts were decided with
    remote: Any = None  # detectors.scorers.remote.RemoteStats of this audit, remote models only


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadedAuditModel:
    """What a configured model needs loaded to audit: its tokenizer and the calibration its
    verdicts are decided with, and either the family's model with its ONNX vision files by the
    input size each serves (local) or the client of its server (remote)."""

    tokenizer: Any
    calibration: Calibration
    model: LoadedModel | None = None  # local models only
    visions: dict[tuple[int, int], Any] = field(default_factory=dict)
    client: RemoteClient | None = None  # remote models only
    vocab: int | None = None  # remote models: the vocabulary size from the config

    def local_model(self) -> LoadedModel:
        if self.model is None:
            raise RuntimeError("a remote model has no local weights")
        return self.model

    def remote_client(self) -> RemoteClient:
        if self.client is None:
            raise RuntimeError("a local model has no remote client")
        return self.client


class ModelAuditor:
    """One configured model, loaded on first use (thread-safe).

    A remote model (`scorer = "remote"`) loads only its tokenizer from `path`; masked images
    are scored by its server through a `RemoteClient` (one per model and process, so its
    request-rate cap is `remote_max_requests_per_second / rate_share`)."""

    def __init__(
        self, settings: ModelSettings, *, threads: int | None = None, rate_share: int = 1
    ) -> None:
        self.settings = settings
        self.threads = threads
        self.rate_share = max(1, rate_share)
        self._lock = threading.Lock()
        self._loaded: LoadedAuditModel | None = None

    def prompt_for(self, prompt: str, n_images: int = 1) -> str:
        """The prompt as the model saw it: as sent if it holds the image placeholder, else
        through the configured template (`{prompt}` is replaced; its one image stands for
        `n_images`, as `chat.chat_input` renders a conversation of several)."""
        from detectors.scorers.families import family_named
        from guardrail.service.chat import one_per_image

        family = family_named(self.settings.family)
        placeholder = family.image_placeholder
        if placeholder in prompt or not self.settings.prompt:
            return prompt
        rendered = self.settings.prompt.replace("{prompt}", prompt)
        return one_per_image(rendered, n_images, placeholder, family.image_segment)

    def load(self) -> LoadedAuditModel:
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    @property
    def remote(self) -> bool:
        return self.settings.scorer == "remote"

    def remote_stats(self) -> Any:
        """The remote client's counters (`RemoteStats`), or None (local, or not loaded)."""
        loaded = self._loaded
        client = loaded.client if loaded is not None else None
        return client.stats if client is not None else None

    def _load_remote(self) -> LoadedAuditModel:
        from transformers import AutoTokenizer

        from detectors.calibration import load_calibration
        from detectors.scorers.loading import checkpoint_config
        from detectors.scorers.remote import RemoteClient, RemoteServer

        s = self.settings
        config = checkpoint_config(s.path)
        text = config.get("text_config") or config
        rate = s.remote_max_requests_per_second
        if s.remote_url is None:
            raise ValueError(f"model {s.name!r}: scorer = 'remote' needs remote_url")
        server = RemoteServer(
            url=s.remote_url,
            model=s.remote_model or s.name,
            api_key=s.remote_api_key,
            concurrency=s.remote_concurrency,
            max_requests_per_second=rate / self.rate_share if rate else None,
            prompt_logprobs=s.remote_prompt_logprobs,
        )
        return LoadedAuditModel(
            client=RemoteClient(server),
            vocab=text.get("vocab_size"),
            tokenizer=AutoTokenizer.from_pretrained(s.path, local_files_only=True),
            calibration=load_calibration(
                s.path, s.audit_settings(), strict=not s.allow_uncalibrated
            ),
        )

    def _load(self) -> LoadedAuditModel:
        from detectors.calibration import load_calibration

        s = self.settings
        if self.remote:
            return self._load_remote()
        from detectors.scorers.families import family_named

        family = family_named(s.family)
        model = family.load(s.path, device=s.device, threads=self.threads, dtype=s.dtype)
        # the exported vision file(s) by the input size each serves (Qwen2.5-VL's `onnx` may be
        # a directory of them); other sizes run the torch tower
        visions = family.open_visions(model, s.onnx, device=s.device) if s.onnx else {}
        return LoadedAuditModel(
            model=model,
            visions=dict(visions),
            tokenizer=model.tokenizer,
            calibration=load_calibration(
                s.path, s.audit_settings(), strict=not s.allow_uncalibrated
            ),
        )

    def scorer(
        self,
        image: np.ndarray,
        prompt: str,
        token_ids: Sequence[int],
        layout: ImageLayout | None = None,
    ) -> Any:
        loaded = self.load()
        if self.remote:
            if layout is not None and not layout.is_single:
                raise AuditInputError("a remote model is audited on one image per sample")
            from detectors.scorers.remote import RemoteScorer
            from guardrail.service.chat import user_turn

            tokenizer = loaded.tokenizer
            text, image_first = user_turn(
                self.prompt_for(prompt),
                image_placeholder(self.settings.family),
                self.settings.prompt,
            )
            return RemoteScorer(
                loaded.remote_client(),
                text,
                token_ids,
                lambda ids: str(tokenizer.decode(list(ids), skip_special_tokens=False)),
                image_first=image_first,
            )
        from detectors.scorers.families import family_named

        family = family_named(self.settings.family)
        visions = loaded.visions
        model = loaded.local_model()
        # several images: the vision file of the size most of them are processed to
        sizes = [model.input_hw(i) for i in layout.split(image)] if layout else []
        hw = max(sizes, key=sizes.count) if sizes else model.input_hw(image)
        vision = visions.get(hw)
        if visions and vision is None:
            _log.info(
                "model %s: no vision file in %s for %dx%d inputs; scoring with the torch tower",
                self.settings.name,
                self.settings.onnx,
                *hw,
            )
        return family.fast_scorer(
            model, image, self.prompt_for(prompt), token_ids, vision=vision, layout=layout
        )

    def tokenize(self, text: str) -> list[int]:
        tokenizer = self.load().tokenizer
        return [int(t) for t in tokenizer(text, add_special_tokens=False).input_ids]

    def _check_tokens(
        self,
        loaded: LoadedAuditModel,
        image: np.ndarray,
        prompt: str,
        ids: Sequence[int],
        layout: ImageLayout | None = None,
    ) -> None:
        if self.remote:  # the server checks the length; the vocabulary is known from config
            vocab = loaded.vocab or len(loaded.tokenizer)
            bad = [t for t in ids if not 0 <= int(t) < int(vocab)]
            if bad:
                raise AuditInputError(
                    f"token ids {bad[:5]} do not decode: the model's vocabulary has {vocab} tokens"
                )
            return
        model = loaded.local_model().model
        text_config = model.config.get_text_config()
        vocab = int(text_config.vocab_size)
        bad = [t for t in ids if not 0 <= int(t) < vocab]
        if bad:
            raise AuditInputError(
                f"token ids {bad[:5]} do not decode: the model's vocabulary has {vocab} tokens"
            )
        limit = getattr(text_config, "max_position_embeddings", None)
        if limit is not None:
            # the prompt with its image placeholder expanded to the image's tokens
            local = loaded.local_model()
            try:
                n_prompt = len(local.prompt_ids(self.prompt_for(prompt), image, layout))
            except ImageTokenError as exc:
                raise AuditInputError(str(exc)) from None
            if n_prompt + len(ids) > int(limit):
                raise AuditInputError(
                    f"the prompt and output are {n_prompt + len(ids)} tokens, over the "
                    f"model's {limit} positions"
                )

    def audit(
        self,
        image: np.ndarray,
        prompt: str,
        token_ids: Sequence[int] | None,
        text: str,
        layout: ImageLayout | None = None,
    ) -> AuditResult:
        """Audit one sample: `image` (a canvas of several images where `layout` says so, for
        a family that takes several), the prompt, and the output's tokens (or its text)."""
        import time

        from detectors.types import StopReason

        started = time.perf_counter()
        loaded = self.load()
        ids = list(token_ids) if token_ids else self.tokenize(text)
        tokenizer = loaded.tokenizer
        # rendered once with every image (a rendered prompt is taken as it is from here on)
        prompt = self.prompt_for(prompt, layout.n_images if layout else 1)
        self._check_tokens(loaded, image, prompt, ids, layout)

        def decode(pieces: Sequence[int]) -> str:
            return str(tokenizer.decode(list(pieces), skip_special_tokens=True))

        s = self.settings
        client = loaded.client
        before = client.stats if client is not None else None
        audit = audit_sample(
            image,
            self.scorer(image, prompt, ids, layout),
            ids,
            decode,
            settings=s.audit_settings(),
            layout=layout,
            thresholds=loaded.calibration.thresholds,
        )
        remote = client.stats.minus(before) if client is not None and before is not None else None
        words = tuple(
            AuditedWord(position=m.position, token_id=m.token_id, word=m.word, category=m.category)
            for m in audit.mentions
        )
        if audit.explanation is None:
            return AuditResult(
                token_ids=tuple(ids),
                words=(),
                attributions=(),
                verdicts=(),
                forward_passes=0,
                seconds=time.perf_counter() - started,
                budget_exhausted=0,
                thresholds_id=loaded.calibration.id,
                remote=remote,
            )
        attributions = tuple(audit.explanation.attributions)
        exhausted = sum(
            a.stopped_by in (StopReason.FORWARD_BUDGET, StopReason.TIME_BUDGET)
            for a in attributions
        )
        return AuditResult(
            token_ids=tuple(ids),
            words=words,
            attributions=attributions,
            verdicts=tuple(audit.explanation.verdicts),
            forward_passes=audit.forward_passes,
            seconds=time.perf_counter() - started,
            budget_exhausted=exhausted,
            thresholds_id=loaded.calibration.id,
            remote=remote,
        )
