"""A scorer that asks the model's own server: vLLM's `prompt_logprobs` over the chat API.

Each masked variant is encoded as a PNG (lossless: the only place where this path differs from
scoring the weights locally) and sent as one chat request holding the conversation that produced
the output: the user turn (image and text) and, as the final assistant message, the output up
to and including the last target token, with `continue_final_message: true,
add_generation_prompt: false, max_tokens: 1, prompt_logprobs: k, return_token_ids: true`.  The
server teacher-forces the output and returns the log-probability of every prompt token; the
targets sit at the end of the prompt, which the output closes, so they are located from the
end and checked against the prompt token ids the server returns (`RemoteTokenMismatchError`
otherwise).  One masked image is one request, hence one forward pass of the search's budget;
the server batches concurrent requests by itself.

Requests run on a bounded thread pool over one keep-alive `httpx.Client`, with connect and read
timeouts, a token bucket capping requests per second, and bounded retries on 429/502/503/504
and transport errors honouring `Retry-After`.  `RemoteClient.stats` counts requests sent,
retries, failures and the seconds they took.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from detectors.errors import (
    RemoteRequestError,
    RemoteTokenMismatchError,
    RemoteUnavailableError,
    RemoteUnsupportedError,
)
from detectors.scorers.fast import check_targets
from detectors.scorers.masked import MaskedBatch
from detectors.types import Target

__all__ = [
    "RemoteClient",
    "RemoteScorer",
    "RemoteServer",
    "RemoteStats",
    "TokenBucket",
    "masked_server_url",
    "png_bytes",
]

_RETRY_STATUSES = frozenset({429, 502, 503, 504})


def masked_server_url(url: str) -> str:
    """`url` without credentials: user info, query and fragment replaced by `****`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "****"
    host = parts.netloc.rpartition("@")[2]
    netloc = f"****@{host}" if "@" in parts.netloc else host
    return urlunsplit((parts.scheme, netloc, parts.path, "****" if parts.query else "", "")) + (
        "#****" if parts.fragment else ""
    )


def png_bytes(image: np.ndarray) -> bytes:
    """`(H, W, 3)` uint8 as a PNG (lossless; fast compression: the bytes only cross a wire)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
        out, format="PNG", compress_level=1
    )
    return out.getvalue()


@dataclass(frozen=True, kw_only=True, slots=True)
class RemoteServer:
    """Where and how to reach a model server.

    Attributes:
        url: the server's base URL (`http://vllm:8000` or `http://vllm:8000/v1`).
        model: the served model name (`llava-hf/llava-1.5-7b-hf`).
        api_key: sent as `Authorization: Bearer`; never shown in `repr` or names.
        concurrency: requests in flight at once (threads and keep-alive connections).
        max_requests_per_second: token-bucket cap on requests (retries included); None: none.
        prompt_logprobs: k, the top-k log-probabilities asked for beside each prompt token's
            own (0 keeps answers small; vLLM caps k with `--max-logprobs`).
        connect_timeout, read_timeout: seconds.
        max_retries: retries of one request on 429/502/503/504 and transport errors.
        max_retry_wait: longest wait honoured from `Retry-After` (seconds).
        max_response_bytes: larger answers are refused.
    """

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 4
    max_requests_per_second: float | None = None
    prompt_logprobs: int = 0
    connect_timeout: float = 5.0
    read_timeout: float = 120.0
    max_retries: int = 4
    max_retry_wait: float = 30.0
    max_response_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) URL, got: {masked_server_url(self.url)!r}")
        if not self.model:
            raise ValueError("model (the served model name) must not be empty")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be positive, got: {self.concurrency}")
        if self.max_requests_per_second is not None and not self.max_requests_per_second > 0:
            raise ValueError(
                f"max_requests_per_second must be positive or None, got: "
                f"{self.max_requests_per_second}"
            )
        if self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got: {self.prompt_logprobs}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got: {self.max_retries}")

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


class TokenBucket:
    """At most `rate` acquisitions per second on average, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got: {rate}")
        self.rate = float(rate)
        self.capacity = float(burst if burst is not None else max(1.0, rate))
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until one is there; returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return waited
                need = (1.0 - self._tokens) / self.rate
            time.sleep(need)
            waited += need


@dataclass
class RemoteStats:
    """What a client sent: `requests` HTTP attempts (retries included), `retries`, `failures`
    (attempts answered with an error or not answered), `seconds` spent in requests (summed over
    threads), `rate_wait_seconds` spent waiting on the request-rate cap, `rows` variants scored."""

    requests: int = 0
    retries: int = 0
    failures: int = 0
    seconds: float = 0.0
    rate_wait_seconds: float = 0.0
    rows: int = 0

    def minus(self, earlier: RemoteStats) -> RemoteStats:
        return RemoteStats(
            requests=self.requests - earlier.requests,
            retries=self.retries - earlier.retries,
            failures=self.failures - earlier.failures,
            seconds=self.seconds - earlier.seconds,
            rate_wait_seconds=self.rate_wait_seconds - earlier.rate_wait_seconds,
            rows=self.rows - earlier.rows,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "failures": self.failures,
            "seconds": self.seconds,
            "rate_wait_seconds": self.rate_wait_seconds,
            "rows": self.rows,
        }


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw[:300].decode("utf-8", "replace")
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:1000]
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])[:1000]
    return str(body)[:300]


class RemoteClient:
    """One server and served model: a keep-alive HTTP client, a bounded pool of `concurrency`
    threads, the request-rate cap and the counters.  Share one per model; `close` it."""

    def __init__(self, server: RemoteServer, *, sleep: Callable[[float], None] = time.sleep):
        import httpx

        self.server = server
        self._sleep = sleep
        headers = {"Content-Type": "application/json"}
        if server.api_key:
            headers["Authorization"] = f"Bearer {server.api_key}"
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(
                server.read_timeout,
                connect=server.connect_timeout,
                pool=server.read_timeout,
            ),
            limits=httpx.Limits(
                max_connections=server.concurrency,
                max_keepalive_connections=server.concurrency,
            ),
        )
        self._pool = ThreadPoolExecutor(server.concurrency, thread_name_prefix="remote-scorer")
        self._bucket = (
            TokenBucket(server.max_requests_per_second) if server.max_requests_per_second else None
        )
        self._lock = threading.Lock()
        self._stats = RemoteStats()

    @property
    def name(self) -> str:
        return f"remote({masked_server_url(self.server.url)}; model={self.server.model}; image=png)"

    @property
    def stats(self) -> RemoteStats:
        with self._lock:
            return replace(self._stats)

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for key, value in deltas.items():
                setattr(self._stats, key, getattr(self._stats, key) + value)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, body: dict[str, Any]) -> Future[dict[str, Any]]:
        return self._pool.submit(self.post, body)

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a chat request; the parsed answer of a 200.

        Raises:
            RemoteUnsupportedError: the server refuses `prompt_logprobs` or
                `continue_final_message`.
            RemoteRequestError: another 4xx (other than 429).
            RemoteUnavailableError: no answer, or 429/5xx after the bounded retries.
        """
        import httpx

        server = self.server
        payload = json.dumps(body).encode()
        attempt = 0
        while True:
            if self._bucket is not None:
                self._count(rate_wait_seconds=self._bucket.acquire())
            started = time.perf_counter()
            wait: float | None = None
            try:
                status, headers, raw = self._send(payload)
            except httpx.TransportError as exc:
                self._count(requests=1, failures=1, seconds=time.perf_counter() - started)
                problem = f"{type(exc).__name__}: {exc}"
                status = 0
            else:
                self._count(requests=1, seconds=time.perf_counter() - started)
                if status == 200:
                    try:
                        answer = json.loads(raw)
                    except ValueError as exc:
                        self._count(failures=1)
                        raise RemoteRequestError(
                            f"{self.name} answered 200 with a body that is not JSON: {exc}"
                        ) from None
                    if not isinstance(answer, dict):
                        self._count(failures=1)
                        raise RemoteRequestError(f"{self.name} answered 200 with a non-object")
                    return answer
                self._count(failures=1)
                problem = f"HTTP {status}: {_error_message(raw)}"
                if status not in _RETRY_STATUSES:
                    raise self._refusal(status, problem)
                wait = _retry_after(headers.get("retry-after"))
            if attempt >= server.max_retries:
                raise RemoteUnavailableError(
                    f"{self.name}: {attempt + 1} attempts failed, the last with {problem}"
                )
            attempt += 1
            self._count(retries=1)
            backoff = 0.25 * 2 ** (attempt - 1)
            self._sleep(min(server.max_retry_wait, wait if wait is not None else backoff))

    def _send(self, payload: bytes) -> tuple[int, Any, bytes]:
        cap = self.server.max_response_bytes
        with self._http.stream("POST", self.server.endpoint, content=payload) as response:
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > cap:
                    raise RemoteRequestError(f"{self.name} answered more than {cap} bytes; refused")
                chunks.append(chunk)
            return response.status_code, response.headers, b"".join(chunks)

    def _refusal(self, status: int, problem: str) -> Exception:
        k = self.server.prompt_logprobs
        if status in (400, 422):
            # vLLM: "Requested prompt logprobs of 21, which is greater than max allowed: 20"
            if "prompt_logprobs" in problem or "prompt logprobs" in problem.lower():
                return RemoteUnsupportedError(
                    f"{self.name} refused prompt_logprobs={k} ({problem}): the server must "
                    "implement vLLM's prompt_logprobs extension and allow k (vLLM: "
                    f"--max-logprobs >= {k})"
                )
            if "continue_final_message" in problem or "add_generation_prompt" in problem:
                return RemoteUnsupportedError(
                    f"{self.name} refused continue_final_message ({problem}): the server must "
                    "implement vLLM's continue_final_message with a chat template that can "
                    "continue an assistant message"
                )
        return RemoteRequestError(f"{self.name} refused the request: {problem}")


class RemoteScorer:
    """P(target | masked image, prompt, generated tokens before it), asked of a model server.

    Args:
        client: the server (shared per model; counts requests and caps their rate).
        user_text: the user turn's text (the image goes before it, or after with
            `image_first=False`).
        generated_ids: the tokens the model generated (target positions index into these).
        decode: token ids -> text, the audited model's tokenizer (special tokens kept): the
            final assistant message is `decode(generated_ids[: last target + 1])`.
    """

    def __init__(
        self,
        client: RemoteClient,
        user_text: str,
        generated_ids: Sequence[int],
        decode: Callable[[Sequence[int]], str],
        *,
        image_first: bool = True,
    ) -> None:
        self.client = client
        self.user_text = user_text
        self.generated_ids = [int(i) for i in generated_ids]
        self.decode = decode
        self.image_first = image_first

    @property
    def name(self) -> str:
        return self.client.name

    @property
    def max_batch_size(self) -> int:
        # a batch is sent as concurrent requests: a few rounds of the pool keep it busy
        return max(16, 4 * self.client.server.concurrency)

    def request_body(self, png: bytes, last: int) -> dict[str, Any]:
        """The chat request for one masked image, up to and including generated token `last`."""
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        image = {"type": "image_url", "image_url": {"url": url}}
        text = {"type": "text", "text": self.user_text}
        parts = [image, text] if self.image_first else [text, image]
        return {
            "model": self.client.server.model,
            "messages": [
                {"role": "user", "content": parts},
                {"role": "assistant", "content": self.decode(self.generated_ids[: last + 1])},
            ],
            "continue_final_message": True,
            "add_generation_prompt": False,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.client.server.prompt_logprobs,
            "return_token_ids": True,
        }

    def score(self, batch: MaskedBatch, targets: Sequence[Target]) -> np.ndarray:
        """`(B, T)` probabilities, one request per masked image (concurrently)."""
        check_targets(targets, self.generated_ids)
        last = max(t.position for t in targets)
        pixels = batch.pixels()
        futures = [
            self.client.submit(self.request_body(png_bytes(pixels[b]), last))
            for b in range(batch.size)
        ]
        out = np.empty((batch.size, len(targets)), dtype=np.float64)
        try:
            for b, future in enumerate(futures):
                out[b] = self.read(future.result(), targets, last)
        finally:
            for future in futures:
                future.cancel()
        self.client._count(rows=batch.size)
        return out

    def read(self, answer: dict[str, Any], targets: Sequence[Target], last: int) -> np.ndarray:
        """The targets' probabilities from one answer.

        Raises:
            RemoteUnsupportedError: no `prompt_logprobs` (or no way to know the prompt tokens).
            RemoteTokenMismatchError: the end of the prompt is not the generated tokens.
        """
        name = self.client.name
        logprobs = answer.get("prompt_logprobs")
        if not isinstance(logprobs, list) or not logprobs:
            raise RemoteUnsupportedError(
                f"{name} answered without prompt_logprobs: the server does not implement "
                "vLLM's prompt_logprobs extension (vLLM's OpenAI-compatible server does)"
            )
        ids = answer.get("prompt_token_ids")
        if ids is None:
            # without return_token_ids (vLLM < 0.10.2) the ids are known only when each entry
            # holds the prompt token alone (k = 0)
            if self.client.server.prompt_logprobs != 0:
                raise RemoteUnsupportedError(
                    f"{name} returned no prompt_token_ids (vLLM >= 0.10.2 does with "
                    "return_token_ids); set prompt_logprobs to 0 so each entry names its token"
                )
            ids = [None] + [
                int(next(iter(e))) if isinstance(e, dict) and len(e) == 1 else -1
                for e in logprobs[1:]
            ]
        if not isinstance(ids, list) or len(ids) != len(logprobs):
            raise RemoteUnsupportedError(
                f"{name}: prompt_token_ids and prompt_logprobs differ in length"
            )
        n = last + 1
        expected = self.generated_ids[:n]
        tail = ids[-n:] if len(ids) >= n else ids
        if tail != expected:
            raise RemoteTokenMismatchError(
                f"{name}: the prompt ends with tokens {tail[-8:]} where the output's are "
                f"{expected[-8:]}: the server's chat template or tokenizer does not reproduce "
                "the audited output (continue_final_message ignored, another tokenizer, or a "
                "template that changes the assistant text)"
            )
        start = len(ids) - n
        row = np.empty(len(targets), dtype=np.float64)
        for j, t in enumerate(targets):
            entry = logprobs[start + t.position]
            info = entry.get(str(t.token_id)) if isinstance(entry, dict) else None
            value = info.get("logprob") if isinstance(info, dict) else None
            if not isinstance(value, int | float) or math.isnan(value):
                raise RemoteUnsupportedError(
                    f"{name}: prompt_logprobs at prompt position {start + t.position} has no "
                    f"log-probability for the prompt token {t.token_id}"
                )
            row[j] = min(1.0, math.exp(min(0.0, float(value))))
        return row
