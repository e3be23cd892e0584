"""The tee: a proxied chat exchange handed to ingest, one sample per choice.

Runs on the tee executor, after the answer went back to the client: the proxy never waits
on it; each sample is written on the ingest executor (a slow image URL fetch here never holds
the ingest thread that the samples API waits on).  Here the answer is inflated and read, the
conversation's image found (in any turn), an image URL fetched when the operator allows it
(`guardrail.service.image_fetch`), and every choice ingested as its own sample with the exchange's
correlation keys.

Every choice of a teed 200 answer ends in exactly one place: a sample (or a sampling skip,
counted by ingest), `guardrail_proxy_not_applicable_total{reason}` (the audit does not apply:
text-only conversations, several images for a model audited on one or more than
`max_images_per_sample`, image URLs the operator does not fetch, choices
without text), or `guardrail_proxy_fail_open_drops_total{reason}` (a failure).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from guardrail.config import ModelSettings
from guardrail.service.answers import UnreadableAnswerError, decoded_body, read_answer
from guardrail.service.chat import ChatFormatError, ChatInput, chat_input
from guardrail.service.image_fetch import ImageFetcher, ImageFetchError
from guardrail.service.ingest import IngestError, IngestRequest, ingest, max_images
from guardrail.service.runtime import Runtime
from guardrail.service.sampling import Sampler, request_key

__all__ = ["Tee", "TeedExchange"]

log = logging.getLogger("guardrail.proxy")

_NOT_APPLICABLE = frozenset({"text_only", "multi_image", "too_many_images"})


@dataclass(frozen=True, slots=True)
class TeedExchange:
    """A 200 chat answer and its request, as the tee needs them."""

    body: dict[str, Any]  # the request, parsed
    model: ModelSettings
    answer: bytes  # as relayed (still compressed when the upstream compressed it)
    content_encoding: str
    streamed: bool
    request_id: str | None
    traceparent: str | None
    force: bool


class Tee:
    """Hands exchanges to ingest; `__call__` never raises (the proxy fails open)."""

    def __init__(self, runtime: Runtime, fetcher: ImageFetcher) -> None:
        self.runtime = runtime
        self.fetcher = fetcher
        metrics = runtime.metrics
        self._drops = metrics.proxy_fail_open_drops
        self._not_applicable = metrics.proxy_not_applicable

    def drop(self, reason: str, n: int = 1) -> None:
        self._drops.labels(reason=reason).inc(n)

    def not_applicable(self, reason: str, n: int = 1) -> None:
        self._not_applicable.labels(reason=reason).inc(n)

    def __call__(self, exchange: TeedExchange) -> None:
        try:
            self._tee(exchange)
        except Exception as exc:  # anything unforeseen: traffic must still flow
            log.warning("proxy: could not tee an exchange: %s", str(exc).splitlines()[0])
            self.drop("ingest_error")

    def _tee(self, exchange: TeedExchange) -> None:
        settings = self.runtime.settings
        try:
            raw = decoded_body(
                exchange.answer, exchange.content_encoding, settings.proxy_max_response_bytes
            )
            answer = read_answer(raw, streamed=exchange.streamed)
        except UnreadableAnswerError as exc:
            self.drop(exc.reason)
            return
        if answer.extra_choices:
            self.drop("too_many_choices", answer.extra_choices)
        with_text = {i: t for i, t in sorted(answer.texts.items()) if t is not None}
        if len(with_text) < len(answer.texts):
            self.not_applicable("no_text", len(answer.texts) - len(with_text))
        if not with_text:
            return
        from detectors.scorers.families import family_named

        model = exchange.model
        family = family_named(model.family)
        try:
            parsed = chat_input(
                exchange.body,
                family.image_placeholder,
                model.prompt,
                max_images=max_images(model, self.runtime.settings),
                segment=family.image_segment,
            )
        except ChatFormatError as exc:
            if exc.reason in _NOT_APPLICABLE:
                self.not_applicable(exc.reason, len(with_text))
            elif exc.reason == "image_unreadable":
                self.drop("image_unreadable", len(with_text))
            else:
                self.drop("request_unreadable", len(with_text))
            return
        prompt = self.runtime.auditors[model.name].prompt_for(parsed.prompt)
        images, image_key = self._images(exchange, parsed, prompt, with_text)
        if images is None:
            return
        for index, text in with_text.items():
            self._ingest(exchange, prompt, images, image_key, index, text, answer.id)

    def _images(
        self,
        exchange: TeedExchange,
        parsed: ChatInput,
        prompt: str,
        texts: dict[int, str],
    ) -> tuple[list[bytes] | None, str | None]:
        """The images' bytes (fetched for URLs) and the digest the sampling key uses in
        place of the image's (for URLs or several images: sampled before fetching); None when
        every choice has been accounted for here."""
        parts = parsed.images or ((parsed.image_bytes, parsed.image_url),)
        if len(parts) == 1 and parsed.image_url is None:
            return ([parsed.image_bytes] if parsed.image_bytes is not None else None), None
        keys = [
            hashlib.sha256(url.encode("utf-8", "replace") if url else data or b"").hexdigest()
            for data, url in parts
        ]
        url_key = keys[0] if len(keys) == 1 else hashlib.sha256(",".join(keys).encode()).hexdigest()
        if all(url is None for _, url in parts):
            return [data or b"" for data, _ in parts], url_key
        model = exchange.model
        if not exchange.force:
            # a choice the sampler will not take is not worth a fetch: decided on the same
            # key that ingest uses, so the decision is the same
            skipped = [
                i
                for i, text in texts.items()
                if Sampler.fraction(
                    request_key(model.name, exchange.request_id, url_key, prompt, text)
                )
                >= model.sample_rate
            ]
            if skipped:
                m = self.runtime.metrics
                m.samples_received.labels(model=model.name).inc(len(skipped))
                m.samples_skipped.labels(model=model.name, reason="rate").inc(len(skipped))
                for index in skipped:
                    del texts[index]
            if not texts:
                return None, None
        fetched: list[bytes] = []
        # the fetched images of one sample share one image's bytes (as a sample's images share
        # the API's body limit): N fetches never hold N times max_image_bytes
        room = self.fetcher.max_bytes
        # and one fetch's time: N slow URLs never hold the tee N times image_url_timeout_seconds
        deadline = time.monotonic() + self.fetcher.timeout_seconds
        try:
            for data, url in parts:
                if url is None:
                    fetched.append(data or b"")
                    continue
                fetched.append(self.fetcher.fetch(url, max_bytes=room, deadline=deadline))
                room -= len(fetched[-1])
            return fetched, url_key
        except ImageFetchError as exc:
            if exc.by_policy:
                self.not_applicable("image_url_not_allowed", len(texts))
            else:
                log.info("proxy: image URL not fetched (%s): %s", exc.outcome, exc)
                self.drop("image_fetch_failed", len(texts))
            return None, None

    def _ingest(
        self,
        exchange: TeedExchange,
        prompt: str,
        images: list[bytes],
        image_key: str | None,
        index: int,
        text: str,
        response_id: str | None,
    ) -> None:
        try:
            # on the ingest executor (one thread on SQLite: one writer at a time), waited for
            # here, on a tee thread: the backlog holds this exchange until it is written
            self.runtime.ingest_executor.submit(
                ingest,
                self.runtime,
                IngestRequest(
                    model=exchange.model.name,
                    prompt=prompt,
                    image_bytes=images[0],
                    more_images=tuple(images[1:]),
                    output=text,
                    request_id=exchange.request_id,
                    response_id=response_id,
                    traceparent=exchange.traceparent,
                    choice_index=index,
                    image_key=image_key,
                    metadata={"source": "proxy"},
                    force=exchange.force,
                ),
            ).result()
        except IngestError as exc:  # 503: decoding is saturated; else the sample is refused
            self.drop("ingest_busy" if exc.status == 503 else "rejected")
        except ValueError:  # text the storage cannot encode
            self.drop("rejected")
        except Exception as exc:  # the database or anything else: traffic must still flow
            log.warning("proxy: could not tee a sample to ingest: %s", str(exc).splitlines()[0])
            self.drop("ingest_error")
