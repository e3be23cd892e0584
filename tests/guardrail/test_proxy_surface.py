"""What must hold end to end: the `openai` client through the sidecar (uvicorn on loopback)
against a vLLM-like upstream the test starts: the models list and completions forwarded, chat
with n=2 (each choice audited with its own text), an image URL served on 127.0.0.1 fetched
when allow-listed and never requested when not, a gzip-streaming upstream, an upstream
timeout (504), and a model named `org/name`."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from detectors.reference import MODEL_DIR
from detectors.reference.world import CAPTION_PROMPT
from guardrail.config import load_settings
from guardrail.demo.background_server import BackgroundServer
from guardrail.service.api import create_app
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.worker import Worker
from storage.engine import upgrade
from storage.models import Sample

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"
ORG_MODEL = "llava-hf/llava-1.5-7b-hf"
TEXTS = ["fork knife car clock .", "knife clock ."]  # choice i says TEXTS[i]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass
class VllmLike:
    """An OpenAI-compatible server as vLLM answers: models, completions, chat with `n`
    choices (streamed per index), a gzip-compressed stream, and a model that answers late.
    Records the path and headers of every request."""

    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def models(request: Request) -> Response:
            self._see(request)
            return JSONResponse(
                {"object": "list", "data": [{"id": ORG_MODEL, "object": "model", "created": 0}]}
            )

        async def completions(request: Request) -> Response:
            self._see(request)
            body = await request.json()
            return JSONResponse(
                {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "text": " a cat", "finish_reason": "stop", "logprobs": None}
                    ],
                }
            )

        async def chat(request: Request) -> Response:
            self._see(request)
            body = await request.json()
            if body["model"] == "slow":
                await asyncio.sleep(3)
            n = int(body.get("n") or 1)
            if not body.get("stream"):
                return JSONResponse(
                    {
                        "id": "chatcmpl-plain",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": i,
                                "message": {"role": "assistant", "content": TEXTS[i % 2]},
                                "finish_reason": "stop",
                            }
                            for i in range(n)
                        ],
                    }
                )
            events = []
            for word in range(5):  # the choices' words interleaved, as vLLM sends them
                for i in range(n):
                    words = TEXTS[i % 2].split(" ")
                    if word < len(words):
                        piece = words[word] + (" " if word < len(words) - 1 else "")
                        events.append(
                            {
                                "id": "chatcmpl-stream",
                                "object": "chat.completion.chunk",
                                "created": 0,
                                "model": body["model"],
                                "choices": [{"index": i, "delta": {"content": piece}}],
                            }
                        )
            lines = [f"data: {json.dumps(e)}\n\n".encode() for e in events]
            lines.append(b"data: [DONE]\n\n")
            gzipped = request.headers.get("x-test-gzip") == "1"

            async def stream() -> AsyncIterator[bytes]:
                packer = zlib.compressobj(wbits=31)  # gzip, flushed event by event
                for line in lines:
                    await asyncio.sleep(0.01)
                    yield (
                        packer.compress(line) + packer.flush(zlib.Z_SYNC_FLUSH) if gzipped else line
                    )
                if gzipped:
                    yield packer.flush()

            headers = {"content-encoding": "gzip"} if gzipped else {}
            return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

        return Starlette(
            routes=[
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/chat/completions", chat, methods=["POST"]),
            ]
        )

    def _see(self, request: Request) -> None:
        self.seen.append((request.method, request.url.path, dict(request.headers)))


@dataclass
class ImageHost:
    """Serves the example image on 127.0.0.1 and counts who asked for it."""

    requests: list[str] = field(default_factory=list)

    def app(self) -> Starlette:
        async def image(request: Request) -> Response:
            self.requests.append(request.url.path)
            return Response(EXAMPLE.read_bytes(), media_type="image/png")

        return Starlette(routes=[Route("/knife.png", image)])


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[VllmLike, str]]:
    server = VllmLike()
    with BackgroundServer(server.app()) as url:
        yield server, url


@pytest.fixture(scope="module")
def image_host() -> Iterator[tuple[ImageHost, str]]:
    host = ImageHost()
    with BackgroundServer(host.app()) as url:
        yield host, url


@pytest.fixture()
def sidecar(
    tmp_path: Path, upstream: tuple[VllmLike, str]
) -> Iterator[Callable[..., tuple[Runtime, str]]]:
    servers: list[BackgroundServer] = []

    def start(name: str, **overrides: Any) -> tuple[Runtime, str]:
        settings = load_settings(
            environ={},
            database_url=f"sqlite:///{tmp_path / f'{name}.db'}",
            upstream_url=upstream[1] + "/v1",  # as vLLM's docs write it
            models=[
                {"name": "reference", "path": str(MODEL_DIR)},
                {"name": ORG_MODEL, "path": str(MODEL_DIR)},
            ],
            proxy_read_timeout_seconds=1.0,
            **overrides,
        )
        runtime = build_runtime(settings)
        upgrade(runtime.engine)
        server = BackgroundServer(create_app(runtime))
        servers.append(server)
        return runtime, server.__enter__()

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def _image_message(url: str, text: str = "Describe the image.") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        }
    ]


def _data_url() -> str:
    return "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()


def _samples(runtime: Runtime, n: int, what: str) -> list[Sample]:
    deadline = time.time() + 20
    while time.time() < deadline:
        with runtime.sessions() as session:
            rows = session.query(Sample).order_by(Sample.choice_index).all()
            if len(rows) >= n:
                session.expunge_all()
                return rows
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _value(runtime: Runtime, name: str, labels: dict[str, str]) -> float:
    return runtime.metrics.registry.get_sample_value(name, labels) or 0.0


def test_the_openai_surface_goes_through_and_every_choice_is_audited(
    upstream: tuple[VllmLike, str], sidecar: Callable[..., tuple[Runtime, str]]
) -> None:
    vllm, _ = upstream
    runtime, url = sidecar("main")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

    # the models list and completions are forwarded as they are (not teed)
    assert [m.id for m in client.models.list().data] == [ORG_MODEL]
    assert client.completions.create(model=ORG_MODEL, prompt="Say").choices[0].text == " a cat"

    # chat with n=2 for a model named org/name: each choice its own sample, with correlation
    raw = client.chat.completions.with_raw_response.create(
        model=ORG_MODEL,
        messages=_image_message(_data_url()),  # type: ignore[arg-type]
        n=2,
        extra_headers={
            "X-Request-Id": "req-42",
            "traceparent": TRACEPARENT,
            "X-Guardrail-Audit": "1",
        },
    )
    got = raw.parse()
    assert [c.message.content for c in got.choices] == TEXTS
    assert len(raw.headers.get_list("date")) == 1 and len(raw.headers.get_list("server")) == 1
    method, path, headers = vllm.seen[-1]
    assert (method, path) == ("POST", "/v1/chat/completions")
    assert not [h for h in headers if h.startswith("x-guardrail-")]  # stripped
    assert headers["x-request-id"] == "req-42"  # the rest as sent
    samples = _samples(runtime, 2, "a sample per choice")
    assert [(s.choice_index, s.generated_text) for s in samples] == [(0, TEXTS[0]), (1, TEXTS[1])]
    assert {(s.model, s.response_id, s.request_id, s.traceparent) for s in samples} == {
        (ORG_MODEL, "chatcmpl-plain", "req-42", TRACEPARENT)
    }
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once() and worker.run_once()
    for sample in samples:
        view = httpx.get(f"{url}/v1/samples/{sample.id}").json()
        assert view["status"] == "audited" and view["output"] == TEXTS[sample.choice_index or 0]
        assert view["response_id"] == "chatcmpl-plain" and view["traceparent"] == TRACEPARENT
        assert view["request_id"] == "req-42" and view["choice_index"] == sample.choice_index
        assert {t["word"] for t in view["tokens"]} >= {"knife", "clock"}
    audits = httpx.get(f"{url}/v1/audits", params={"model": ORG_MODEL}).json()["audits"]
    assert {(a["choice_index"], a["response_id"]) for a in audits} == {
        (0, "chatcmpl-plain"),
        (1, "chatcmpl-plain"),
    }

    # streamed with n=2: the text assembled per choice index, not interleaved
    stream = client.chat.completions.create(
        model="reference",
        messages=_image_message(_data_url(), "Describe it again."),  # type: ignore[arg-type]
        n=2,
        stream=True,
    )
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:  # type: ignore[union-attr]
            texts[choice.index] += choice.delta.content or ""
    assert texts == TEXTS
    streamed = [s for s in _samples(runtime, 4, "the streamed samples") if s.model == "reference"]
    assert sorted((s.choice_index, s.generated_text, s.response_id) for s in streamed) == [
        (0, TEXTS[0], "chatcmpl-stream"),
        (1, TEXTS[1], "chatcmpl-stream"),
    ]

    # a gzip-compressed stream reaches the client readable (Content-Encoding relayed with the
    # compressed bytes) and is still teed
    gz = client.chat.completions.create(
        model="reference",
        messages=_image_message(_data_url(), "And once more."),  # type: ignore[arg-type]
        stream=True,
        extra_headers={"X-Test-Gzip": "1"},
    )
    assert "".join(c.choices[0].delta.content or "" for c in gz if c.choices) == TEXTS[0]  # type: ignore[union-attr]
    _samples(runtime, 5, "the gzip stream's sample")

    # an upstream that does not answer in time: 504 with the reason
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="slow",
            messages=_image_message(_data_url()),  # type: ignore[arg-type]
        )
    assert caught.value.status_code == 504
    assert "proxy_read_timeout_seconds" in caught.value.body["message"]  # type: ignore[index]

    # counted by route and status class; whole-answer and first-byte times apart
    count = "guardrail_proxy_requests_total"
    assert _value(runtime, count, {"route": "models", "code": "2xx"}) == 1
    assert _value(runtime, count, {"route": "completions", "code": "2xx"}) == 1
    assert _value(runtime, count, {"route": "chat_completions", "code": "2xx"}) == 3
    assert _value(runtime, count, {"route": "chat_completions", "code": "5xx"}) == 1
    labels = {"route": "chat_completions", "model": "reference"}
    ttfb = _value(runtime, "guardrail_proxy_time_to_first_byte_seconds_sum", labels)
    whole = _value(runtime, "guardrail_proxy_request_duration_seconds_sum", labels)
    assert 0 < ttfb < whole  # the streams took longer than their first bytes


def test_image_urls_are_fetched_only_when_allow_listed(
    image_host: tuple[ImageHost, str], sidecar: Callable[..., tuple[Runtime, str]]
) -> None:
    host, host_url = image_host
    image_url = f"{host_url}/knife.png"
    allowed, allowed_url = sidecar(
        "allowed", image_url_fetch=True, image_url_allowed_hosts=["127.0.0.1"]
    )
    refused, refused_url = sidecar(
        "refused", image_url_fetch=True, image_url_allowed_hosts=["images.example.com"]
    )
    off, off_url = sidecar("off")  # the default: image URLs are never fetched

    for url in (refused_url, off_url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        got = client.chat.completions.create(
            model="reference",
            messages=_image_message(image_url),  # type: ignore[arg-type]
        )
        assert got.choices[0].message.content == TEXTS[0]
    for runtime in (refused, off):
        reason = {"reason": "image_url_not_allowed"}
        deadline = time.time() + 10
        while _value(runtime, "guardrail_proxy_not_applicable_total", reason) != 1:
            assert time.time() < deadline, "the not-fetched image URL was not counted"
            time.sleep(0.05)
    assert _value(refused, "guardrail_image_fetches_total", {"outcome": "not_allowed"}) == 1
    assert _value(off, "guardrail_image_fetches_total", {"outcome": "disabled"}) == 1
    assert host.requests == []  # the sidecars never asked the image host

    client = openai.OpenAI(base_url=f"{allowed_url}/v1", api_key="none", max_retries=0)
    client.chat.completions.create(
        model="reference",
        messages=_image_message(image_url),  # type: ignore[arg-type]
    )
    (sample,) = _samples(allowed, 1, "the fetched image's sample")
    assert host.requests == ["/knife.png"]
    assert _value(allowed, "guardrail_image_fetches_total", {"outcome": "fetched"}) == 1
    worker = Worker(allowed.sessions, allowed.auditors, allowed.metrics)
    assert worker.run_once()
    view = httpx.get(f"{allowed_url}/v1/samples/{sample.id}").json()
    assert view["status"] == "audited"
    assert {t["word"]: t["verdict"]["label"] for t in view["tokens"]}["fork"] == (
        "borrowed_evidence"  # the same verdict as the image sent as a data URL
    )
    for runtime in (allowed, refused, off):
        drops = runtime.metrics.registry.get_sample_value
        assert not any(
            (drops("guardrail_proxy_fail_open_drops_total", {"reason": r}) or 0) > 0
            for r in ("image_fetch_failed", "no_image", "request_unreadable")
        )


def test_a_slow_image_url_fetch_does_not_hold_the_samples_api(
    sidecar: Callable[..., tuple[Runtime, str]],
) -> None:
    # on SQLite one thread writes samples; the tee's fetch runs on its own threads, so a
    # fetch stalled at the image host leaves the samples API answering
    gate = threading.Event()
    asked = threading.Event()

    async def stalled(request: Request) -> Response:
        asked.set()
        await asyncio.to_thread(gate.wait, 30)
        return Response(EXAMPLE.read_bytes(), media_type="image/png")

    with BackgroundServer(Starlette(routes=[Route("/slow.png", stalled)])) as host_url:
        runtime, url = sidecar(
            "slow",
            image_url_fetch=True,
            image_url_allowed_hosts=["127.0.0.1"],
            image_url_timeout_seconds=60,
        )
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            got = client.chat.completions.create(
                model="reference",
                messages=_image_message(f"{host_url}/slow.png"),  # type: ignore[arg-type]
            )
            assert got.choices[0].message.content == TEXTS[0]
            assert asked.wait(10), "the tee never fetched the image URL"
            image = base64.b64encode(EXAMPLE.read_bytes()).decode()
            body = {"model": "reference", "prompt": CAPTION_PROMPT, "output": "a knife ."}
            body["image_base64"] = image
            posted = httpx.post(f"{url}/v1/samples", json=body, timeout=20)
            assert posted.status_code == 202, posted.text
            assert not gate.is_set()  # answered while the fetch was still stalled
        finally:
            gate.set()
        texts = sorted(s.generated_text for s in _samples(runtime, 2, "both samples"))
        assert texts == sorted(["a knife .", TEXTS[0]])  # the stalled fetch's sample landed too
