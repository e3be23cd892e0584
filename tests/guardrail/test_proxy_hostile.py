"""The proxy under hostile traffic, over real HTTP: a scripted upstream and the sidecar served by
uvicorn, driven by httpx, the `openai` client and raw sockets.  Bodies are bounded while they
are read, the tee backlog in bytes, the answer copy in bytes; whatever the client or the
upstream sends, the client gets the upstream's bytes, nothing is a guardrail 5xx, and every
answer that is not teed is counted once."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from guardrail.config import load_settings
from guardrail.demo.background_server import BackgroundServer, closed_port
from guardrail.service.api import create_app
from guardrail.service.chat import image_messages
from guardrail.service.proxy import MAX_TEE_JSON_VALUES, TeeBacklog
from guardrail.service.runtime import INGEST_THREADS, Runtime, build_runtime
from storage.engine import upgrade
from storage.models import Sample

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"
DROPS = "guardrail_proxy_fail_open_drops_total"
ABORT = b"<the scripted upstream breaks off here>"


def completion(text: str, *, index: int = 0) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "reference",
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
    }


def sse(*events: Any) -> list[bytes]:
    """One chunk per event, as an upstream flushes them; str events are sent verbatim."""
    chunks = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
        chunks.append(f"data: {data}\n\n".encode())
    return [*chunks, b"data: [DONE]\n\n"]


def delta(content: str, *, index: int = 0) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": {"content": content}}],
    }


@dataclass
class Reply:
    chunks: list[bytes]
    content_type: str = "application/json"
    status: int = 200


@dataclass
class ScriptedUpstream:
    """An OpenAI-compatible upstream that answers what the test scripts (by the `x-reply`
    header) and records every request exactly as it arrived."""

    replies: dict[str, Reply] = field(default_factory=dict)
    received: list[tuple[bytes, dict[bytes, bytes], bytes]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def chat(request: Request) -> Response:
            body = await request.body()
            self.received.append(
                (body, dict(request.headers.raw), request.scope.get("query_string", b""))
            )
            reply = self.replies[request.headers.get("x-reply", "ok")]
            if reply.content_type == "text/event-stream":

                async def chunks() -> AsyncIterator[bytes]:
                    for chunk in reply.chunks:
                        if chunk == ABORT:
                            raise ConnectionAbortedError("the upstream dies mid-answer")
                        yield chunk

                return StreamingResponse(
                    chunks(), status_code=reply.status, media_type=reply.content_type
                )
            return Response(
                b"".join(reply.chunks), status_code=reply.status, media_type=reply.content_type
            )

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])

    def script(self, name: str, reply: Reply) -> dict[str, str]:
        self.replies[name] = reply
        return {"x-reply": name}


class ErrorLog(logging.Handler):
    """Collects ERROR records (uvicorn's "Exception in ASGI application" among them)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "guardrail")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture()
def upstream() -> Iterator[tuple[ScriptedUpstream, str]]:
    scripted = ScriptedUpstream()
    scripted.replies["ok"] = Reply([json.dumps(completion("a knife on a table .")).encode()])
    with BackgroundServer(scripted.app()) as url:
        yield scripted, url


Sidecar = tuple[Runtime, str, TeeBacklog]


@pytest.fixture()
def sidecar_factory(
    tmp_path: Path, upstream: tuple[ScriptedUpstream, str]
) -> Iterator[Callable[..., Sidecar]]:
    servers: list[BackgroundServer] = []

    def start(**overrides: Any) -> Sidecar:
        settings = load_settings(
            environ={},
            database_url=f"sqlite:///{tmp_path / 'g.db'}",
            upstream_url=upstream[1],
            **overrides,
        )
        runtime = build_runtime(settings)
        upgrade(runtime.engine)
        app = create_app(runtime)
        server = BackgroundServer(app)
        servers.append(server)
        return runtime, server.__enter__(), app.state.proxy_backlog

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def drops(runtime: Runtime, reason: str) -> float:
    return runtime.metrics.registry.get_sample_value(DROPS, {"reason": reason}) or 0.0


def stall_ingest(runtime: Runtime, release: threading.Event) -> None:
    """Hold every ingest thread until `release` is set."""
    for _ in range(INGEST_THREADS):
        runtime.ingest_executor.submit(release.wait)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_for_drops(runtime: Runtime, reason: str, n: float) -> None:
    wait_for(lambda: drops(runtime, reason) == n, f"{n} drops with reason {reason}")
    time.sleep(0.05)  # and no more than n
    assert drops(runtime, reason) == n


def chat_body(text: str, **extra: Any) -> bytes:
    messages = image_messages(EXAMPLE.read_bytes(), text)
    return json.dumps({"model": "reference", "messages": messages, **extra}).encode()


def raw_http(url: str, head: bytes, *parts: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `head` and `parts` on a plain socket (the body may stay unfinished) and read one
    response."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head)
        for part in parts:
            sock.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        header_block, _, rest = data.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        while len(rest) < int(headers["content-length"]):
            rest += sock.recv(65536)
        return int(lines[0].split()[1]), headers, rest


# -- request bodies are bounded while they are read ------------------------------------------


def test_a_body_declared_over_the_cap_is_refused_before_it_is_read(
    upstream: tuple[ScriptedUpstream, str], sidecar_factory: Callable[..., Sidecar]
) -> None:
    scripted, _ = upstream
    _, url, _ = sidecar_factory(proxy_max_body_bytes=64 * 1024)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    status, headers, body = raw_http(url, head, b'{"model": "reference"')  # 1 GB promised
    assert status == 413
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "payload_too_large"
    assert "65536 bytes" in error["message"] and "proxy_max_body_bytes" in error["message"]
    assert scripted.received == []
    # an OpenAI client reads the reason from error.message (and does not retry a 413)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="reference", messages=image_messages(b"x" * 70_000, "too big")
        )
    assert caught.value.status_code == 413
    assert "proxy_max_body_bytes" in caught.value.body["message"]  # type: ignore[index]
    assert scripted.received == []
    assert httpx.post(f"{url}/v1/chat/completions", content=chat_body("fine")).status_code == 200


def test_a_chunked_body_over_the_cap_is_refused_while_it_is_being_read(
    upstream: tuple[ScriptedUpstream, str], sidecar_factory: Callable[..., Sidecar]
) -> None:
    scripted, _ = upstream
    _, url, _ = sidecar_factory(proxy_max_body_bytes=64 * 1024)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * (64 * 1024 + 1)
    # the body never ends: only a proxy that stops reading at the cap can answer
    status, _, body = raw_http(url, head, b"%x\r\n" % len(chunk), chunk, b"\r\n")
    assert status == 413
    assert json.loads(body)["error"]["type"] == "payload_too_large"

    def pieces() -> Iterator[bytes]:  # an httpx client streaming its body (chunked)
        for _ in range(3):
            yield b"y" * 40_000

    answer = httpx.post(f"{url}/v1/chat/completions", content=pieces(), timeout=10)
    assert answer.status_code == 413
    assert answer.json()["error"]["type"] == "payload_too_large"
    assert scripted.received == []


# -- the tee backlog is bounded in bytes -------------------------------------------------------


def test_the_tee_backlog_is_bounded_in_bytes_and_drains_to_zero(
    upstream: tuple[ScriptedUpstream, str], sidecar_factory: Callable[..., Sidecar]
) -> None:
    scripted, _ = upstream
    answer = json.dumps(completion("a knife on a table .")).encode()
    bodies = [chat_body(f"Describe image {i}.", user="u" * 300_000) for i in range(5)]
    per_exchange = len(bodies[0]) + len(answer)  # every body is the same size give or take 1
    runtime, url, backlog = sidecar_factory(
        proxy_max_pending=1000, proxy_max_pending_bytes=int(2.5 * per_exchange)
    )
    release = threading.Event()
    stall_ingest(runtime, release)
    try:
        with httpx.Client(timeout=10) as client:
            for body in bodies:
                got = client.post(f"{url}/v1/chat/completions", content=body)
                assert got.status_code == 200 and got.content == answer
        # two fit in 2.5 exchanges' bytes (the count bound is far away), three are dropped
        wait_for(lambda: drops(runtime, "backlog") == 3, "three backlog drops")
        assert backlog.pending_count == 2
        assert 2 * per_exchange <= backlog.pending_bytes <= backlog.max_bytes
        gauge = runtime.metrics.registry.get_sample_value  # what the dashboard sees
        assert gauge("guardrail_proxy_tee_pending") == 2
        assert gauge("guardrail_proxy_tee_pending_bytes") == backlog.pending_bytes
        assert [r[0] for r in scripted.received] == bodies  # all forwarded, as sent
    finally:
        release.set()
    wait_for(lambda: backlog.pending_count == 0, "the backlog to drain")
    assert backlog.pending_bytes == 0
    with runtime.sessions() as session:
        assert session.query(Sample).count() == 2  # what was kept was ingested

    # a tee that fails (the database is gone) releases its bytes too
    runtime.engine.dispose()
    Path(str(runtime.engine.url.database)).unlink()  # recreated empty: no tables
    got = httpx.post(f"{url}/v1/chat/completions", content=chat_body("after"), timeout=10)
    assert got.status_code == 200
    wait_for(lambda: drops(runtime, "ingest_error") == 1, "the failed tee to be counted")
    wait_for(lambda: backlog.pending_count == 0, "the failed tee to release")
    assert backlog.pending_bytes == 0


def test_the_tee_backlog_is_bounded_in_count_with_a_blocked_executor(
    upstream: tuple[ScriptedUpstream, str], sidecar_factory: Callable[..., Sidecar]
) -> None:
    # proxy_max_pending=1 takes the semaphore path (0 short-circuits it): one exchange waits on
    # the stalled ingest thread, every later one is dropped while it waits, none blocks a client
    scripted, _ = upstream
    answer = json.dumps(completion("a knife on a table .")).encode()
    runtime, url, backlog = sidecar_factory(proxy_max_pending=1)
    release = threading.Event()
    stall_ingest(runtime, release)
    try:
        with httpx.Client(timeout=10) as client:
            for i in range(4):
                got = client.post(f"{url}/v1/chat/completions", content=chat_body(f"n{i}"))
                assert got.status_code == 200 and got.content == answer
        wait_for(lambda: drops(runtime, "backlog") == 3, "three backlog drops")
        assert backlog.pending_count == 1
        assert runtime.metrics.registry.get_sample_value("guardrail_proxy_tee_pending") == 1
        assert len(scripted.received) == 4  # every request was forwarded all the same
    finally:
        release.set()
    wait_for(lambda: backlog.pending_count == 0, "the backlog to drain")
    assert backlog.pending_bytes == 0
    with runtime.sessions() as session:
        assert session.query(Sample).count() == 1  # the one that waited
    # and once drained, the next exchange is kept again
    got = httpx.post(f"{url}/v1/chat/completions", content=chat_body("after"), timeout=10)
    assert got.status_code == 200
    wait_for(lambda: backlog.pending_count == 0, "the backlog to drain again")
    with runtime.sessions() as session:
        assert session.query(Sample).count() == 2
    assert drops(runtime, "backlog") == 3


def test_a_single_exchange_over_the_byte_bound_is_dropped_not_held(
    upstream: tuple[ScriptedUpstream, str], sidecar_factory: Callable[..., Sidecar]
) -> None:
    runtime, url, backlog = sidecar_factory(proxy_max_pending_bytes=10_000)
    got = httpx.post(f"{url}/v1/chat/completions", content=chat_body("big"), timeout=10)
    assert got.status_code == 200  # the 16 KB image alone is over the bound
    wait_for(lambda: drops(runtime, "backlog") == 1, "the backlog drop")
    assert backlog.pending_count == 0 and backlog.pending_bytes == 0


# -- hostile answers ---------------------------------------------------------------------------

HOSTILE_STREAMS = {
    "a list event": sse(delta("a "), [1, 2], delta("knife .")),
    "a number event": sse(delta("a "), 3, delta("knife .")),
    "a junk event": sse(delta("a "), "not json {", delta("knife .")),
    "a choice that is not an object": sse(delta("a "), {"choices": [7]}, delta("knife .")),
    "a delta that is a list": sse({"choices": [{"index": 0, "delta": ["a"]}]}),
    "content that is a number": sse({"choices": [{"index": 0, "delta": {"content": 5}}]}),
    "choices that are a string": sse({"choices": "a knife"}),
    "an event nested 5000 deep": sse(delta("a "), "[" * 5000 + "]" * 5000),
}

HOSTILE_ANSWERS = {
    "a JSON list": b'[{"choices": []}]',
    "a number": b"42",
    "not JSON": b"<html>oops</html>",
    "not UTF-8": b'{"choices": [{"message": {"content": "\xff\xfe"}}]}',
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "a choice that is not an object": b'{"choices": ["a knife"]}',
    "content that is a list": b'{"choices": [{"message": {"content": [{"text": "a"}]}}]}',
    "no choice": b'{"choices": []}',
    "two choices with one index": b'{"choices": [{"index": 0}, {"index": 0}]}',
    "a negative index": b'{"choices": [{"index": -1, "message": {"content": "a"}}]}',
    "too many values": b'{"choices": [' + b"[]," * (MAX_TEE_JSON_VALUES + 1) + b"[]]}",
}


def test_hostile_answers_reach_the_client_unchanged_and_are_counted(
    upstream: tuple[ScriptedUpstream, str],
    sidecar_factory: Callable[..., Sidecar],
    errors: ErrorLog,
) -> None:
    scripted, _ = upstream
    runtime, url, backlog = sidecar_factory()
    expected = 0
    with httpx.Client(timeout=10) as client:
        for name, chunks in HOSTILE_STREAMS.items():
            headers = scripted.script(name, Reply(chunks, "text/event-stream"))
            with client.stream(
                "POST", f"{url}/v1/chat/completions", content=chat_body(name), headers=headers
            ) as got:
                assert got.status_code == 200
                assert got.read() == b"".join(chunks), name
            expected += 1
            wait_for_drops(runtime, "response_unreadable", expected)
        for name, content in HOSTILE_ANSWERS.items():
            headers = scripted.script(name, Reply([content]))
            got = client.post(
                f"{url}/v1/chat/completions", content=chat_body(name), headers=headers
            )
            assert got.status_code == 200
            assert got.content == content, name
            expected += 1
            wait_for_drops(runtime, "response_unreadable", expected)
    wait_for(lambda: backlog.pending_count == 0, "the backlog to drain")
    assert backlog.pending_bytes == 0
    with runtime.sessions() as session:
        assert session.query(Sample).count() == 0
    assert errors.records == []


def test_a_stream_is_read_by_its_events_and_assembled_per_choice(
    upstream: tuple[ScriptedUpstream, str], sidecar_factory: Callable[..., Sidecar]
) -> None:
    """Choices of other indexes are not interleaved into the text (each is its own sample);
    a line separator inside the text (legal unescaped JSON) does not split an event; CRLF
    line ends work."""
    scripted, _ = upstream
    runtime, url, _ = sidecar_factory()
    chunks = [
        *sse(delta("a "), delta("b ", index=1), delta("knife\u2028on ")),
        b'data: {"choices": [{"index": 0, "delta": {"content": "a table ."}}]}\r\n\r\n',
        b": a comment line\n\n",
        b'data: {"choices": [], "usage": {"total_tokens": 3}}\n\n',
    ]
    headers = scripted.script("mixed", Reply(chunks, "text/event-stream"))
    got = httpx.post(
        f"{url}/v1/chat/completions", content=chat_body("mixed"), headers=headers, timeout=10
    )
    assert got.content == b"".join(chunks)

    def stored() -> dict[int | None, str]:
        with runtime.sessions() as session:
            return {s.choice_index: s.generated_text for s in session.query(Sample)}

    wait_for(lambda: len(stored()) == 2, "a sample per choice")
    assert stored() == {0: "a knife\u2028on a table .", 1: "b "}


def test_an_answer_over_the_copy_bound_reaches_the_client_whole_and_the_tee_is_dropped(
    upstream: tuple[ScriptedUpstream, str], sidecar_factory: Callable[..., Sidecar]
) -> None:
    scripted, _ = upstream
    runtime, url, backlog = sidecar_factory(proxy_max_response_bytes=64 * 1024)
    words = [f"word{i} " for i in range(30_000)]  # ~250 KB of text
    stream = sse(*(delta(w) for w in words))
    whole = json.dumps(completion("".join(words))).encode()
    small = json.dumps(completion("a knife .")).encode()
    with httpx.Client(timeout=10) as client:
        headers = scripted.script("stream", Reply(stream, "text/event-stream"))
        got = client.post(f"{url}/v1/chat/completions", content=chat_body("s"), headers=headers)
        assert got.status_code == 200 and got.content == b"".join(stream)
        headers = scripted.script("whole", Reply([whole]))
        got = client.post(f"{url}/v1/chat/completions", content=chat_body("w"), headers=headers)
        assert got.status_code == 200 and got.content == whole
        assert "content-length" not in got.headers  # relayed as it came, not held
        headers = scripted.script("small", Reply([small]))
        got = client.post(f"{url}/v1/chat/completions", content=chat_body("k"), headers=headers)
        assert got.content == small and got.headers["content-length"] == str(len(small))
    wait_for(lambda: drops(runtime, "response_too_large") == 2, "two response_too_large drops")

    def samples() -> int:
        with runtime.sessions() as session:
            return session.query(Sample).count()

    wait_for(lambda: samples() == 1, "the small answer's sample")
    wait_for(lambda: backlog.pending_bytes == 0, "the tee to release its bytes")  # after counting


def test_an_answer_the_upstream_breaks_off_is_broken_off_for_the_client_and_counted(
    upstream: tuple[ScriptedUpstream, str], sidecar_factory: Callable[..., Sidecar]
) -> None:
    scripted, _ = upstream
    runtime, url, backlog = sidecar_factory()
    headers = scripted.script(
        "dies", Reply([*sse(delta("a knife"))[:1], ABORT], "text/event-stream")
    )
    with pytest.raises(httpx.RemoteProtocolError):  # not a clean end: the client can tell
        httpx.post(
            f"{url}/v1/chat/completions", content=chat_body("x"), headers=headers, timeout=10
        )
    wait_for_drops(runtime, "stream_interrupted", 1)
    assert backlog.pending_count == 0
    got = httpx.post(f"{url}/v1/chat/completions", content=chat_body("next"), timeout=10)
    assert got.status_code == 200  # and the proxy serves on


# -- hostile requests are forwarded as sent ----------------------------------------------------

IMAGE_BODY = json.loads(chat_body("x"))
HOSTILE_REQUESTS: dict[str, tuple[bytes, str]] = {
    "not JSON": (b"hello, upstream", "request_unreadable"),
    "not UTF-8": (b'{"model": "reference", "x": "\xff\xfe\xfa"}', "request_unreadable"),
    "a raw NUL byte": (b'{"model": "reference", "messages": "\x00"}', "request_unreadable"),
    "a JSON list": (b'[{"model": "reference"}]', "request_unreadable"),
    "nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, "request_unreadable"),
    "too many values": (
        b'{"model": "reference", "messages": [' + b"{}," * MAX_TEE_JSON_VALUES + b"{}]}",
        "request_unreadable",
    ),
    "no model": (json.dumps({"messages": IMAGE_BODY["messages"]}).encode(), "unknown_model"),
    "a model that is a list": (
        json.dumps({**IMAGE_BODY, "model": ["reference"]}).encode(),
        "unknown_model",
    ),
    "an unknown model": (json.dumps({**IMAGE_BODY, "model": "gpt-9"}).encode(), "unknown_model"),
    "messages that are not a list": (
        b'{"model": "reference", "messages": 7}',
        "request_unreadable",
    ),
    "an image that is not base64": (
        json.dumps(
            {
                "model": "reference",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": "data:,%%"}]}
                ],
            }
        ).encode(),
        "image_unreadable",
    ),
}


def test_hostile_requests_are_forwarded_unchanged_and_their_tee_drops_counted(
    upstream: tuple[ScriptedUpstream, str],
    sidecar_factory: Callable[..., Sidecar],
    errors: ErrorLog,
) -> None:
    scripted, _ = upstream
    runtime, url, backlog = sidecar_factory()
    expected: dict[str, float] = {}
    with httpx.Client(timeout=20) as client:
        for name, (body, reason) in HOSTILE_REQUESTS.items():
            got = client.post(
                f"{url}/v1/chat/completions",
                content=body,
                headers={"content-type": "application/json"},
            )
            assert got.status_code == 200, name  # the upstream's answer, whatever was sent
            assert scripted.received[-1][0] == body, name
            expected[reason] = expected.get(reason, 0) + 1
            wait_for_drops(runtime, reason, expected[reason])
    wait_for(lambda: backlog.pending_count == 0, "the backlog to drain")
    assert backlog.pending_bytes == 0
    assert errors.records == []


def test_raw_headers_and_query_strings_are_forwarded_as_sent(
    upstream: tuple[ScriptedUpstream, str], sidecar_factory: Callable[..., Sidecar]
) -> None:
    scripted, _ = upstream
    _, url, _ = sidecar_factory()
    body = chat_body("headers")
    head = (
        b"POST /v1/chat/completions?api-version=1&q=caf%C3%A9+x&p=a%2Fb&p=2 HTTP/1.1\r\nHost: x\r\n"
        b"X-Note: caf\xe9\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    status, _, answer = raw_http(url, head, body)
    assert status == 200 and json.loads(answer)["choices"][0]["message"]["content"]
    sent, headers, query = scripted.received[-1]
    assert sent == body
    assert headers[b"x-note"] == b"caf\xe9"
    assert query == b"api-version=1&q=caf%C3%A9+x&p=a%2Fb&p=2"


def test_nul_and_surrogates_in_a_request_are_forwarded_and_accounted_for(
    upstream: tuple[ScriptedUpstream, str], sidecar_factory: Callable[..., Sidecar]
) -> None:
    """Escaped NUL and lone surrogates are valid JSON: forwarded, then either ingested or
    dropped with a counted reason, never lost."""
    scripted, _ = upstream
    runtime, url, backlog = sidecar_factory()
    bodies = [
        chat_body("nul \\u0000 here").replace(b"\\\\u0000", b"\\u0000"),
        chat_body("lone \\ud800 surrogate").replace(b"\\\\ud800", b"\\ud800"),
    ]
    for body in bodies:
        got = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=10)
        assert got.status_code == 200
        assert scripted.received[-1][0] == body

    def accounted() -> float:
        with runtime.sessions() as session:
            samples = session.query(Sample).count()
        reasons = ("rejected", "ingest_error")
        return samples + sum(drops(runtime, r) for r in reasons)

    wait_for(lambda: accounted() == 2 and backlog.pending_count == 0, "both to be accounted for")


def test_upstream_failures_are_502_and_a_missing_upstream_503_in_the_error_shape(
    tmp_path: Path,
) -> None:
    with closed_port() as dead:
        for upstream_url, status, kind in (
            (f"http://127.0.0.1:{dead}", 502, "upstream_unavailable"),
            (None, 503, "upstream_not_configured"),
        ):
            settings = load_settings(
                environ={}, database_url=f"sqlite:///{tmp_path / 'g.db'}", upstream_url=upstream_url
            )
            runtime = build_runtime(settings)
            with BackgroundServer(create_app(runtime)) as url:
                got = httpx.post(f"{url}/v1/chat/completions", content=chat_body("x"), timeout=20)
            assert got.status_code == status
            assert got.json()["error"]["type"] == kind and got.json()["error"]["message"]
            if status == 503:
                assert got.headers["retry-after"]
